"""Figures written into run folders (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from vitlab.plotting import plt, save_figure


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> None:
    """Train/validation loss and accuracy per epoch, side by side."""
    epochs = [record["epoch"] for record in history]
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split, style in (("train", "-o"), ("val", "-s")):
        loss_axis.plot(epochs, [r[f"{split}_loss"] for r in history], style, label=split, markersize=3)
        acc_axis.plot(epochs, [r[f"{split}_acc"] for r in history], style, label=split, markersize=3)
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    acc_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for axis in (loss_axis, acc_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    save_figure(figure, path, dpi=110)
