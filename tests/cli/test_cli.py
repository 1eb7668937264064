"""The command line end to end: real training on a few hundred images, files, and errors."""

import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

from vitlab.cli import main
from vitlab.data import FOLDER

QUICK = ["--subset", "300", "--test_subset", "100", "--epochs", "1", "--batch-size", "50", "--progress", "false"]


def train(args, out):
    return main(["train", *args, *QUICK, "--out", str(out)])


def test_results_name_the_commit_the_run_started_from_and_what_malloc_keeps(cifar_root, tmp_path, monkeypatch):
    """A commit made while a run trains is not the code it ran: the commit is read when training starts."""
    from vitlab.train import run as run_module

    checkout = {"commit": "c0de-at-start"}
    monkeypatch.setattr(run_module, "git_commit", lambda: checkout["commit"])

    def peak_while_training(device):  # the peak is probed after the commit is read: a commit lands meanwhile
        checkout["commit"] = "c0de-made-later"

    monkeypatch.setattr(run_module, "measured_matmul_peak", peak_while_training)
    out = tmp_path / "run"
    assert train(["--model", "cnn-small", "--data-dir", str(cifar_root)], out) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["git_commit"] == "c0de-at-start"
    assert results["cpu_freed_memory"] == run_module.keep_freed_memory()


def test_results_say_whether_the_cpus_cores_shared_a_cache_before_and_after_training(cifar_root, tmp_path, monkeypatch):
    from vitlab.train import run as run_module

    probes = iter([55.0, 330.0])  # ns: a shared L3 when training started, none when it ended
    monkeypatch.setattr(run_module, "core_round_trip_ns", lambda: next(probes))
    threads = torch.get_num_threads()
    for run_threads, expected in ((2, [55.0, 330.0]), (1, None)):  # one thread shares nothing between cores: no probe
        torch.set_num_threads(run_threads)
        try:
            out = tmp_path / f"run{run_threads}"
            assert train(["--model", "cnn-small", "--data-dir", str(cifar_root)], out) == 0
        finally:
            torch.set_num_threads(threads)
        assert json.loads((out / "results.json").read_text())["core_round_trips_ns"] == expected


@pytest.mark.parametrize("model_args", [
    ["--model", "cnn-small"],
    ["--model", "vit", "--patch_size", "6", "--hidden_size", "32", "--num_heads", "4", "--num_blocks", "2", "--pool", "mean"],
])
def test_train_writes_the_run_folder_and_evaluate_reproduces_it(model_args, cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert train([*model_args, "--data-dir", str(cifar_root)], out) == 0
    assert "test accuracy" in capsys.readouterr().out
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "model.json", "results.json", "curves.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    for key in ("test_loss", "test_acc", "best_val_acc", "params", "train_seconds", "images_per_second", "device", "versions", "git_commit"):
        assert key in results
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert main(["evaluate", str(out), "--data-dir", str(cifar_root)]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    assert evaluation["test_acc"] == results["test_acc"]
    assert evaluation["test_loss"] == pytest.approx(results["test_loss"], rel=1e-6)
    assert len(evaluation["per_class_acc"]) == 10


def test_seed_spellings_and_presets_reach_the_config(cifar_root, tmp_path):
    out = tmp_path / "run"
    args = ["--preset", "vit-seed001", "--hidden_size", "32", "--num-heads", "2", "--lr", "0.002", "--data_dir", str(cifar_root)]
    assert train(args, out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "vit-seed001" and config["model"] == "vit"
    assert config["model_config"]["hidden_size"] == 32 and config["model_config"]["num_heads"] == 2
    assert config["model_config"]["num_blocks"] == 4 and config["train"]["lr"] == 0.002
    assert config["train"]["epochs"] == 1  # the flag wins over the preset's 20


def assert_one_line_error(capsys, code, pattern):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert pattern in err


def test_heads_not_dividing_width_is_one_line_and_writes_nothing(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = train(["--model", "vit", "--hidden_size", "64", "--num_heads", "3", "--data-dir", str(cifar_root)], out)
    assert_one_line_error(capsys, code, "not divisible by num_heads 3")
    assert not out.exists()


def test_missing_data_offline_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    def offline(root, **kwargs):
        Path(root).mkdir(parents=True)  # as torchvision does before it downloads
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.delenv("VITLAB_DATA", raising=False)
    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    out = tmp_path / "run"
    code = train(["--data-dir", str(tmp_path / "no-such-folder" / "cifar")], out)
    assert_one_line_error(capsys, code, "downloading it failed")
    assert not out.exists() and not (tmp_path / "no-such-folder").exists()  # the folders made for the download are gone


def test_a_data_folder_that_does_not_exist_is_refused_for_a_trained_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tmp_path), "--data-dir", str(tmp_path / "typo")])
    assert_one_line_error(capsys, exit_info.value.code, "no folder")


def test_corrupt_batch_file_is_one_line_and_writes_nothing(writable_cifar_root, tmp_path, capsys):
    path = writable_cifar_root / FOLDER / "data_batch_1"
    content = bytearray(path.read_bytes())
    content[1000] = (content[1000] + 1) % 256
    path.write_bytes(bytes(content))
    out = tmp_path / "run"
    code = train(["--data-dir", str(writable_cifar_root)], out)
    assert_one_line_error(capsys, code, "fails its checksum")
    assert not out.exists()


@pytest.mark.parametrize("args,pattern", [
    (["--model", "cnn", "--patch_size", "4"], "does not apply to model 'cnn'"),
    (["--preset", "vit-huge"], "unknown preset"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--model", "vit", "--pos_embed", "rope"], "pos_embed must be one of"),
])
def test_bad_values_are_one_line_errors(args, pattern, tmp_path, capsys):
    assert_one_line_error(capsys, main(["train", *args, "--out", str(tmp_path / "run")]), pattern)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,pattern", [
    (["--model", "resnet"], "unknown model 'resnet'"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--lr", "fast"], "invalid float value"),
])
def test_malformed_command_lines_are_one_line_errors(args, pattern, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args, "--out", str(tmp_path / "run")])
    assert_one_line_error(capsys, exit_info.value.code, pattern)


def test_refuses_an_out_folder_that_holds_a_run(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert_one_line_error(capsys, train(["--data-dir", str(cifar_root)], out), "is not empty")
    assert (out / "results.json").read_text() == "{}"


def test_evaluate_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert_one_line_error(capsys, main(["evaluate", str(tmp_path / "nothing")]), "does not exist")


def test_module_entry_point_lists_models_and_presets():
    result = subprocess.run([sys.executable, "-m", "vitlab", "models"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for name in ("cnn-small", "cnn", "mlp", "vit", "vit-seed001"):
        assert name in result.stdout
