"""The training GIF: one frame per epoch with the curves so far, the watched validation images with
the model's prediction at that epoch and, for a ViT, its attention rollout as it forms.

Built from RUN_DIR/metrics.jsonl and RUN_DIR/snapshots/ (see `vitlab.train.monitor`), so it can be
rebuilt after training: `vitlab gif RUN_DIR`.
"""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.ticker import MaxNLocator
from PIL import Image

from vitlab.data import CLASSES
from vitlab.errors import VitlabError
from vitlab.io import atomic_write, read_tensors
from vitlab.plotting import plt
from vitlab.rundir import SNAPSHOT_IMAGES_FILE, RunDir

FRAME_MILLISECONDS = 600


def read_safetensors(path: Path, what: str) -> dict:
    try:
        return read_tensors(path)
    except Exception as error:  # safetensors raises several types for truncated files
        raise VitlabError(f"{path} ({what}) is unreadable ({str(error)[:100]}); delete it and rebuild, or train again with --gif true") from None


def read_snapshots(run: RunDir) -> tuple[dict, list[tuple[int, dict]], list[dict]]:
    folder = run.snapshots
    if not (folder / SNAPSHOT_IMAGES_FILE).is_file():
        raise VitlabError(f"{run} has no snapshots; train with --gif true to record them")
    watched = read_safetensors(folder / SNAPSHOT_IMAGES_FILE, "the watched images")
    epochs = []
    for path in sorted(folder.glob("epoch_*.safetensors")):
        number = path.stem.split("_")[1]
        if number.isascii() and number.isdigit():
            epochs.append((int(number), read_safetensors(path, "a snapshot")))
    return watched, epochs, run.history()


def render_frame(watched: dict, epoch: int, snapshot: dict, history: list[dict], total_epochs: int,
                 classes: tuple[str, ...] = CLASSES) -> Image.Image:
    images, labels = watched["images"], watched["labels"]
    count = len(images)
    has_attention = "attention" in snapshot
    rows = 2 if has_attention else 1
    figure = plt.figure(figsize=(12, 1.0 + 1.45 * rows))
    grid = figure.add_gridspec(rows, count + 4)
    curves = figure.add_subplot(grid[:, :4])
    shown = [r for r in history if r["epoch"] <= epoch]
    curves.plot([r["epoch"] for r in shown], [r["train_acc"] for r in shown], "-o", markersize=3, label="train")
    curves.plot([r["epoch"] for r in shown], [r["val_acc"] for r in shown], "-s", markersize=3, label="validation")
    curves.set(xlim=(0.5, total_epochs + 0.5), ylim=(0, 100), xlabel="epoch", ylabel="accuracy (%)", title=f"epoch {epoch}/{total_epochs}")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.grid(alpha=0.3)
    curves.legend(loc="lower right", fontsize=8)
    probabilities = snapshot["probabilities"]
    for index in range(count):
        axis = figure.add_subplot(grid[0, 4 + index])
        axis.imshow(images[index].permute(1, 2, 0).numpy())
        predicted = int(probabilities[index].argmax())
        correct = predicted == int(labels[index])
        axis.set_title(f"{classes[predicted]}\n{100 * float(probabilities[index, predicted]):.0f}%", fontsize=8,
                       color="green" if correct else "red")
        axis.axis("off")
        if has_attention:
            axis = figure.add_subplot(grid[1, 4 + index])
            axis.imshow(images[index].permute(1, 2, 0).numpy())
            axis.imshow(snapshot["attention"][index].float().numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axis.set_title(f"true: {classes[int(labels[index])]}", fontsize=7)
            axis.axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=72, format="png")
    plt.close(figure)
    return Image.open(buffer).convert("RGB")


def write_training_gif(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Render one frame per recorded epoch into an animated GIF (default RUN_DIR/training.gif)."""
    run = RunDir(run_dir)
    run.require_exists()
    if path is not None:
        path = Path(path)
        if path.suffix.lower() != ".gif":
            raise VitlabError(f"--out {path} must end in .gif")
        if run.is_run_file(path) or path.is_dir():
            raise VitlabError(f"--out {path} is one of the run's own files or a folder; choose another .gif path")
    watched, epochs, history = read_snapshots(run)
    if not epochs:
        raise VitlabError(f"{run.snapshots} holds no epochs yet; train with --gif true for at least one epoch")
    total_epochs = max([e for e, _ in epochs] + [r["epoch"] for r in history])
    classes = run.input_spec().classes if (run.path / "model.json").is_file() else CLASSES
    try:
        frames = [render_frame(watched, epoch, snapshot, history, total_epochs, classes) for epoch, snapshot in epochs]
    except (KeyError, IndexError, RuntimeError, ValueError) as error:
        raise VitlabError(f"{run.snapshots} does not match the run ({str(error)[:100]}); delete the snapshots or train again with --gif true") from None
    path = path or run.gif_file
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=FRAME_MILLISECONDS, loop=0))
    return path
