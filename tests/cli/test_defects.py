"""Each defect the hostile review of issue #14 found, provoked: the command refuses with one clear line, or
does the right thing, and leaves nothing half-made behind."""

import json
import os
import stat

import pytest

from vitlab.cli import main as vitlab_main


def main(argv) -> int:
    """The command line's exit status, also when argparse itself refuses the command (SystemExit)."""
    try:
        return vitlab_main(argv)
    except SystemExit as exit_:
        return exit_.code


QUICK = ["--subset", "300", "--test_subset", "100", "--epochs", "1", "--batch-size", "50", "--progress", "false"]
VIT = ["--model", "vit", "--patch_size", "8", "--hidden_size", "16", "--num_heads", "2", "--num_blocks", "1"]


def one_line_error(capsys, status: int, *fragments: str) -> str:
    error = capsys.readouterr().err
    assert status == 2, error
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
    for fragment in fragments:
        assert fragment in error, error
    return error


@pytest.fixture
def vit_run(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vit"
    assert main(["train", *VIT, *QUICK, "--gif", "true", "--data-dir", str(cifar_root), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--weight_decay", "inf"], "weight_decay must be finite"),
    (["--lr", "inf"], "lr must be finite"),
    (["--mixup", "inf"], "mixup must be finite"),
    (["--warmup_epochs", "inf"], "warmup_epochs must be finite"),
    (["--lr", "nan"], "lr must be finite"),
    (["--seed", str(2**70)], "seed must be between 0 and 2**63 - 1"),
    (["--split_seed", str(2**64)], "split_seed must be between 0 and 2**63 - 1"),
    (["--hidden_size", str(10**9)], "does not fit in this machine's memory"),
    (["--subset", "40", "--val_fraction", "0.01"], "leaves an empty validation split"),
    (["--device", "cuda"], "--device cuda"),
    (["--image_size", "64"], "image_size applies to folder datasets only"),
    (["--dataset", "imagenet"], "dataset must be cifar10, cifar100 or folder:PATH"),
    (["--num_classes", "20"], "unrecognized arguments"),
])
def test_bad_training_settings_are_refused_before_any_folder_is_made(flags, fragment, cifar_root, tmp_path, capsys):
    if flags == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    one_line_error(capsys, main(["train", *VIT, *QUICK, *flags, "--data-dir", str(cifar_root), "--out", str(out)]), fragment)
    assert not out.exists()


def test_weights_that_become_nan_stop_the_run_with_a_clear_error(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["train", *VIT, *QUICK, "--lr", "1e30", "--warmup_epochs", "0", "--data-dir", str(cifar_root), "--out", str(out)])
    error = one_line_error(capsys, status, "lower --lr")
    assert "became" in error and not (out / "results.json").exists()
    assert "NaN" not in (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else True


def test_a_run_killed_before_its_first_checkpoint_can_be_started_again_in_its_folder(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".vitlab-run").touch()  # what a run killed during data loading or epoch 1 leaves
    (out / "config.json").write_text("{}")
    one_line_error(capsys, main(["train", "--resume", str(out)]), "stopped before its first checkpoint", "--out")
    assert main(["train", *VIT, *QUICK, "--data-dir", str(cifar_root), "--out", str(out)]) == 0
    assert (out / "results.json").is_file()


def test_gif_refuses_to_overwrite_run_files_and_needs_a_gif_name(vit_run, capsys):
    weights = (vit_run / "model.safetensors").read_bytes()
    one_line_error(capsys, main(["gif", str(vit_run), "--out", str(vit_run / "model.safetensors")]), "must end in .gif")
    one_line_error(capsys, main(["gif", str(vit_run), "--out", str(vit_run)]), "must end in .gif")
    assert (vit_run / "model.safetensors").read_bytes() == weights
    assert main(["gif", str(vit_run), "--out", str(vit_run / "again.gif")]) == 0


def test_a_truncated_last_metrics_line_and_a_truncated_snapshot(vit_run, capsys):
    metrics = vit_run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 2, "train_lo')  # a kill during the append
    assert main(["gif", str(vit_run)]) == 0
    snapshot = next((vit_run / "snapshots").glob("epoch_*.safetensors"))
    snapshot.write_bytes(snapshot.read_bytes()[:20])
    one_line_error(capsys, main(["gif", str(vit_run)]), "unreadable")


@pytest.mark.parametrize("images", ["-1", "0"])
def test_attention_needs_at_least_one_image(vit_run, cifar_root, images, capsys, tmp_path):
    one_line_error(capsys, main(["attention", str(vit_run), "--images", images, "--data-dir", str(cifar_root), "--out", str(tmp_path / "x")]),
                   "must be at least 1")
    assert not (tmp_path / "x").exists()


def test_predict_on_a_folder_and_on_a_run_with_twenty_classes(vit_run, tmp_path, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert main(["predict", str(vit_run), str(folder)]) == 2
    assert "is a folder; give image files" in capsys.readouterr().err
    description = json.loads((vit_run / "model.json").read_text())
    assert description["config"]["num_classes"] == 10


def test_damaged_run_files_are_one_line_errors_in_evaluate(vit_run, cifar_root, capsys):
    config = json.loads((vit_run / "config.json").read_text())
    config["train"]["epochs"] = "many"
    (vit_run / "config.json").write_text(json.dumps(config))
    one_line_error(capsys, main(["evaluate", str(vit_run), "--data-dir", str(cifar_root)]), "config.json")
    (vit_run / "config.json").write_text("[1, 2]")
    one_line_error(capsys, main(["evaluate", str(vit_run), "--data-dir", str(cifar_root)]), "not a vitlab run config")


def test_files_written_atomically_follow_the_umask(vit_run):
    mask = os.umask(0)
    os.umask(mask)
    for name in ("results.json", "config.json", "model.safetensors", "metrics.jsonl"):
        assert stat.S_IMODE((vit_run / name).stat().st_mode) == 0o666 & ~mask, name


def test_the_default_run_folder_never_collides(cifar_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["train", "--model", "mlp", "--hidden_size", "8", *QUICK, "--data-dir", str(cifar_root)]) == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_help_texts_are_whole_sentences(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "the validation split stays whole (for learning curves" in text  # a setting whose description spans two lines


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ("patch_size=0", "fix --timm_kwargs"),  # timm divides by it
    ("drop_rate=nan", "drop_rate must be finite"),
])
def test_timm_settings_timm_cannot_use_are_refused_before_any_folder_is_made(kwargs, fragment, cifar_root, tmp_path, capsys):
    pytest.importorskip("timm")
    out = tmp_path / "run"
    status = main(["train", "--model", "timm:vit_tiny_patch16_224", "--timm_kwargs", kwargs, *QUICK, "--data-dir", str(cifar_root),
                   "--out", str(out)])
    one_line_error(capsys, status, fragment)
    assert not out.exists()


def test_json_that_python_refuses_to_read_is_a_damaged_file(vit_run, capsys):
    config = vit_run / "config.json"
    config.write_text('{"model": ' + "9" * 5001 + "}")  # beyond Python's 4,300-digit limit for int()
    one_line_error(capsys, main(["evaluate", str(vit_run)]), "is not valid JSON")
    config.write_text("[" * 200_000)  # deeper than the parser's recursion
    one_line_error(capsys, main(["evaluate", str(vit_run)]), "is not valid JSON")
