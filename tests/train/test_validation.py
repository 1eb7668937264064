"""Bad input and bad luck: every case of docs/validation.md gets one clear line, a non-zero exit and
leaves nothing half-written. (Cases tested elsewhere are listed in that table with their test.)"""

import errno
import re
from pathlib import Path

import pytest
import torch

import vitlab.train.checkpoint as checkpoint_module
from vitlab.cli import main
from vitlab.train.checkpoint import load_checkpoint
from vitlab.train.trainer import Runner

QUICK = ["--subset", "300", "--test_subset", "100", "--batch-size", "50", "--progress", "false"]
TESTS = Path(__file__).resolve().parents[1]
DOCS = TESTS.parent / "docs" / "validation.md"


def one_line_error(capsys, code, pattern):
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert re.search(pattern, err), err


@pytest.mark.parametrize("args, pattern", [
    (["--val_fraction", "1.5"], "val_fraction must be between 0 and 1"),
    (["--lr", "-0.1"], "lr must be positive"),
    (["--batch_size", "0"], "batch_size must be at least 1"),
    (["--crop_padding", "20"], "crop_padding must be between 0 and 16"),
    (["--label_smoothing", "1"], r"label_smoothing must be in \[0, 1\)"),
    (["--cutmix", "-1"], "mixup and cutmix must be >= 0"),
    (["--subset", "5"], "subset must be between 10 and"),
    (["--model", "vit", "--patch_size", "40"], "patch_size must be between 1 and the image size"),
    (["--model", "vit", "--stem", "conv", "--patch_size", "6"], "must be a power of 2"),
    (["--model", "vit", "--stem", "conv-pool", "--patch_size", "6"], "stem conv-pool halves the image"),
    (["--model", "cnn", "--widths", "8,8,8,8,8,8"], "at most 5 stages"),
])
def test_out_of_range_values_are_refused_before_any_work(args, pattern, cifar_root, tmp_path, capsys):
    one_line_error(capsys, main(["train", *QUICK, *args, "--data-dir", str(cifar_root), "--out", str(tmp_path / "run")]), pattern)
    assert not (tmp_path / "run").exists()


def test_an_unwritable_out_folder_is_refused(cifar_root, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_line_error(capsys, main(["train", *QUICK, "--epochs", "1", "--data-dir", str(cifar_root), "--out", str(blocker / "run")]),
                   "cannot write to --out")


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_file(cifar_root, tmp_path, capsys, monkeypatch):
    def disk_full(state, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    run = tmp_path / "run"
    one_line_error(capsys, main(["train", *QUICK, "--epochs", "2", "--data-dir", str(cifar_root), "--out", str(run)]),
                   "No space left on device.*free some space")
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))  # the temporary file was removed
    assert not (run / "checkpoint.pt").exists() and not (run / "results.json").exists()


def test_a_loss_that_becomes_nan_stops_and_keeps_the_last_good_checkpoint(cifar_root, tmp_path, capsys, monkeypatch):
    original = Runner.train_step
    steps = {"taken": 0}

    def poisoned(self, images, labels, optimizer, *mixing):
        steps["taken"] += 1
        loss, logits = original(self, images, labels, optimizer, *mixing)
        return (loss * float("nan"), logits) if steps["taken"] > 6 else (loss, logits)  # epoch 2 of 4 steps each

    monkeypatch.setattr(Runner, "train_step", poisoned)
    run = tmp_path / "run"
    args = ["train", "--model", "mlp", *QUICK, "--batch-size", "60", "--epochs", "3", "--data-dir", str(cifar_root), "--out", str(run)]
    one_line_error(capsys, main(args), "training loss became nan in epoch 2")
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["progress"]["epoch"] == 2 and state["progress"]["step"] == 0  # written after epoch 1, before the NaN
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    monkeypatch.setattr(Runner, "train_step", original)
    assert main(["train", "--resume", str(run)]) == 0  # and it can continue from there
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_run_folder_mixing_two_models_is_refused(cifar_root, tmp_path, capsys):
    cnn, vit = tmp_path / "cnn", tmp_path / "vit"
    assert main(["train", "--model", "cnn-small", *QUICK, "--epochs", "1", "--data-dir", str(cifar_root), "--out", str(cnn)]) == 0
    assert main(["train", "--model", "vit", "--hidden_size", "16", "--num_blocks", "1", *QUICK, "--epochs", "1",
                 "--data-dir", str(cifar_root), "--out", str(vit)]) == 0
    capsys.readouterr()
    (cnn / "config.json").write_text((vit / "config.json").read_text())
    one_line_error(capsys, main(["evaluate", str(cnn), "--data-dir", str(cifar_root)]), "the folder mixes two runs")
    (cnn / "results.json").unlink()  # make it look unfinished: its checkpoint is a cnn-small's, its config a ViT's
    one_line_error(capsys, main(["train", "--resume", str(cnn)]), "does not fit this run")


def test_every_case_in_the_validation_table_names_a_test_that_exists():
    tests = {match for path in TESTS.rglob("test_*.py") for match in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    rows = [line for line in DOCS.read_text().splitlines() if line.startswith("| ") and "`test_" in line]
    assert len(rows) >= 20
    for row in rows:
        for name in re.findall(r"`(test_\w+)`", row):
            assert name in tests, f"docs/validation.md names {name}, which does not exist"
