"""Crash-safe training checkpoints.

A checkpoint holds everything needed to continue a run exactly where it stopped: model, optimizer and
schedule state, both random-number-generator states, the current epoch's image order and position,
the partial sums of that epoch, and the history. It is written atomically (temporary file, fsync,
rename), so a crash mid-write leaves the previous checkpoint intact, and read with
`torch.load(weights_only=True)`, so a tampered file cannot run code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from vitlab.errors import VitlabError
from vitlab.io import atomic_write
from vitlab.rundir import CHECKPOINT_FILE  # noqa: F401  (re-exported: where checkpoints live in a run folder)


class TrainingInterrupted(Exception):
    """Raised after SIGINT/SIGTERM once a checkpoint has been saved."""


@dataclass
class Progress:
    """Where training stands inside the epoch in progress."""

    epoch: int = 1  # the epoch in progress, 1-based
    step: int = 0  # steps of that epoch already taken
    order: torch.Tensor | None = None  # that epoch's image order (None: not drawn yet)
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


@dataclass
class TrainingState:
    """Everything that changes while training, besides the weights: what a checkpoint saves and restores."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    batch_generator: torch.Generator  # batch order and augmentation (on the training device)
    host_generator: torch.Generator  # scalar draws read on the host (MixUp/CutMix)
    device: torch.device
    ema: object | None = None  # vitlab.train.ema.WeightAverage, if the run averages its weights

    def state_dict(self, progress: Progress, history: list[dict], train_seconds: float, train_images_seen: int) -> dict:
        cuda = self.device.type == "cuda"
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
            "torch_rng": torch.get_rng_state(), "batch_rng": self.batch_generator.get_state(),
            "host_batch_rng": self.host_generator.get_state(),
            # Dropout on a GPU draws from the device's own generator.
            "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else torch.empty(0, dtype=torch.uint8),
            "device_type": self.device.type,
            "ema": self.ema.state_dict() if self.ema is not None else [],
            "progress": dataclasses.asdict(progress), "history": history,
            "train_seconds": train_seconds, "train_images_seen": train_images_seen,
        }

    def load_state_dict(self, state: dict) -> tuple[Progress, list[dict], float, int]:
        """Restore everything; returns (progress, history, train_seconds, train_images_seen)."""
        saved_device = state.get("device_type", "cpu")
        if saved_device != self.device.type:
            raise VitlabError(f"the checkpoint was written on {saved_device} and this run is on {self.device.type}; "
                              f"resume it with --device {saved_device} (a run's random streams cannot move between devices)")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            torch.set_rng_state(state["torch_rng"])
            self.batch_generator.set_state(state["batch_rng"])
            if "host_batch_rng" in state and self.host_generator is not self.batch_generator:
                self.host_generator.set_state(state["host_batch_rng"])
            if self.device.type == "cuda" and state.get("cuda_rng") is not None and state["cuda_rng"].numel():
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            progress = Progress(**state["progress"])
            history, seconds, seen = list(state["history"]), float(state["train_seconds"]), int(state["train_images_seen"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0][:200]
            raise VitlabError(f"the checkpoint does not fit this run ({reason}); it comes from another model or config") from None
        check_progress(progress, history, seconds, seen)
        if progress.order is not None:
            progress.order = progress.order.to(self.device)
        return progress, history, seconds, seen


def check_progress(progress: Progress, history: list[dict], seconds: float, seen: int) -> None:
    """Refuse a checkpoint whose progress and history do not describe one run (edited or damaged), before anything
    is written: history holds epochs 1 .. epoch-1 in order, each with a validation accuracy."""
    epochs = [record.get("epoch") if isinstance(record, dict) else None for record in history]
    accuracies_ok = all(isinstance(record.get("val_acc"), (int, float)) for record in history if isinstance(record, dict))
    problem = (f"its epoch in progress is {progress.epoch}" if not isinstance(progress.epoch, int) or progress.epoch < 1 else
               f"its history holds epochs {epochs[:5]}{'...' if len(epochs) > 5 else ''} where epochs 1 to {progress.epoch - 1} belong"
               if epochs != list(range(1, progress.epoch)) else
               "a history record has no validation accuracy" if not accuracies_ok else
               "its step, time or image counts are negative" if min(progress.step, progress.seen, seconds, seen) < 0 else None)
    if problem is not None:
        raise VitlabError(f"the checkpoint is inconsistent ({problem}); it was edited or damaged: delete the run folder and train it again")


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint with the safe loader; any failure is one clear line."""
    if not path.is_file():
        raise VitlabError(f"no checkpoint at {path}; only runs trained by this version of vitlab can be resumed")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle, code that weights_only refuses to run
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise VitlabError(f"refused to load {path}: it holds objects that could run code when loaded, which no vitlab "
                              f"checkpoint does; delete {path.parent} and train the run again") from None
        reason = str(error).strip().splitlines()[0][:200]
        raise VitlabError(f"cannot load checkpoint {path} ({reason}); it is corrupt or truncated: delete {path.parent} "
                          "and train the run again") from None
    if not isinstance(state, dict):
        raise VitlabError(f"{path} is not a vitlab checkpoint; delete {path.parent} and train the run again")
    return state


class StopFlag:
    """Set by SIGINT or SIGTERM while training, so the loop can save a checkpoint and stop cleanly."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __bool__(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stop_on_signals():
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be installed from the main thread
        return

    def handler(signum, frame):
        flag.signal_name = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
