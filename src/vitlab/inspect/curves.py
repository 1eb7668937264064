"""Figures written into run folders (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from vitlab.plotting import plt, save_figure


def plot_curves(history: list[dict], path: str | Path, title: str = "", time_to_accuracy: dict | None = None) -> None:
    """Train/validation loss and accuracy per epoch, side by side; with `time_to_accuracy` ({"90": seconds or None}),
    each validation accuracy the run reached is marked where it first did, with its training time."""
    epochs = [record["epoch"] for record in history]
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split, style in (("train", "-o"), ("val", "-s")):
        loss_axis.plot(epochs, [r[f"{split}_loss"] for r in history], style, label=split, markersize=3)
        acc_axis.plot(epochs, [r[f"{split}_acc"] for r in history], style, label=split, markersize=3)
    for target, seconds in (time_to_accuracy or {}).items():
        if seconds is None:
            continue
        epoch = next(r["epoch"] for r in history if r["val_acc"] >= float(target))
        acc_axis.axhline(float(target), color="gray", linewidth=0.6, linestyle=":")
        acc_axis.annotate(f"{target}% at {seconds:.0f} s", (epoch, float(target)), xytext=(4, 2), textcoords="offset points", fontsize=7,
                          color="dimgray")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    acc_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for axis in (loss_axis, acc_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    save_figure(figure, path, dpi=110)
