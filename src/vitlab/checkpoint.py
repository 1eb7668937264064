"""Crash-safe training checkpoints.

A checkpoint holds everything needed to continue a run exactly where it stopped: model, optimizer and
schedule state, both random-number-generator states, the current epoch's image order and position,
the partial sums of that epoch, and the history. It is written atomically (temporary file, fsync,
rename), so a crash mid-write leaves the previous checkpoint intact, and read with
`torch.load(weights_only=True)`, so a tampered file cannot run code.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from vitlab.errors import VitlabError
from vitlab.io import atomic_write

CHECKPOINT_FILE = "checkpoint.pt"


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


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint with the safe loader; any failure is one clear line."""
    if not path.is_file():
        raise VitlabError(f"no checkpoint at {path}; only runs trained by this version of vitlab can be resumed")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle, code that weights_only refuses to run
        reason = str(error).strip().splitlines()[0][:200]
        raise VitlabError(f"cannot load checkpoint {path} ({reason}); it is corrupt, truncated or not a vitlab checkpoint") from None


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
