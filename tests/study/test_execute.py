"""Studies end to end: compare and sweep from the command line, resuming, locking, refusing."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import real_cifar10_root, vitlab_process, wait_until_the_group_has_exited
from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.io import lock_holder
from vitlab.study.execute import run_lock, run_lock_path, run_one

TINY = ["--subset", "200", "--test_subset", "100", "--epochs", "1", "--batch-size", "50", "--progress", "false", "--seeds", "2"]
SMALL_VIT = "vit:patch_size=8,hidden_size=16,num_blocks=1"


def test_compare_writes_tables_and_figures_and_a_rerun_trains_nothing(cifar_root, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["compare", "cnn-small", SMALL_VIT, "mlp:hidden_size=16", *TINY, "--data-dir", str(cifar_root), "--out", str(out)]
    assert main(args) == 0
    for name in ("study.json", "results.md", "results.csv", "results.json", "figures/differences.png", "figures/curves.png",
                 "figures/accuracy_vs_time.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert [row["spec"] for row in results["rows"]] == ["cnn-small", SMALL_VIT, "mlp:hidden_size=16"]
    assert results["rows"][0]["delta"] is None and results["rows"][1]["delta"]["degrees_of_freedom"] > 0
    assert all(row["seeds"] == [0, 1] and row["flops_per_image"] > 0 for row in results["rows"])
    assert [(step["spec"], step["minus"]) for step in results["steps"]] == [(SMALL_VIT, "cnn-small"), ("mlp:hidden_size=16", SMALL_VIT)]
    assert len((out / "results.csv").read_text().splitlines()) == 4
    finished = {path: path.stat().st_mtime_ns for path in out.glob("runs/*/*/results.json")}
    assert len(finished) == 6
    capsys.readouterr()
    assert main(args) == 0
    assert "0 to train" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in out.glob("runs/*/*/results.json")} == finished


def test_a_shared_setting_that_a_spec_lacks_is_an_error_before_anything_is_made(cifar_root, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["compare", "cnn-small", "mlp", *TINY, "--patch_size", "4", "--data-dir", str(cifar_root), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "--patch_size does not apply to model 'cnn-small'" in error and len(error.strip().splitlines()) == 1
    assert not out.exists()


def test_a_different_study_in_the_same_folder_is_refused(cifar_root, tmp_path, capsys):
    out = tmp_path / "study"
    base = [*TINY, "--data-dir", str(cifar_root), "--out", str(out), "--seeds", "1"]
    assert main(["compare", "cnn-small", "mlp:hidden_size=16", *base]) == 0
    capsys.readouterr()
    assert main(["compare", "cnn-small", SMALL_VIT, *base]) == 2
    error = capsys.readouterr().err
    assert "holds a different study" in error and len(error.strip().splitlines()) == 1


def test_more_jobs_than_the_machine_can_hold_are_refused_before_anything_is_made(cifar_root, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["compare", "cnn-small", "mlp", *TINY, "--jobs", "100000", "--data-dir", str(cifar_root), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "training processes on this machine's" in error and len(error.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["compare", "cnn-small", "mlp", *TINY, "--reuse", str(tmp_path / "typo"), "--data-dir", str(cifar_root), "--out", str(out)]) == 2
    assert "is not a study folder" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("occupied", ["folder", "file"])
def test_a_place_that_is_not_a_study_is_refused_and_left_as_it_was(occupied, cifar_root, tmp_path, capsys):
    out = tmp_path / "project"
    if occupied == "folder":
        out.mkdir()
        (out / "readme.txt").write_text("mine")
    else:
        out.write_text("mine")
    before = sorted(path.name for path in tmp_path.rglob("*"))
    assert main(["compare", "cnn-small", "mlp", *TINY, "--data-dir", str(cifar_root), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert ("not empty" if occupied == "folder" else "is a file") in error and len(error.strip().splitlines()) == 1
    assert sorted(path.name for path in tmp_path.rglob("*")) == before  # no lock file left behind


def test_sweep_varies_a_training_setting_and_a_data_setting(cifar_root, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", "cnn-small", "--vary", "lr=0.001,0.003", *TINY, "--data-dir", str(cifar_root), "--out", str(out)]) == 0
    assert "[" in capsys.readouterr().out  # the table prints seed-aware intervals
    study = json.loads((out / "study.json").read_text())
    assert study["specs"] == ["cnn-small:lr=0.001", "cnn-small:lr=0.003"] and study["vary"] == "lr"
    assert (out / "figures" / "accuracy_vs_lr.png").is_file()
    sizes = tmp_path / "sizes"
    assert main(["compare", "cnn-small", "mlp:hidden_size=16", "--vary", "train_size=40,80", *TINY, "--seeds", "1",
                 "--data-dir", str(cifar_root), "--out", str(sizes)]) == 0
    rows = json.loads((sizes / "results.json").read_text())["rows"]
    assert [row["settings"]["train_size"] for row in rows] == [40, 80, 40, 80]
    assert (sizes / "figures" / "accuracy_vs_train_size.png").is_file()
    summary = json.loads((sizes / "results.json").read_text())
    assert [(gap["value"], gap["curve"], gap["minus_curve"]) for gap in summary["gaps"]] == [(40, "mlp:hidden_size=16", "cnn-small"),
                                                                                          (80, "mlp:hidden_size=16", "cnn-small")]
    assert [(c["first"], c["last"]) for c in summary["gap_changes"]] == [(40, 80)]
    assert [(step["spec"], step["minus"]) for step in summary["steps"]] == [  # neighbours on the same curve only
        ("cnn-small:train_size=80", "cnn-small:train_size=40"), ("mlp:hidden_size=16,train_size=80", "mlp:hidden_size=16,train_size=40")]
    assert summary["gap_changes"][0]["change"]["ci_low"] is None  # one seed: no interval
    assert "How that gap changes from the first train_size to the last" in (sizes / "results.md").read_text()
    assert (sizes / "figures" / "gaps_vs_train_size.png").is_file()
    assert json.loads((sizes / "runs" / "cnn-small_train_size-40" / "seed0" / "results.json").read_text())["train_images"] == 40


def test_a_tuple_budget_study_can_be_resumed(cifar_root, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["sweep", "--model", "cnn-small", "--vary", "lr=0.001,0.003", "--channels", "8,16", *TINY, "--seeds", "1",
            "--data-dir", str(cifar_root), "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    assert "0 to train" in capsys.readouterr().out


def test_a_second_process_on_the_same_study_folder_is_refused_and_the_first_finishes(cifar_root, tmp_path):
    out = tmp_path / "study"
    command = ["compare", "cnn-small", "mlp:hidden_size=16", *TINY, "--epochs", "2", "--data-dir", str(cifar_root), "--out", str(out)]
    first = vitlab_process(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "study.json").exists():
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)  # hold the first process inside its lock, however fast the machine
    try:
        assert first.poll() is None, "the first study finished before it could be paused"
        second = vitlab_process(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, error = second.communicate(timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2 and "is in use by another vitlab process" in error
    _, first_error = first.communicate(timeout=600)
    assert first.returncode == 0, first_error
    assert len(list(out.glob("runs/*/*/results.json"))) == 4


def test_a_run_another_process_is_training_is_not_started_again_and_the_study_finishes_later(cifar_root, tmp_path, capsys):
    """What a cluster does when the study's own process was killed but its jobs still run: the next
    submission must not train the same run folder a second time."""
    out = tmp_path / "study"
    args = ["compare", "cnn-small", "mlp:hidden_size=16", *TINY, "--data-dir", str(cifar_root), "--out", str(out)]
    assert main(args) == 0
    busy_run, other_run = out / "runs" / "mlp_hidden_size-16" / "seed1", out / "runs" / "cnn-small" / "seed0"
    shutil.rmtree(busy_run)
    shutil.rmtree(other_run)
    capsys.readouterr()
    with run_lock(busy_run):  # as a job of an earlier submission would hold it
        assert main(args) == 2
        captured = capsys.readouterr()
        assert "1 run(s) are still being trained by other processes" in captured.err and len(captured.err.strip().splitlines()) == 1
        assert "being trained by another process" in captured.out and "1 to train" in captured.out
        assert (other_run / "results.json").is_file() and not busy_run.exists()
        with pytest.raises(VitlabError, match="being trained by another process"):
            run_one(None, busy_run)  # a job started anyway is refused before it touches the folder
    assert main(args) == 0
    assert "3 already finished, 1 to train" in capsys.readouterr().out
    assert len(list(out.glob("runs/*/*/results.json"))) == 4


def test_a_killed_study_resumes_without_redoing_finished_runs(cifar_root, tmp_path):
    out = tmp_path / "study"
    command = ["compare", "mlp:hidden_size=16", SMALL_VIT, *TINY, "--epochs", "3", "--data-dir", str(cifar_root), "--out", str(out)]
    process = vitlab_process(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("runs/*/*/results.json")):
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    wait_until_the_group_has_exited(process.pid)
    finished = {path: path.stat().st_mtime_ns for path in out.glob("runs/*/*/results.json")}
    assert 1 <= len(finished) < 4, "kill the study half-way"
    rerun = vitlab_process(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    assert f"{len(finished)} already finished" in stdout
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    assert len(list(out.glob("runs/*/*/results.json"))) == 4


def start_a_parallel_study_with_two_runs_in_progress(cifar_root, tmp_path) -> tuple[subprocess.Popen, Path]:
    """A 2-job study in its own process group, returned once both runs have checkpointed (real CIFAR-10 only)."""
    if real_cifar10_root() is None:
        pytest.skip("needs real CIFAR-10 ($VITLAB_DATA): the parallel workers are fresh processes that check the real checksums")
    out = tmp_path / "study"
    command = ["compare", "mlp:hidden_size=16", SMALL_VIT, *TINY, "--epochs", "300", "--jobs", "2", "--data-dir", str(cifar_root),
               "--out", str(out)]
    process = vitlab_process(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("runs/*/*/checkpoint.pt"))) < 2:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    return process, out


def test_ctrl_c_on_a_parallel_study_exits_130_and_the_study_resumes(cifar_root, tmp_path):
    process, out = start_a_parallel_study_with_two_runs_in_progress(cifar_root, tmp_path)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group gets SIGINT
    _, error = process.communicate(timeout=240)
    assert process.returncode == 130, error
    assert "run the same command to resume" in error
    assert not list(out.glob("runs/*/*/results.json")) or len(list(out.glob("runs/*/*/results.json"))) < 4


def test_sigterm_to_a_parallel_studys_parent_alone_stops_its_workers(cifar_root, tmp_path):
    process, out = start_a_parallel_study_with_two_runs_in_progress(cifar_root, tmp_path)
    process.send_signal(signal.SIGTERM)  # `kill PID`: the parent only, not its process group
    _, error = process.communicate(timeout=240)
    assert process.returncode == 130, error
    checkpoints = {path: path.stat().st_mtime_ns for path in out.glob("runs/*/*/checkpoint.pt")}
    time.sleep(3)  # a worker still training would rewrite its checkpoint every epoch (a fraction of a second here)
    assert {path: path.stat().st_mtime_ns for path in out.glob("runs/*/*/checkpoint.pt")} == checkpoints


def test_identical_runs_are_reused_from_another_study_instead_of_trained_again(cifar_root, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    base = [*TINY, "--data-dir", str(cifar_root)]
    assert main(["compare", "cnn-small", "mlp:hidden_size=16", *base, "--out", str(first)]) == 0
    capsys.readouterr()
    assert main(["sweep", "--model", "mlp", "--vary", "hidden_size=16,24", *base, "--out", str(second), "--reuse", str(first)]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("== ") for line in out.splitlines()) == 2 and "2 to train" in out  # hidden_size=16 (seeds 0, 1) reused; 24 trained
    reused = json.loads((second / "runs" / "mlp_hidden_size-16" / "seed0" / "results.json").read_text())
    original = json.loads((first / "runs" / "mlp_hidden_size-16" / "seed0" / "results.json").read_text())
    assert reused["reused_from"].endswith("mlp_hidden_size-16/seed0") and reused["test_acc"] == original["test_acc"]


def test_a_lock_file_that_cannot_be_opened_is_a_one_line_error(tmp_path):
    blocked = tmp_path / "runs" / "cnn-small" / "seed0"
    run_lock_path(blocked).mkdir(parents=True)  # a folder where the lock file should be
    assert lock_holder(run_lock_path(blocked)) is None
    with pytest.raises(VitlabError, match="cannot open the lock file .*delete what is in its place"):
        with run_lock(blocked):
            pass
