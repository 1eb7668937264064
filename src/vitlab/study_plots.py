"""The figures of a study folder: bootstrap differences, overlaid curves, accuracy against a model
setting (patch size, depth, ...) and accuracy against training time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vitlab.plots import save_figure as save  # noqa: E402


def plot_bootstrap(summary, path: Path) -> None:
    """Forest plot: each model's accuracy difference to the baseline with its 95% paired-bootstrap CI."""
    rows = [row for row in summary.rows if row.delta is not None]
    figure, axis = plt.subplots(figsize=(6.4, 0.55 * len(rows) + 1.4))
    for y, row in enumerate(rows):
        delta = row.delta
        axis.errorbar(delta.observed, y, xerr=[[delta.observed - delta.ci_low], [delta.ci_high - delta.observed]],
                      fmt="o", color="C0" if delta.ci_low > 0 else "C3" if delta.ci_high < 0 else "C7", capsize=4)
        axis.annotate(f"{delta.observed:+.2f} [{delta.ci_low:+.2f}, {delta.ci_high:+.2f}]", (delta.ci_high, y),
                      xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(rows)), [row.spec for row in rows])
    axis.invert_yaxis()
    axis.margins(x=0.35)
    axis.set(xlabel=f"test accuracy − {summary.baseline} (points)", title="Paired bootstrap, 95% CI (seed-averaged)")
    axis.grid(axis="x", alpha=0.3)
    save(figure, path)


def plot_curves(summary, path: Path) -> None:
    """Validation accuracy and loss per epoch of every model (mean over seeds), overlaid."""
    figure, (acc_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for index, row in enumerate(summary.rows):
        epochs = [record["epoch"] for record in row.history]
        acc_axis.plot(epochs, [r["val_acc"] for r in row.history], "-o", markersize=3, color=f"C{index}", label=row.spec)
        loss_axis.plot(epochs, [r["val_loss"] for r in row.history], "-o", markersize=3, color=f"C{index}", label=row.spec)
    acc_axis.set(xlabel="epoch", ylabel="validation accuracy (%)", title="validation accuracy")
    loss_axis.set(xlabel="epoch", ylabel="validation loss", title="validation loss")
    for axis in (acc_axis, loss_axis):
        axis.grid(alpha=0.3)
    acc_axis.legend(fontsize=8)
    save(figure, path)


def plot_accuracy_vs_setting(summary, setting: str, path: Path) -> None:
    """Test accuracy (mean, 95% CI over seeds) of the models that vary `setting`; the others as bands."""
    varying = [row for row in summary.rows if setting in row.model_config]
    if all(isinstance(row.model_config[setting], (int, float)) for row in varying):
        varying.sort(key=lambda row: row.model_config[setting])
    others = [row for row in summary.rows if setting not in row.model_config]
    figure, axis = plt.subplots(figsize=(5.6, 3.8))
    values = [row.model_config[setting] for row in varying]
    numeric = all(isinstance(v, (int, float)) for v in values)
    positions = values if numeric else list(range(len(values)))
    axis.errorbar(positions, [r.test_acc.mean for r in varying],
                  yerr=[[r.test_acc.mean - r.test_acc.ci_low for r in varying], [r.test_acc.ci_high - r.test_acc.mean for r in varying]],
                  fmt="-o", capsize=4, label=varying[0].model if varying else "")
    for x, row in zip(positions, varying, strict=True):  # every seed's accuracy as a dot
        axis.scatter([x] * len(row.per_seed_acc), list(row.per_seed_acc.values()), s=12, color="black", zorder=3,
                     label="one seed" if x == positions[0] else None)
    axis.set_xticks(positions, [str(v) for v in values])
    for index, row in enumerate(others):
        axis.axhline(row.test_acc.mean, color=f"C{index + 1}", linestyle="--", label=row.spec)
        axis.axhspan(row.test_acc.ci_low, row.test_acc.ci_high, color=f"C{index + 1}", alpha=0.15)
    axis.set(xlabel=setting, ylabel="test accuracy (%)", title=f"test accuracy vs {setting} (95% CI over seeds)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save(figure, path)


def plot_accuracy_vs_time(summary, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5.6, 3.8))
    for index, row in enumerate(summary.rows):
        axis.errorbar(row.train_seconds.mean, row.test_acc.mean,
                      yerr=[[row.test_acc.mean - row.test_acc.ci_low], [row.test_acc.ci_high - row.test_acc.mean]],
                      fmt="o", capsize=4, color=f"C{index}", label=row.spec)
    axis.set_xscale("log")
    axis.set(xlabel="training time per run (s, log scale)", ylabel="test accuracy (%)", title="accuracy vs training time")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    save(figure, path)


def varied_setting(summary) -> str | None:
    """The model setting a study varies: a sweep's field, or one that differs across rows of the same model."""
    if summary.study.get("vary"):
        return summary.study["vary"]
    for model in {row.model for row in summary.rows}:
        configs = [row.model_config for row in summary.rows if row.model == model]
        if len(configs) < 2:
            continue
        differing = [key for key in configs[0] if len({repr(c.get(key)) for c in configs}) > 1]
        if len(differing) == 1:
            return differing[0]
    return None


def write_study_figures(summary, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if any(row.delta is not None for row in summary.rows):
        plot_bootstrap(summary, folder / "bootstrap.png")
        written.append(folder / "bootstrap.png")
    plot_curves(summary, folder / "curves.png")
    plot_accuracy_vs_time(summary, folder / "accuracy_vs_time.png")
    written += [folder / "curves.png", folder / "accuracy_vs_time.png"]
    setting = varied_setting(summary)
    if setting:
        path = folder / f"accuracy_vs_{setting}.png"
        plot_accuracy_vs_setting(summary, setting, path)
        written.append(path)
    return written
