"""A whole run from config to run folder: the one path used by `vitlab train` (and by studies)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vitlab.checkpoint import CHECKPOINT_FILE, TrainingInterrupted
from vitlab.config import DataConfig, RunConfig
from vitlab.data import CIFAR10, load_cifar10
from vitlab.distributed import SINGLE, DistContext, barrier, context_from_environment
from vitlab.errors import RunStopped, VitlabError
from vitlab.flops import forward_flops_per_image
from vitlab.gif import write_training_gif
from vitlab.io import atomic_write, read_json, write_json
from vitlab.models import VitlabModel, build_model
from vitlab.monitor import WATCHED_IMAGES, SnapshotRecorder, TensorBoardLogger
from vitlab.plots import plot_curves
from vitlab.provenance import device_description, git_commit, versions
from vitlab.runner import Evaluation, Runner

CONFIG_FILE, METRICS_FILE, RESULTS_FILE, CURVES_FILE = "config.json", "metrics.jsonl", "results.json", "curves.png"
PREDICTIONS_FILE = "test_predictions.safetensors"


def save_predictions(path: Path, test: Evaluation) -> None:
    """The test set's labels, predicted classes and class probabilities, for paired statistics and figures."""
    tensors = {"labels": test.labels.contiguous(), "predictions": test.predictions.contiguous(),
               "probabilities": test.probabilities.float().contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def load_predictions(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """What `save_predictions` wrote: labels (N,), predictions (N,), probabilities (N, classes)."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        raise VitlabError(f"{run_dir} has no {PREDICTIONS_FILE}; it was trained by an older vitlab; train it again")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises several types for truncated or foreign files
        raise VitlabError(f"{path} is unreadable ({error}); the run folder is damaged, train the run again") from None


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


def default_run_dir(run: RunConfig) -> Path:
    return Path("runs") / f"{run.preset or run.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_out_dir(out_dir: Path) -> None:
    """Refuse a folder that already holds a run, and one that cannot be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise VitlabError(f"--out {out_dir} is a file, not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise VitlabError(f"--out {out_dir} is not empty (it may hold another run); choose a new folder or delete it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise VitlabError(f"cannot write to --out {out_dir} ({error.strerror or error}); choose a writable folder") from None


def load_run_data(config: DataConfig, data_dir: str | None = None) -> CIFAR10:
    """CIFAR-10 as a run's DataConfig describes it (`data_dir` overrides where to look)."""
    return load_cifar10(
        data_dir or config.data_dir, val_fraction=config.val_fraction, split_seed=config.split_seed,
        subset=config.subset, test_subset=config.test_subset, download_if_missing=config.download,
    )


def build_run_model(run: RunConfig) -> VitlabModel:
    torch.manual_seed(run.train.seed)  # the same seed always gives the same initial weights
    return build_model(run.model, **run.model_config)


def train_run(run: RunConfig, out_dir: str | Path | None = None) -> dict:
    """Train, validate, test and write the run folder; returns the results dictionary.

    Everything that can be checked is checked before the folder is created, so a bad config or
    missing data leaves nothing behind.
    """
    model = build_run_model(run)
    data = load_run_data(run.data)
    distributed = context_from_environment(run.train.device)
    out_dir = Path(out_dir) if out_dir else default_run_dir(run)
    run = dataclasses.replace(run, model_config=dataclasses.asdict(model.config))  # record every default too
    if distributed.is_main:
        prepare_out_dir(out_dir)
        write_json(out_dir / CONFIG_FILE, run.to_dict())
    barrier(distributed)
    return finish_run(run, model, data, out_dir, resume=False, distributed=distributed)


def resume_run(run_dir: str | Path) -> dict:
    """Continue a run from its checkpoint (after a crash, a kill or Ctrl-C) and finish it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VitlabError(f"run folder {run_dir} does not exist; pass a folder written by 'vitlab train'")
    if (run_dir / RESULTS_FILE).exists():
        raise VitlabError(f"{run_dir} has finished (it has {RESULTS_FILE}); there is nothing to resume")
    run = RunConfig.from_dict(read_json(run_dir / CONFIG_FILE, "run config"))
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise VitlabError(f"{run_dir} has no {CHECKPOINT_FILE}; only runs trained by this version of vitlab can be resumed")
    model = build_run_model(run)
    distributed = context_from_environment(run.train.device)
    return finish_run(run, model, load_run_data(run.data), run_dir, resume=True, distributed=distributed)


def finish_run(run: RunConfig, model: VitlabModel, data: CIFAR10, out_dir: Path, resume: bool, distributed: DistContext = SINGLE) -> dict:
    runner = Runner(model, run.train, run.data, history_file=out_dir / METRICS_FILE, distributed=distributed)
    loggers = []
    if distributed.is_main and (run.train.tensorboard or run.train.gif):
        watched = data.val_images[:WATCHED_IMAGES], data.val_labels[:WATCHED_IMAGES]
        if run.train.gif:
            runner.epoch_end_hooks.append(SnapshotRecorder(model, *watched, out_dir))
        if run.train.tensorboard:
            loggers.append(TensorBoardLogger(model, watched[0], out_dir))
            runner.epoch_end_hooks.append(loggers[-1])
    if run.train.progress and distributed.is_main:
        print(f"{'resuming' if resume else 'training'} {run.preset or run.model} ({model.num_parameters:,} parameters) on "
              f"{len(data.train_images):,} images, {runner.device} {runner.precision}; run folder {out_dir}", flush=True)
    try:
        history = runner.fit(data, out_dir / CHECKPOINT_FILE, run.train.checkpoint_every, resume=resume)
    except TrainingInterrupted as stop:
        raise RunStopped(f"stopped by {stop}; checkpoint saved, continue with: vitlab train --resume {out_dir}") from None
    finally:
        for logger in loggers:
            logger.close()
    test = runner.evaluate(data.test_images, data.test_labels)
    if not distributed.is_main:  # every rank tested the same weights; rank 0 writes the folder
        barrier(distributed)
        return {"test_acc": test.accuracy, "test_loss": test.loss, "out_dir": str(out_dir), "rank": distributed.rank}
    model.save(out_dir)
    save_predictions(out_dir / PREDICTIONS_FILE, test)
    results = {
        "model": run.model,
        "preset": run.preset,
        "test_loss": test.loss,
        "test_acc": test.accuracy,
        "best_val_acc": max(record["val_acc"] for record in history),
        "final_val_acc": history[-1]["val_acc"],
        "per_class_acc": test.per_class_accuracy(data.classes),
        "params": model.num_parameters,
        "flops_per_image": forward_flops_per_image(model),
        "epochs": run.train.epochs,
        "train_images": len(data.train_images),
        "test_images": len(data.test_images),
        "train_seconds": runner.train_seconds,
        "time_to_accuracy": time_to_accuracy(history),
        "images_per_second": runner.train_images_seen / runner.train_seconds,
        "device": device_description(runner.device),
        "precision": runner.precision,
        "processes": distributed.world_size,
        "resumed": resume,
        "versions": versions(),
        "git_commit": git_commit(),
        "data_source": data.source,
    }
    write_json(out_dir / RESULTS_FILE, results)
    plot_curves(history, out_dir / CURVES_FILE, title=f"{run.preset or run.model}: test accuracy {test.accuracy:.2f}%")
    if run.train.gif:
        write_training_gif(out_dir)
    barrier(distributed)
    return results | {"out_dir": str(out_dir)}


def evaluate_run(run_dir: str | Path, data_dir: str | None = None, device: str | None = None, figures_dir: str | None = None) -> dict:
    """Re-test a saved run on the test set it was tested on; returns loss, accuracy and per-class accuracy.
    With `figures_dir`, also writes the confusion matrix, per-class accuracy and most confident mistakes."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VitlabError(f"run folder {run_dir} does not exist; pass a folder written by 'vitlab train'")
    run = RunConfig.from_dict(read_json(run_dir / CONFIG_FILE, "run config"))
    model = VitlabModel.load(run_dir)
    if model.name != run.model:
        raise VitlabError(f"{run_dir} has a '{model.name}' model but its config.json says '{run.model}'; the folder mixes two runs")
    data = load_run_data(run.data, data_dir)
    # Evaluate at the precision the run was tested at (results.json records what 'auto' resolved to).
    results_file = run_dir / RESULTS_FILE
    tested_precision = read_json(results_file, "run results").get("precision") if results_file.exists() else None
    train_config = dataclasses.replace(run.train, device=device or run.train.device, progress=False,
                                       precision=tested_precision or run.train.precision)
    runner = Runner(model, train_config, run.data)
    test = runner.evaluate(data.test_images, data.test_labels)
    figures = []
    if figures_dir is not None:
        from vitlab.visualize import confusion_figure, mistakes_figure, per_class_figure

        folder, name = Path(figures_dir), run.preset or run.model
        figures = [
            confusion_figure(test.predictions, test.labels, folder / "confusion.png", title=f"{name}: confusion matrix (% of each true class)"),
            per_class_figure(test.per_class_accuracy(data.classes), folder / "per_class.png", title=f"{name}: per-class test accuracy"),
            mistakes_figure(data.test_images, test.labels, test.probabilities, folder / "mistakes.png"),
        ]
    return {
        "run": str(run_dir), "model": run.model, "test_images": len(data.test_labels),
        "test_loss": test.loss, "test_acc": test.accuracy, "per_class_acc": test.per_class_accuracy(data.classes),
    } | ({"figures": [str(path) for path in figures]} if figures else {})
