"""Running a study: every unfinished run of its plan, one or several at a time, resumable.

Running the same command again skips finished runs, resumes runs that have a checkpoint and restarts
runs that died before their first one. The study folder is locked while a process works in it, the
data are read and checksummed once per process (not once per run), and a run that fails is reported
the moment it fails.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch

from vitlab.config import DataConfig, RunConfig
from vitlab.errors import RunStopped, VitlabError
from vitlab.io import ExclusiveLock, lock_holder
from vitlab.rundir import RunDir
from vitlab.study.plan import StudyLock, StudyMember, StudyPlan, check_study_folder, open_study

_DATA_CACHE: dict[str, object] = {}


def cached_data(config: DataConfig):
    """The data a DataConfig describes, read once per process."""
    from vitlab.train.run import load_run_data

    key = json.dumps(dataclasses.asdict(config), sort_keys=True)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one dataset at a time is enough and bounds memory
        _DATA_CACHE[key] = load_run_data(config)
    return _DATA_CACHE[key]


def run_lock_path(run_dir: Path) -> Path:
    """The lock file of one study run, beside its folder (STUDY/runs/<spec>/.seed0.lock) so that
    restarting the run can empty or remove the folder while holding it."""
    return Path(run_dir).parent / f".{Path(run_dir).name}.lock"


def run_lock(run_dir: Path) -> ExclusiveLock:
    """Held while a process trains one run of a study: a second process (a job of an earlier submission
    still running on the cluster, say) is refused instead of writing into the same folder."""
    return ExclusiveLock(run_lock_path(run_dir), f"{run_dir} is being trained by another process ({{holder}}), perhaps a job of an "
                         "earlier submission of this study; wait for it to end or cancel it, then run the same command again")


def run_one(run: RunConfig, run_dir: Path) -> dict:
    """Train one member of a study (or finish it): the same code path as `vitlab train`, holding the run's lock."""
    with run_lock(run_dir):
        return _run_one_locked(run, Path(run_dir))


def _run_one_locked(run: RunConfig, run_dir: Path) -> dict:
    from vitlab.train.run import resume_run, train_run

    folder = RunDir(run_dir)
    state = folder.state()
    if state == "finished":
        return folder.results()
    if state == "resumable":
        try:
            return resume_run(run_dir)
        except VitlabError as error:
            raise VitlabError(f"{error}; if the run folder is damaged, delete {run_dir} and run the study again") from None
    if run_dir.exists():  # died before its first checkpoint: nothing worth keeping
        shutil.rmtree(run_dir)
    return train_run(run, run_dir, data=cached_data(run.data))


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into SIGTERM for the runs


def _worker_run(run: RunConfig, run_dir: Path, stop_file: Path) -> tuple[str, dict | str]:
    if stop_file.exists():  # the study is stopping: start nothing new
        return "stopped", "not started"
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return "ok", run_one(run, run_dir)
    except RunStopped as stop:
        return "stopped", str(stop)
    except VitlabError as error:
        return "error", str(error)


def comparable_config(config: RunConfig) -> str:
    """A run's config as JSON, without what does not change the training (its preset's name, the progress bar)."""
    values = config.to_dict()
    values.pop("preset", None)
    values["train"].pop("progress", None)
    return json.dumps(values, sort_keys=True)


def reuse_finished_runs(todo: list[StudyMember], reuse_dirs: list[Path]) -> list[StudyMember]:
    """Copy finished runs with exactly the same config (seed included) from other study folders instead of
    training them again; returns the members still to train. Each copy's results.json names its source."""
    import shutil

    if not reuse_dirs:
        return todo
    finished: dict[str, Path] = {}
    for study in reuse_dirs:  # each checked by run_study before anything was made
        for results in sorted(Path(study).glob("runs/*/seed*/results.json")):
            try:
                finished.setdefault(comparable_config(RunDir(results.parent).config()), results.parent)
            except VitlabError:
                continue  # a damaged run is simply not reused
    remaining = []
    for member in todo:
        source = finished.get(comparable_config(member.config))
        if source is None:
            remaining.append(member)
            continue
        if member.run_dir.exists():
            shutil.rmtree(member.run_dir)
        shutil.copytree(source, member.run_dir, ignore=shutil.ignore_patterns("checkpoint.pt"))
        copy = RunDir(member.run_dir)
        copy.write_config(member.config)  # the same run; this study's preset label
        copy.write_results(copy.results() | {"reused_from": str(source)})
        print(f"== {member.spec.text} seed {member.seed}: reused {source} (same config)", flush=True)
    return remaining


def run_study(plan: StudyPlan, study_dir: str | Path, jobs: int = 1, command: str = "", launcher: str = "local",
              slurm: dict | None = None, reuse: list[str] | None = None) -> Path:
    """Train every run of the study that is not finished; `jobs` runs at a time (CPU threads split evenly)."""
    study_dir = Path(study_dir)
    if jobs < 1:
        raise VitlabError(f"--jobs must be >= 1, got {jobs}")
    cores = os.cpu_count() or 1
    if launcher in ("local", "submitit-local") and jobs > 8 * cores:  # each process holds its own copy of torch and the data
        raise VitlabError(f"--jobs {jobs} would start {jobs} training processes on this machine's {cores} cores; choose at most {cores} "
                          "(runs side by side share the cores), or --launcher slurm to spread them over a cluster")
    from vitlab.study.launch import check_launcher

    check_launcher(launcher, slurm or {})
    members = plan.members(study_dir)  # parses every spec and config before anything is written
    for data_config in {json.dumps(dataclasses.asdict(m.config.data), sort_keys=True): m.config.data for m in members}.values():
        cached_data(data_config)  # missing or corrupt data fails before the folder is made
    for study in reuse or []:
        if not (Path(study) / "study.json").is_file():
            raise VitlabError(f"--reuse {study} is not a study folder (no study.json)")
    check_study_folder(study_dir, plan)  # refused before the lock file is made in a folder that is not the study's
    with StudyLock(study_dir):
        open_study(study_dir, plan, command or shlex.join(["vitlab", *sys.argv[1:]]))
        unfinished = [member for member in members if RunDir(member.run_dir).state() != "finished"]
        busy = {member.run_dir: holder for member in unfinished if (holder := lock_holder(run_lock_path(member.run_dir)))}
        todo = reuse_finished_runs([member for member in unfinished if member.run_dir not in busy], [Path(path) for path in reuse or []])
        print(f"study {study_dir}: {len(members)} runs ({len(plan.specs)} models x {len(plan.seeds)} seeds), "
              f"{len(members) - len(busy) - len(todo)} already finished, {len(todo)} to train"
              + (f", {len(busy)} being trained by other processes" if busy else ""), flush=True)
        for run_dir, holder in busy.items():
            print(f"== {run_dir}: being trained by another process ({holder}); not started again", flush=True)
        if launcher in ("slurm", "submitit-local"):
            from vitlab.study.launch import run_with_submitit

            report_failures(run_with_submitit(todo, study_dir, launcher, jobs, slurm or {}))
        elif jobs == 1 or len(todo) <= 1:
            run_serially(todo)
        else:
            run_in_pool(todo, jobs, study_dir)
    if busy:
        raise VitlabError(f"{len(busy)} run(s) are still being trained by other processes (first: {next(iter(busy))}, held by "
                          f"{next(iter(busy.values()))}), perhaps jobs of an earlier submission; run the same command again when "
                          "they have ended (finished runs are kept)")
    return study_dir


def run_serially(todo: list[StudyMember]) -> None:
    failures = []
    for member in todo:
        print(f"-> {member.spec.text} seed {member.seed} ({RunDir(member.run_dir).state()})", flush=True)
        try:
            results = run_one(member.config, member.run_dir)
        except RunStopped:
            raise
        except VitlabError as error:
            failures.append(f"{member.spec.text} seed {member.seed}: {error}")
            print(f"<- {member.spec.text} seed {member.seed}: did not finish: {error}", flush=True)
            continue
        print(f"<- {member.spec.text} seed {member.seed}: test accuracy {results['test_acc']:.2f}% in {results['train_seconds']:.0f} s", flush=True)
    report_failures(failures)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_in_pool(todo: list[StudyMember], jobs: int, study_dir: Path) -> None:
    jobs = min(jobs, len(todo))  # no idle processes (each would import torch)
    threads = max(1, (os.cpu_count() or 1) // jobs)  # one-thread runs side by side beat one two-thread run (docs/performance.md)
    context = multiprocessing.get_context("spawn")
    failures, stopped = [], False
    stop_file = study_dir / ".stopping"
    stop_file.unlink(missing_ok=True)
    pool = context.Pool(jobs, initializer=_worker_init, initargs=(threads,))
    # `kill PID` on this process alone must stop the workers too (spawned, they would train on): SIGTERM
    # takes the Ctrl-C path below.
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        pending = [(member, pool.apply_async(_worker_run, (dataclasses.replace(
            member.config, train=dataclasses.replace(member.config.train, progress=False)), member.run_dir, stop_file))) for member in todo]
        for member, result in pending:
            status, value = result.get()
            name = f"{member.spec.text} seed {member.seed}"
            if status == "ok":
                print(f"<- {name}: test accuracy {value['test_acc']:.2f}% in {value['train_seconds']:.0f} s", flush=True)
            elif status == "stopped":
                stopped = True
            else:
                failures.append(f"{name}: {value}")
                print(f"<- {name}: did not finish: {value}", flush=True)
    except KeyboardInterrupt:  # the runs in progress got the same Ctrl-C: they checkpoint and stop
        stopped = True
        stop_file.touch()
        for process in pool._pool:  # also when only this process got the signal: SIGTERM checkpoints and stops a run
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
    finally:
        pool.close()
        pool.join()
        stop_file.unlink(missing_ok=True)
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    if stopped:
        raise RunStopped(f"study stopped; finished runs are kept and stopped runs checkpointed; run the same command to resume ({study_dir})")
    report_failures(failures)


def report_failures(failures: list[str]) -> None:
    if failures:
        raise VitlabError(f"{len(failures)} run(s) did not finish, first: {failures[0]}; fix the cause and run the same command again "
                          "(finished runs are kept)")
