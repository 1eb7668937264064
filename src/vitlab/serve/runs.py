"""The runs `vitlab serve` shows: every folder is checked and its model loaded before the server starts,
so a typo or an unfinished run is a one-line error in the terminal, not a broken page."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from vitlab.data import CLASSES
from vitlab.errors import VitlabError
from vitlab.io import resolved
from vitlab.models.base import VitlabModel
from vitlab.rundir import RESULTS_FILE, RunDir

IMAGE_SIZE = 32  # CIFAR-10's; the gallery and every upload are shown to the models at this size


@dataclass
class ServedRun:
    """A finished run folder with its model loaded (on the CPU) and the names the page shows."""

    name: str
    folder: RunDir
    model: VitlabModel
    classes: list[str]
    test_acc: float
    # Gradio answers events in threads; Grad-CAM's hooks and eval_mode() need the model to themselves.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def kind(self) -> str:
        """'vit' (attention rollout and per-layer/per-head attention), 'cnn' (Grad-CAM) or 'other' (predictions only)."""
        if self.model.returns_attention and getattr(self.model.config, "num_blocks", 0) > 0:
            return "vit"
        if self.model.has_stages:
            return "cnn"
        return "other"

    def title(self) -> str:
        return f"{self.name}: {self.model.name}, {self.model.num_parameters:,} parameters, test accuracy {self.test_acc:.2f}%"


def load_run(path: str | Path, name: str | None = None) -> ServedRun:
    """Check a run folder and load its model; a `VitlabError` naming the problem and the fix otherwise."""
    folder = RunDir(path)
    if folder.path.is_file():
        raise VitlabError(f"{folder.path} is a file; pass a run folder written by 'vitlab train'")
    folder.require_exists()
    state = folder.state()
    if state == "resumable":
        raise VitlabError(f"{folder.path} has not finished training (no {RESULTS_FILE}); let it finish or continue it with "
                          f"'vitlab train --resume {folder.path}'")
    if state == "new":
        raise VitlabError(f"{folder.path} is not a finished run folder (no {RESULTS_FILE}); pass a folder written by 'vitlab train'")
    results = folder.results()
    model = folder.model().eval()
    classes, size = tuple(model.input_spec.classes), getattr(model.config, "image_size", IMAGE_SIZE)
    if classes != tuple(CLASSES) or size != IMAGE_SIZE:
        raise VitlabError(f"{folder.path} holds a model for {len(classes)} classes of {size}×{size} images ({model.input_spec.dataset}); "
                          f"vitlab serve shows CIFAR-10 ({len(CLASSES)} classes, {IMAGE_SIZE}×{IMAGE_SIZE}), pass a CIFAR-10 run")
    return ServedRun(name or folder.path.name, folder, model, list(classes), float(results["test_acc"]))


def load_runs(paths: list[str | Path]) -> list[ServedRun]:
    """Every run folder in `paths`, each once, named by its folder (by its path where two folders share a name)."""
    if not paths:
        raise VitlabError("no run folder given; pass one or more folders written by 'vitlab train'")
    paths_resolved = [resolved(path) for path in paths]
    for index, path in enumerate(paths_resolved):
        if path in paths_resolved[:index]:
            raise VitlabError(f"{paths[index]} is given twice; pass each run folder once")
    names = [Path(path).name or str(path) for path in paths]
    return [load_run(path, name if names.count(name) == 1 else str(path)) for path, name in zip(paths, names, strict=True)]
