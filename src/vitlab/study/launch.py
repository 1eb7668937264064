"""Studies on a cluster: each run of a study becomes a job through submitit (Slurm, or submitit's local executor).

    vitlab compare cnn-small vit --seeds 3 --launcher slurm --slurm partition=gpu --slurm gpus_per_node=1 --out studies/x

The study folder stays the one source of truth: jobs write ordinary run folders under STUDY/runs/, the
job logs go to STUDY/submitit/, and running the same command again resubmits only what is not
finished (runs with a checkpoint resume from it). A job that Slurm stops at its time limit gets
SIGTERM first, on which vitlab saves a checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vitlab.errors import VitlabError

SUBMITIT_FOLDER = "submitit"
# Slurm parameters submitit types as int (checked here: submitit asserts on a string only when it submits).
WHOLE_NUMBER_PARAMETERS = {"timeout_min", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "array_parallelism",
                           "gpus_per_task", "cpus_per_gpu"}


def slurm_parameters(items: list[str]) -> dict:
    """['partition=gpu', 'timeout_min=120'] → {'partition': 'gpu', 'timeout_min': 120}."""
    parameters: dict = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise VitlabError(f"--slurm needs KEY=VALUE (e.g. --slurm partition=gpu), got '{item}'")
        value = value.strip()
        parameters[key.strip()] = int(value) if value.isascii() and value.isdigit() else value
    return parameters


def run_member(run, run_dir: Path) -> dict:
    """What a job runs: one study member, through the same path as a local study."""
    from vitlab.study.execute import run_one

    return run_one(run, run_dir)


def check_launcher(launcher: str, slurm: dict) -> dict:
    """Refuse a launcher that cannot run here, or a Slurm parameter submitit does not know, before the study
    folder is made; returns the Slurm parameters as submitit names them (partition → slurm_partition)."""
    if launcher != "slurm" and slurm:
        raise VitlabError("--slurm parameters apply to --launcher slurm only")
    if launcher not in ("slurm", "submitit-local"):
        return {}
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise VitlabError(f"--launcher {launcher} needs submitit; pip install 'vitlab[cluster]'") from None
    named = submitit_parameters(slurm)
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise VitlabError("--launcher slurm needs Slurm's sbatch, which is not on this machine's PATH; run the command on the "
                          "cluster's login node, or use --launcher local")
    return named


def submitit_parameters(slurm: dict) -> dict:
    """--slurm's parameters under submitit's names (partition → slurm_partition), each one submitit knows, whole numbers
    where submitit wants them."""
    from submitit.auto.auto import AutoExecutor
    from submitit.slurm.slurm import SlurmExecutor

    generic, specific = AutoExecutor._valid_parameters(), SlurmExecutor._valid_parameters()
    named = {}
    for key, value in slurm.items():
        bare = key.removeprefix("slurm_")
        if key in generic:
            named[key] = value
        elif bare in specific:
            named[f"slurm_{bare}"] = value
        else:
            raise VitlabError(f"--slurm {key}=...: not a Slurm parameter submitit knows; use one of "
                              f"{', '.join(sorted(generic | specific))}")
    for key, value in named.items():
        if key.removeprefix("slurm_") in WHOLE_NUMBER_PARAMETERS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise VitlabError(f"--slurm {key}={value}: expected a whole number of at least 1")
    return named


def run_with_submitit(todo, study_dir: Path, launcher: str, jobs: int, slurm: dict) -> list[str]:
    """Submit every member as a job (`jobs` at a time with the local executor), wait, and return the failures."""
    slurm = check_launcher(launcher, slurm)
    import submitit

    folder = Path(study_dir) / SUBMITIT_FOLDER / "%j"
    if launcher == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(**{"timeout_min": 240, "slurm_signal_delay_s": 120, **slurm})
        batch_size = len(todo) or 1  # Slurm queues them all
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        executor.update_parameters(timeout_min=24 * 60)
        batch_size = jobs
    failures = []
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        submitted = [(member, executor.submit(run_member, member.config, member.run_dir)) for member in batch]
        for member, job in submitted:
            name = f"{member.spec.text} seed {member.seed}"
            print(f"-> {name}: job {job.job_id}", flush=True)
        for member, job in submitted:
            name = f"{member.spec.text} seed {member.seed}"
            try:
                results = job.result()
            except Exception as error:  # submitit re-raises the job's exception (or its failure) here
                message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
                failures.append(f"{name}: {message[:300]}")
                print(f"<- {name}: did not finish: {message[:300]} (log: {job.paths.stderr})", flush=True)
                continue
            print(f"<- {name}: test accuracy {results['test_acc']:.2f}% in {results['train_seconds']:.0f} s", flush=True)
    return failures
