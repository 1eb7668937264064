"""The run folder: the one place that knows every file `vitlab train` writes and how to read it back.

    RUN_DIR/
      config.json                  the whole RunConfig (model config with every default, data, recipe)
      metrics.jsonl                one JSON line per epoch, appended as training goes
      checkpoint.pt                everything needed to resume, rewritten atomically
      model.safetensors, model.json   weights and the model's name + config
      results.json                 test accuracy and the rest, written last: its presence means "finished"
      test_predictions.safetensors labels, predictions and probabilities on the test set
      curves.png                   loss and accuracy per epoch
      training.gif, snapshots/     with --gif true
      tensorboard/                 with --tensorboard true
      figures/                     what `evaluate --figures`, `attention` and `explain` write by default
      .vitlab-run                  made first by `vitlab train`; locked while a process trains the run

Only a folder carrying `.vitlab-run` may be cleared as a failed start, so a folder of the user's own that
happens to hold a `config.json` is never touched, and a run being trained is never cleared by a second command.

Every reader turns a missing, truncated or foreign file into a one-line `VitlabError` that says what to do.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitlab.errors import VitlabError
from vitlab.io import ExclusiveLock, lock_holder, read_json, read_tensors, resolved, write_json, write_tensors

if TYPE_CHECKING:
    import torch

    from vitlab.config import RunConfig
    from vitlab.models.base import VitlabModel

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "model.safetensors"
MODEL_FILE = "model.json"
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "test_predictions.safetensors"
CURVES_FILE = "curves.png"
GIF_FILE = "training.gif"
SNAPSHOTS_FOLDER = "snapshots"
SNAPSHOT_IMAGES_FILE = "images.safetensors"
TENSORBOARD_FOLDER = "tensorboard"
FIGURES_FOLDER = "figures"
RUN_MARKER = ".vitlab-run"
# What a run that died before its first checkpoint leaves beside its marker: such a folder may be reused.
FAILED_START_FILES = {CONFIG_FILE, METRICS_FILE, CURVES_FILE, TENSORBOARD_FOLDER, SNAPSHOTS_FOLDER}

# Files a command other than `vitlab train` must never overwrite.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, WEIGHTS_FILE, MODEL_FILE, RESULTS_FILE, PREDICTIONS_FILE)


class RunDir:
    """A run folder, existing or to be made. `RunDir(path).results()`, `.history()`, `.model()`, ..."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoint_file(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def predictions_file(self) -> Path:
        return self.path / PREDICTIONS_FILE

    @property
    def curves_file(self) -> Path:
        return self.path / CURVES_FILE

    @property
    def gif_file(self) -> Path:
        return self.path / GIF_FILE

    @property
    def snapshots(self) -> Path:
        return self.path / SNAPSHOTS_FOLDER

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_FOLDER

    @property
    def figures(self) -> Path:
        return self.path / FIGURES_FOLDER

    # -- state ---------------------------------------------------------------------------------------

    def state(self) -> str:
        """'finished' (has results), 'resumable' (has a checkpoint and a config) or 'new'."""
        if self.results_file.is_file():
            return "finished"
        if self.checkpoint_file.is_file() and self.config_file.is_file():
            return "resumable"
        return "new"

    def require_exists(self) -> None:
        if not self.path.is_dir():
            raise VitlabError(f"run folder {self.path} does not exist; pass a folder written by 'vitlab train'")

    @property
    def marker(self) -> Path:
        return self.path / RUN_MARKER

    def training_lock(self) -> ExclusiveLock:
        """Held (on the marker) by the process that trains this run, from before its config is written to its end."""
        return ExclusiveLock(self.marker, f"{self.path} is being trained by another process ({{holder}}); "
                                          "wait for it to finish or choose another --out")

    def prepare(self) -> None:
        """Create the folder for a new run and its marker: refuse a file, a folder that holds anything but a failed
        start of vitlab's own (its marker, and only what a run that died before its first checkpoint leaves), a run
        that another process is training, an unwritable place."""
        if self.path.exists() and not self.path.is_dir():
            raise VitlabError(f"--out {self.path} is a file, not a folder; choose another --out")
        if self.path.is_dir():
            leftovers = {entry.name for entry in self.path.iterdir()} - {RUN_MARKER}
            if leftovers and (holder := lock_holder(self.marker)):
                raise VitlabError(f"--out {self.path} is being trained by another process ({holder}); choose another --out")
            if leftovers and (not self.marker.is_file() or leftovers - FAILED_START_FILES or self.state() != "new"):
                raise VitlabError(f"--out {self.path} is not empty (it may hold another run or files of yours); "
                                  "choose a new folder or delete it")
            if leftovers:
                for name in leftovers:
                    entry = self.path / name
                    if entry.is_dir():
                        import shutil

                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.marker.touch()
        except OSError as error:
            raise VitlabError(f"cannot write to --out {self.path} ({error.strerror or error}); choose a writable folder") from None

    def is_run_file(self, path: str | Path) -> bool:
        """True if `path` is one of this run's own files (which only training may write)."""
        path = resolved(path)
        return path.parent == resolved(self.path) and path.name in RUN_FILES

    # -- config ----------------------------------------------------------------------------------------

    def write_config(self, run: RunConfig) -> None:
        write_json(self.config_file, run.to_dict())

    def config(self) -> RunConfig:
        from vitlab.config import RunConfig

        return RunConfig.from_dict(read_json(self.config_file, "run config"), source=self.config_file)

    # -- metrics ---------------------------------------------------------------------------------------

    def append_metrics(self, record: dict) -> None:
        from vitlab.io import append_jsonl

        append_jsonl(self.metrics_file, record)

    def rewrite_metrics(self, records: list[dict]) -> None:
        from vitlab.io import write_jsonl

        write_jsonl(self.metrics_file, records)

    def history(self) -> list[dict]:
        """metrics.jsonl as one record per epoch, in order (a resumed run may repeat an epoch: the last
        line wins). A missing file is an empty history; a truncated last line (a kill during the append)
        is skipped; any other damage is an error."""
        by_epoch: dict[int, dict] = {}
        if not self.metrics_file.is_file():
            return []
        lines = self.metrics_file.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                epoch = record["epoch"]
                if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
                    raise ValueError(f"epoch {epoch!r}")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                if number == len(lines):  # what a kill during the append leaves
                    break
                raise VitlabError(f"{self.metrics_file} line {number} is damaged ({error}); the run folder is corrupt") from None
            by_epoch[epoch] = record
        return [by_epoch[epoch] for epoch in sorted(by_epoch)]

    # -- results ---------------------------------------------------------------------------------------

    def write_results(self, results: dict) -> None:
        write_json(self.results_file, results)

    def results(self) -> dict:
        """results.json, with its numeric fields checked (a hand-edited or damaged file is refused)."""
        results = read_json(self.results_file, "run results")
        if not isinstance(results, dict):
            raise VitlabError(f"{self.results_file} is not a results object; the run folder is corrupt, train the run again")
        for key in ("test_acc", "test_loss", "train_seconds"):
            value = results.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise VitlabError(f"{self.results_file} has no valid '{key}' (got {value!r}); the run folder is corrupt, train the run again")
        if not 0 <= results["test_acc"] <= 100:
            raise VitlabError(f"{self.results_file} has test_acc {results['test_acc']}, outside 0..100; the run folder is corrupt")
        for key in ("params", "flops_per_image", "images_per_second"):  # optional, but numbers where present
            value = results.get(key)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise VitlabError(f"{self.results_file} has '{key}' {value!r}, not a number; the run folder is corrupt, train the run again")
        per_class = results.get("per_class_acc")
        if per_class is not None and (not isinstance(per_class, dict) or not all(
                isinstance(value, (int, float)) and not isinstance(value, bool) for value in per_class.values())):
            raise VitlabError(f"{self.results_file} has a 'per_class_acc' that is not class names with accuracies; the run folder "
                              "is corrupt, train the run again")
        return results

    # -- model and predictions -------------------------------------------------------------------------

    def input_spec(self):
        """The class names and normalisation the run's model was trained with (model.json), without loading it."""
        from vitlab.models.base import InputSpec

        description = read_json(self.path / MODEL_FILE, "model description")
        return InputSpec.from_dict(description.get("data") if isinstance(description, dict) else None)

    def model(self, device: str | torch.device = "cpu") -> VitlabModel:
        from vitlab.models.base import VitlabModel

        if self.state() == "resumable" and not (self.path / WEIGHTS_FILE).exists():
            raise VitlabError(f"{self.path} has not finished training (no {WEIGHTS_FILE} yet); finish it with: vitlab train --resume {self.path}")
        return VitlabModel.load(self.path, device)

    def save_predictions(self, labels: torch.Tensor, predictions: torch.Tensor, probabilities: torch.Tensor) -> None:
        tensors = {"labels": labels.contiguous(), "predictions": predictions.contiguous(), "probabilities": probabilities.float().contiguous()}
        write_tensors(self.predictions_file, tensors)

    def predictions(self) -> dict[str, torch.Tensor]:
        """labels (N,), predictions (N,), probabilities (N, classes) on the test set."""
        if not self.predictions_file.is_file():
            raise VitlabError(f"{self.path} has no {PREDICTIONS_FILE}; it was trained by an older vitlab or did not finish; train it again")
        try:
            tensors = read_tensors(self.predictions_file)
        except Exception as error:  # safetensors raises several types for truncated or foreign files
            raise VitlabError(f"{self.predictions_file} is unreadable ({str(error)[:120]}); the run folder is damaged, train the run again") from None
        labels, predictions = tensors.get("labels"), tensors.get("predictions")
        if labels is None or predictions is None or labels.shape != predictions.shape or labels.ndim != 1:
            raise VitlabError(f"{self.predictions_file} does not hold matching labels and predictions; the run folder is damaged")
        return tensors


def default_run_path(name: str) -> Path:
    """runs/<name>-<date>-<time>; a second run started in the same second gets a -2, -3, ... suffix."""
    stem = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, number = stem, 1
    while path.exists():
        number += 1
        path = stem.with_name(f"{stem.name}-{number}")
    return path


def results_summary(results: dict[str, Any]) -> str:
    """One line for the terminal after a run."""
    return (f"test accuracy {results['test_acc']:.2f}% (test loss {results['test_loss']:.4f}, best validation "
            f"{results['best_val_acc']:.2f}%), {results['train_seconds']:.0f} s of training at {results['images_per_second']:.0f} img/s")
