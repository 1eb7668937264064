"""Studies through submitit: each run a job (Slurm on a cluster; submitit's local executor here), the study
folder the one source of truth, resumed by running the same command again after a kill."""

import os
import signal
import subprocess
import time

import pytest

from conftest import real_cifar10_root, vitlab_process, wait_until_the_group_has_exited
from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.study.launch import check_launcher, slurm_parameters, submitit_parameters

pytest.importorskip("submitit")

TINY = ["--subset", "200", "--test_subset", "100", "--batch-size", "50", "--progress", "false", "--seeds", "2"]


def test_slurm_parameters_are_key_value_pairs():
    assert slurm_parameters(["partition=gpu", "timeout_min=120", "gpus_per_node=1"]) == {
        "partition": "gpu", "timeout_min": 120, "gpus_per_node": 1}
    with pytest.raises(VitlabError, match="--slurm needs KEY=VALUE"):
        slurm_parameters(["gpu"])


def test_slurm_parameters_get_submitits_names_and_unknown_ones_are_refused(cifar_root, tmp_path, capsys):
    assert submitit_parameters({"partition": "gpu", "timeout_min": 120, "slurm_qos": "high", "gpus_per_node": 1}) == {
        "slurm_partition": "gpu", "timeout_min": 120, "slurm_qos": "high", "gpus_per_node": 1}
    for bad in ("abc", -5, 1.5, True):
        with pytest.raises(VitlabError, match="expected a whole number of at least 1"):
            submitit_parameters({"timeout_min": bad})
    assert main(["compare", "cnn-small", "mlp", *TINY, "--epochs", "1", "--launcher", "slurm", "--slurm", "partitoin=gpu",
                 "--data-dir", str(cifar_root), "--out", str(tmp_path / "s")]) == 2
    error = capsys.readouterr().err
    assert "--slurm partitoin=...: not a Slurm parameter submitit knows" in error and "partition" in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_a_study_through_submitits_local_executor_resumes_after_a_kill(cifar_root, tmp_path, capsys):
    if real_cifar10_root() is None:
        pytest.skip("needs real CIFAR-10 ($VITLAB_DATA): submitit's jobs are fresh processes that check the real checksums")
    out = tmp_path / "study"
    command = ["compare", "cnn-small", "mlp:hidden_size=16", *TINY, "--epochs", "3", "--jobs", "2", "--launcher", "submitit-local",
               "--data-dir", str(cifar_root), "--out", str(out)]
    process = vitlab_process(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("runs/*/*/results.json")):
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the study and its job processes
    process.wait()
    wait_until_the_group_has_exited(process.pid)  # a killed job holds its run's lock until its exit completes
    finished = {path: path.stat().st_mtime_ns for path in out.glob("runs/*/*/results.json")}
    assert 1 <= len(finished) < 4
    capsys.readouterr()
    assert main(command) == 0
    output = capsys.readouterr().out
    assert f"{len(finished)} already finished" in output and "job" in output
    assert {path: path.stat().st_mtime_ns for path in finished} == finished  # finished runs were kept, not retrained
    assert len(list(out.glob("runs/*/*/results.json"))) == 4 and (out / "results.md").is_file()


def test_slurm_parameters_without_the_slurm_launcher_are_refused(cifar_root, tmp_path, capsys):
    assert main(["compare", "cnn-small", "mlp", *TINY, "--epochs", "1", "--launcher", "submitit-local", "--slurm", "partition=gpu",
                 "--data-dir", str(cifar_root), "--out", str(tmp_path / "s")]) == 2
    assert "--slurm parameters apply to --launcher slurm only" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_the_slurm_launcher_without_slurm_is_refused_before_the_study_folder_is_made(cifar_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("shutil.which", lambda name: None)  # a machine without Slurm, whatever this one has
    with pytest.raises(VitlabError, match="needs Slurm's sbatch"):
        check_launcher("slurm", {"partition": "gpu"})
    out = tmp_path / "study"
    assert main(["compare", "cnn-small", "mlp", *TINY, "--epochs", "1", "--launcher", "slurm", "--data-dir", str(cifar_root),
                 "--out", str(out)]) == 2
    assert "needs Slurm's sbatch" in capsys.readouterr().err and not out.exists()
