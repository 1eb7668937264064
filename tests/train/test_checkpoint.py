"""Crash-safe training: kill it, stop it, damage its checkpoint; resuming must be exact or refuse clearly."""

import json
import random
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import vitlab_process
from vitlab.cli import main

# A ViT with dropout (so the global RNG matters) and every batch augmentation (TrivialAugment, random
# erasing, MixUp/CutMix: their draws must resume exactly too), fp32 on the CPU for bit-exact arithmetic
# (a GPU's autotuned and atomic-add kernels are not bit-reproducible), a checkpoint every step.
ARGS = ["--model", "vit", "--patch_size", "8", "--hidden_size", "32", "--num_heads", "2", "--num_blocks", "2", "--dropout", "0.1",
        "--subset", "300", "--test_subset", "100", "--epochs", "4", "--batch_size", "20", "--precision", "fp32", "--device", "cpu",
        "--trivial_augment", "true", "--random_erasing", "0.25", "--mixup", "0.8", "--cutmix", "1.0", "--ema_decay", "0.9",
        "--alternating_flip", "true",
        "--checkpoint_every", "1", "--progress", "false"]


def start_training(cifar_root, out):
    """`vitlab train` in a child process that sees the same expected checksums as this test."""
    return vitlab_process(["train", *ARGS, "--data-dir", str(cifar_root), "--out", str(out)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "training never wrote a checkpoint"
        time.sleep(0.01)


def weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


@pytest.fixture
def uninterrupted(cifar_root, tmp_path):
    out = tmp_path / "uninterrupted"
    assert main(["train", *ARGS, "--data-dir", str(cifar_root), "--out", str(out)]) == 0
    return out


def test_sigkill_at_a_random_moment_then_resume_gives_identical_weights(cifar_root, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    process = start_training(cifar_root, out)
    wait_for(out / "checkpoint.pt", process)
    time.sleep(random.uniform(0.0, 0.2))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "results.json").exists(), "the run finished before it could be killed; make it longer"
    assert main(["train", "--resume", str(out)]) == 0
    expected, resumed = weights(uninterrupted), weights(out)
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert [r["val_acc"] for r in history] == [r["val_acc"] for r in reference]
    assert json.loads((out / "results.json").read_text())["test_acc"] == json.loads((uninterrupted / "results.json").read_text())["test_acc"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(cifar_root, tmp_path, uninterrupted, capsys):
    out = tmp_path / "stopped"
    process = start_training(cifar_root, out)
    wait_for(out / "checkpoint.pt", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "stopped by SIGTERM" in stderr and f"vitlab train --resume {out}" in stderr
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2  # not finished: evaluate points to --resume
    assert f"finish it with: vitlab train --resume {out}" in capsys.readouterr().err
    assert main(["train", "--resume", str(out)]) == 0
    expected, resumed = weights(uninterrupted), weights(out)
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)


def test_resume_refuses_finished_runs_extra_flags_and_bad_checkpoints(cifar_root, tmp_path, uninterrupted, capsys):
    assert main(["train", "--resume", str(uninterrupted)]) == 2
    assert "has finished" in capsys.readouterr().err
    assert main(["train", "--resume", str(uninterrupted), "--epochs", "9"]) == 2
    assert "drop --epochs" in capsys.readouterr().err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((uninterrupted / "config.json").read_text())
    checkpoint = (uninterrupted / "checkpoint.pt").read_bytes()
    (broken / "checkpoint.pt").write_bytes(checkpoint[: len(checkpoint) // 2])
    assert main(["train", "--resume", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert "corrupt or truncated" in err and len(err.splitlines()) == 1


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(cifar_root, tmp_path, uninterrupted, capsys):
    class Exploit:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').close()",))

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((uninterrupted / "config.json").read_text())
    torch.save({"model": Exploit()}, evil / "checkpoint.pt")
    assert main(["train", "--resume", str(evil)]) == 2
    error = capsys.readouterr().err
    assert "could run code when loaded" in error and "weights_only" not in error and len(error.splitlines()) == 1
    assert not (tmp_path / "pwned").exists()


def test_an_edited_checkpoint_is_refused_before_anything_is_written(tmp_path, uninterrupted, capsys):
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (edited / name).write_text((uninterrupted / name).read_text())
    state = torch.load(uninterrupted / "checkpoint.pt", weights_only=True)
    state["progress"]["epoch"], state["history"] = 99, []  # an epoch far past the history it holds
    torch.save(state, edited / "checkpoint.pt")
    assert main(["train", "--resume", str(edited)]) == 2
    error = capsys.readouterr().err.strip()
    assert "checkpoint is inconsistent" in error and len(error.splitlines()) == 1
    assert (edited / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()
    assert not (edited / "model.safetensors").exists()
