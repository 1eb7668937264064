"""A whole run from config to run folder: the one path used by `vitlab train` (and by studies)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from vitlab.config import DataConfig, RunConfig
from vitlab.data import CIFAR10
from vitlab.errors import RunStopped, VitlabError
from vitlab.kernels import kernel_status
from vitlab.kernels.cores import core_round_trip_ns
from vitlab.models import VitlabModel, model_from_config
from vitlab.models.flops import forward_flops_per_image
from vitlab.provenance import cpu_description, device_description, git_commit, measured_matmul_peak, versions
from vitlab.rundir import RunDir, default_run_path
from vitlab.train.checkpoint import TrainingInterrupted
from vitlab.train.distributed import SINGLE, DistContext, barrier, context_from_environment
from vitlab.train.evaluate import Evaluation, evaluate
from vitlab.train.host_memory import keep_freed_memory, release_freed_memory
from vitlab.train.optim import parameter_groups
from vitlab.train.trainer import Runner

# Validation accuracies (%) whose first crossing is recorded, as the CIFAR-10 speed records compare runs.
TIME_TO_ACCURACY_TARGETS = (50, 60, 70, 80, 90, 94)


def time_to_accuracy(history: list[dict], targets: tuple[int, ...] = TIME_TO_ACCURACY_TARGETS) -> dict[str, float | None]:
    """Training seconds (validation excluded) at the end of the first epoch whose validation accuracy
    reached each target; None for a target never reached."""
    reached: dict[str, float | None] = {str(target): None for target in targets}
    elapsed = 0.0
    for record in history:
        elapsed += record["epoch_seconds"]
        for target in targets:
            if reached[str(target)] is None and record["val_acc"] >= target:
                reached[str(target)] = elapsed
    return reached


def load_run_data(config: DataConfig, data_dir: str | None = None) -> CIFAR10:
    """The dataset a run's DataConfig describes (`data_dir` overrides where to look for CIFAR files)."""
    from vitlab.datasets import load_dataset

    return load_dataset(dataclasses.replace(config, data_dir=data_dir or config.data_dir))


def fit_to_data(run: RunConfig, data: CIFAR10) -> RunConfig:
    """The run with the model settings the data decides (image size, number of classes) taken from the data."""
    image_size, classes = data.train_images.shape[-1], len(data.classes)
    fields = {f.name for f in dataclasses.fields(run.model)}
    values = {name: value for name, value in (("image_size", image_size), ("num_classes", classes)) if name in fields}
    return dataclasses.replace(run, model=dataclasses.replace(run.model, **values))


def build_run_model(run: RunConfig) -> VitlabModel:
    torch.manual_seed(run.train.seed)  # the same seed always gives the same initial weights
    return model_from_config(run.model)


def train_run(run: RunConfig, out_dir: str | Path | None = None, data: CIFAR10 | None = None) -> dict:
    """Train, validate, test and write the run folder; returns the results dictionary.

    Everything that can be checked is checked before the folder is created, so a bad config or
    missing data leaves nothing behind. `data` may be passed in when several runs share it (studies).
    """
    data = data if data is not None else load_run_data(run.data)
    if len(data.train_images) == 0 or len(data.val_images) == 0:
        raise VitlabError("the training or validation split is empty; raise --subset or --train_size, or change --val_fraction")
    run = fit_to_data(run, data)
    model = build_run_model(run)
    parameter_groups(model, run.train)  # refuses an optimiser the model cannot take (e.g. Muon without filters)
    distributed = context_from_environment(run.train.device)
    check_device(run)
    folder = RunDir(out_dir if out_dir else default_run_path(run.preset or run.model_name))
    if distributed.is_main:
        folder.prepare()
    with training_lock(folder, distributed):
        if distributed.is_main:
            folder.write_config(run)
        barrier(distributed)
        return finish_run(run, model, data, folder, resume=False, distributed=distributed)


def training_lock(folder: RunDir, distributed: DistContext):
    """The run folder's lock, held by the process that writes the folder (rank 0); a no-op for the other ranks."""
    return folder.training_lock() if distributed.is_main else contextlib.nullcontext()


def check_device(run: RunConfig) -> None:
    """Refuse a device, precision or logger this machine cannot run before any folder is made."""
    from vitlab.train.device import pick_device, resolve_precision

    resolve_precision(run.train.precision, pick_device(run.train.device))
    if run.train.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise VitlabError("--tensorboard needs the tensorboard package; pip install 'vitlab[tensorboard]'") from None


def resume_run(run_dir: str | Path) -> dict:
    """Continue a run from its checkpoint (after a crash, a kill or Ctrl-C) and finish it."""
    folder = RunDir(run_dir)
    folder.require_exists()
    state = folder.state()
    if state == "finished":
        raise VitlabError(f"{run_dir} has finished (it has {folder.results_file.name}); there is nothing to resume")
    if state == "new":
        hint = (f"it stopped before its first checkpoint: start it again with the same command and --out {run_dir}"
                if folder.config_file.is_file() else "pass a folder written by 'vitlab train'")
        raise VitlabError(f"{run_dir} has no checkpoint to resume; {hint}")
    run = folder.config()
    model = build_run_model(run)
    distributed = context_from_environment(run.train.device)
    with training_lock(folder, distributed):
        return finish_run(run, model, load_run_data(run.data), folder, resume=True, distributed=distributed)


def training_images(run: RunConfig, data: CIFAR10) -> int:
    """How many images the run trains on: the training split, plus the validation split when it trains on it too."""
    return len(data.train_images) + (len(data.val_images) if run.data.train_on_validation else 0)


def finish_run(run: RunConfig, model: VitlabModel, data: CIFAR10, folder: RunDir, resume: bool, distributed: DistContext = SINGLE) -> dict:
    from vitlab.train.monitor import WATCHED_IMAGES, SnapshotRecorder, TensorBoardLogger

    code_commit = git_commit()  # read once per process, before training: a later commit is not the code it runs
    runner = Runner(model, run.train, run.data, history_file=folder.metrics_file, distributed=distributed)
    loggers = []
    if distributed.is_main and (run.train.tensorboard or run.train.gif):
        watched = data.val_images[:WATCHED_IMAGES], data.val_labels[:WATCHED_IMAGES]
        if run.train.gif:
            runner.epoch_end_hooks.append(SnapshotRecorder(model, *watched, folder))
        if run.train.tensorboard:
            loggers.append(TensorBoardLogger(model, watched[0], folder))
            runner.epoch_end_hooks.append(loggers[-1])
    peak = measured_matmul_peak(runner.device) if distributed.is_main else None
    # whether the CPU's cores shared a cache, before and after training (it moved steps on a cloud machine). Only for a
    # single process training on several threads: a one-thread run shares nothing between cores, and beside other
    # processes (DDP ranks, a sweep's parallel jobs) the probe's two spinning threads would take their cores
    probe_cores = runner.device.type == "cpu" and not distributed.enabled and torch.get_num_threads() > 1
    cores_before = core_round_trip_ns() if probe_cores else None
    if run.train.progress and distributed.is_main:
        included = " (the validation images included)" if run.data.train_on_validation else ""
        print(f"{'resuming' if resume else 'training'} {run.preset or run.model_name} ({model.num_parameters:,} parameters) on "
              f"{training_images(run, data):,} images{included}, {runner.device} {runner.precision}; run folder {folder}", flush=True)
    try:
        history = runner.fit(data, folder.checkpoint_file, run.train.checkpoint_every, resume=resume)
    except TrainingInterrupted as stop:
        raise RunStopped(f"stopped by {stop}; checkpoint saved, continue with: vitlab train --resume {folder}") from None
    finally:
        for logger in loggers:
            logger.close()
        release_freed_memory()  # the steps' kept memory back to the OS: the next run in this process starts trimmed
    cores_after = core_round_trip_ns() if probe_cores else None
    test = runner.evaluate(data.test_images, data.test_labels)
    if not distributed.is_main:  # every rank tested the same weights; rank 0 writes the folder
        barrier(distributed)
        return {"test_acc": test.accuracy, "test_loss": test.loss, "out_dir": str(folder), "rank": distributed.rank}
    model.save(folder.path)
    folder.save_predictions(test.labels, test.predictions, test.probabilities)
    results = {
        "model": run.model_name,
        "preset": run.preset,
        "test_loss": test.loss,
        "test_acc": test.accuracy,
        "best_val_acc": max(record["val_acc"] for record in history),
        "final_val_acc": history[-1]["val_acc"],
        "per_class_acc": test.per_class_accuracy(data.classes),
        "dataset": data.name,
        "classes": list(data.classes),
        "params": model.num_parameters,
        "flops_per_image": forward_flops_per_image(model, image_size=data.test_images.shape[-1]),
        "epochs": runner.epochs,
        "train_images": training_images(run, data),
        "validation_images_in_training": run.data.train_on_validation,
        "test_images": len(data.test_images),
        "train_seconds": runner.train_seconds,
        # With the validation images in training, "validation accuracy" is training accuracy: no time-to-accuracy.
        "time_to_accuracy": None if run.data.train_on_validation else time_to_accuracy(history),
        "images_per_second": runner.train_images_seen / runner.train_seconds,
        "device": device_description(runner.device),
        "cpu": cpu_description(),
        "bf16_matmul_peak_tflop_s": peak,
        # a cache line's round trip between two cores, ns (tens: a shared L3; hundreds: none), or None where not probed
        "core_round_trips_ns": [cores_before, cores_after] if probe_cores else None,
        "precision": runner.precision,
        "cpu_kernels": kernel_status() if runner.device.type == "cpu" else None,
        "cpu_freed_memory": keep_freed_memory() if runner.device.type == "cpu" else None,
        "processes": distributed.world_size,
        "resumed": resume,
        "versions": versions(),
        "git_commit": code_commit,
        "data_source": data.source,
    }
    if peak and runner.device.type == "cpu":
        # The time targets of the presets are set for a CPU with a 0.70 TFLOP/s bf16 peak (issue #12).
        results["train_seconds_at_reference_peak"] = runner.train_seconds * peak / REFERENCE_CPU_PEAK_TFLOP_S
    folder.write_results(results)
    from vitlab.inspect.curves import plot_curves

    plot_curves(history, folder.curves_file, title=f"{run.preset or run.model_name}: test accuracy {test.accuracy:.2f}%",
                time_to_accuracy=results["time_to_accuracy"])
    if run.train.gif:
        from vitlab.inspect.gif import write_training_gif

        write_training_gif(folder.path)
    barrier(distributed)
    return results | {"out_dir": str(folder)}


# The bf16 matmul peak of the CPU the presets' time targets are set for (2-core Sapphire Rapids).
REFERENCE_CPU_PEAK_TFLOP_S = 0.70


def evaluate_run(run_dir: str | Path, data_dir: str | None = None, device: str | None = None, figures_dir: str | None = None) -> dict:
    """Re-test a saved run on the test set it was tested on; returns loss, accuracy and per-class accuracy.
    With `figures_dir`, also writes the confusion matrix, per-class accuracy and most confident mistakes."""
    from vitlab.train.device import memory_format_for, pick_device, resolve_precision

    folder = RunDir(run_dir)
    folder.require_exists()
    run = folder.config()
    model = folder.model()
    if model.name != run.model_name:
        raise VitlabError(f"{run_dir} has a '{model.name}' model but its config.json says '{run.model_name}'; the folder mixes two runs")
    data = load_run_data(run.data, data_dir)
    # Evaluate at the precision the run was tested at (results.json records what 'auto' resolved to).
    tested_precision = folder.results().get("precision") if folder.results_file.exists() else None
    target = pick_device(device or run.train.device)
    precision = resolve_precision(tested_precision if tested_precision in ("fp32", "bf16") else run.train.precision, target)
    memory_format = memory_format_for(model, run.train)
    test = evaluate(model.to(target, memory_format=memory_format), data.test_images, data.test_labels, batch_size=run.train.eval_batch_size,
                    precision=precision, tta=run.train.tta, tta_shift=run.train.tta_shift, pad_mode=run.data.pad_mode, memory_format=memory_format)
    figures = []
    if figures_dir is not None:
        from vitlab.inspect.figures import confusion_figure, mistakes_figure, per_class_figure

        out, name = Path(figures_dir), run.preset or run.model_name
        classes = tuple(data.classes)
        figures = [
            confusion_figure(test.predictions, test.labels, out / "confusion.png", title=f"{name}: confusion matrix (% of each true class)",
                             classes=classes),
            per_class_figure(test.per_class_accuracy(classes), out / "per_class.png", title=f"{name}: per-class test accuracy"),
            mistakes_figure(data.test_images, test.labels, test.probabilities, out / "mistakes.png", classes=classes),
        ]
    return {
        "run": str(run_dir), "model": run.model_name, "test_images": len(data.test_labels),
        "test_loss": test.loss, "test_acc": test.accuracy, "per_class_acc": test.per_class_accuracy(data.classes),
    } | ({"figures": [str(path) for path in figures]} if figures else {})


__all__ = ["Evaluation", "evaluate_run", "finish_run", "load_run_data", "resume_run", "time_to_accuracy", "train_run"]
