"""The training GIF: one frame per epoch with the curves so far, the watched validation images with
the model's prediction at that epoch and, for a ViT, its attention rollout as it forms.

Built from RUN_DIR/metrics.jsonl and RUN_DIR/snapshots/ (see `vitlab.monitor`), so it can be
rebuilt after training: `vitlab gif RUN_DIR`.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from vitlab.data import CLASSES  # noqa: E402
from vitlab.errors import VitlabError  # noqa: E402
from vitlab.io import atomic_write, read_epoch_history  # noqa: E402

GIF_FILE = "training.gif"
FRAME_MILLISECONDS = 600


def read_snapshots(run_dir: Path) -> tuple[dict, list[tuple[int, dict]], list[dict]]:
    folder = run_dir / "snapshots"
    if not (folder / "images.safetensors").is_file():
        raise VitlabError(f"{run_dir} has no snapshots; train with --gif true to record them")
    watched = load_file(str(folder / "images.safetensors"))
    epochs = sorted((int(path.stem.split("_")[1]), load_file(str(path))) for path in folder.glob("epoch_*.safetensors"))
    history_by_epoch = read_epoch_history(run_dir / "metrics.jsonl")
    return watched, epochs, [history_by_epoch[e] for e in sorted(history_by_epoch)]


def render_frame(watched: dict, epoch: int, snapshot: dict, history: list[dict], total_epochs: int) -> Image.Image:
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
        axis.set_title(f"{CLASSES[predicted]}\n{100 * float(probabilities[index, predicted]):.0f}%", fontsize=8,
                       color="green" if correct else "red")
        axis.axis("off")
        if has_attention:
            axis = figure.add_subplot(grid[1, 4 + index])
            axis.imshow(images[index].permute(1, 2, 0).numpy())
            axis.imshow(snapshot["attention"][index].float().numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axis.set_title(f"true: {CLASSES[int(labels[index])]}", fontsize=7)
            axis.axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=72, format="png")
    plt.close(figure)
    return Image.open(buffer).convert("RGB")


def write_training_gif(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Render one frame per recorded epoch into an animated GIF (default RUN_DIR/training.gif)."""
    run_dir = Path(run_dir)
    watched, epochs, history = read_snapshots(run_dir)
    if not epochs:
        raise VitlabError(f"{run_dir}/snapshots holds no epochs yet; train with --gif true for at least one epoch")
    total_epochs = max([e for e, _ in epochs] + [r["epoch"] for r in history])
    frames = [render_frame(watched, epoch, snapshot, history, total_epochs) for epoch, snapshot in epochs]
    path = Path(path) if path else run_dir / GIF_FILE
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=FRAME_MILLISECONDS, loop=0))
    return path
