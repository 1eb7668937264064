"""The figures of a study folder: differences with seed-aware intervals, overlaid curves, accuracy against a model
setting (patch size, depth, ...) and accuracy against training time."""

from __future__ import annotations

from pathlib import Path

from vitlab.plotting import plt, save_figure
from vitlab.study.plan import base_of


def plot_differences(summary, path: Path) -> None:
    """Forest plot: each row's accuracy difference to the baseline with its 95% seed-aware interval."""
    rows = [row for row in summary.rows if row.delta is not None and row.delta.ci_low is not None]
    figure, axis = plt.subplots(figsize=(6.4, 0.55 * len(rows) + 1.4))
    for y, row in enumerate(rows):
        delta = row.delta
        axis.errorbar(delta.observed, y, xerr=[[delta.observed - delta.ci_low], [delta.ci_high - delta.observed]],
                      fmt="o", color="C0" if delta.ci_low > 0 else "C3" if delta.ci_high < 0 else "C7", capsize=4)
        axis.annotate(delta.describe(), (delta.ci_high, y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(rows)), [row.spec for row in rows])
    axis.invert_yaxis()
    if rows:  # room on the right for the widest label, wherever the intervals lie
        low = min(0.0, *(row.delta.ci_low for row in rows))
        high = max(0.0, *(row.delta.ci_high for row in rows))
        span = max(high - low, 1e-6)
        axis.set_xlim(low - 0.1 * span, high + 0.8 * span)
    axis.set_xlabel(f"test accuracy − {summary.baseline} (points)")
    axis.set_title("Δ with 95% seed-aware interval (seeds and test images)", fontsize=10)
    axis.grid(axis="x", alpha=0.3)
    save_figure(figure, path)


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
    save_figure(figure, path)


def setting_axis(axis, setting: str, values: list, numeric: bool, labels: list[str]) -> None:
    """The x axis of a sweep: log scale for sizes, rates and any range of 16× or more; the labels otherwise."""
    if numeric and (setting in ("train_size", "subset", "lr", "weight_decay") or (min(values) > 0 and max(values) / min(values) >= 16)):
        axis.set_xscale("log")
        axis.set_xticks(sorted(set(values)), [f"{v:g}" for v in sorted(set(values))])
        axis.minorticks_off()
    elif not numeric:
        axis.set_xticks(range(len(labels)), labels)


def plot_accuracy_vs_setting(summary, setting: str, path: Path) -> None:
    """Test accuracy (mean and 95% t-interval over seeds, every seed a dot) against `setting`, one curve per
    base SPEC; log x for training-set sizes."""
    groups: dict[str, list] = {}
    for row in summary.rows:
        groups.setdefault(base_of(row.spec, setting), []).append(row)
    values = [row.settings.get(setting) for row in summary.rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    labels = sorted({str(v) for v in values}, key=lambda text: [str(v) for v in values].index(text))
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for index, (base, rows) in enumerate(groups.items()):
        rows = sorted(rows, key=lambda row: row.settings.get(setting)) if numeric else rows
        xs = [row.settings.get(setting) if numeric else labels.index(str(row.settings.get(setting))) for row in rows]
        means = [row.test_acc.mean for row in rows]
        axis.plot(xs, means, "-o", color=f"C{index}", label=base, markersize=4)
        with_ci = [(x, row) for x, row in zip(xs, rows, strict=True) if row.test_acc.ci_low is not None]
        if with_ci:
            axis.fill_between([x for x, _ in with_ci], [r.test_acc.ci_low for _, r in with_ci], [r.test_acc.ci_high for _, r in with_ci],
                              color=f"C{index}", alpha=0.15)
        for x, row in zip(xs, rows, strict=True):
            axis.scatter([x] * len(row.per_seed_acc), list(row.per_seed_acc.values()), s=10, color=f"C{index}", alpha=0.7, zorder=3)
    setting_axis(axis, setting, values, numeric, labels)
    axis.set(xlabel=setting, ylabel="test accuracy (%)", title=f"test accuracy vs {setting} (bands: 95% CI over seeds; dots: seeds)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, path)


def plot_accuracy_vs_time(summary, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5.6, 3.8))
    for index, row in enumerate(summary.rows):
        acc = row.test_acc
        error = None if acc.ci_low is None else [[acc.mean - acc.ci_low], [acc.ci_high - acc.mean]]
        axis.errorbar(row.train_seconds.mean, acc.mean, yerr=error, fmt="o", capsize=4, color=f"C{index}", label=row.spec)
    axis.set_xscale("log")
    axis.set(xlabel="training time per run (s, log scale)", ylabel="test accuracy (%)", title="accuracy vs training time")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    save_figure(figure, path)


def varied_setting(summary) -> str | None:
    """The setting a study varies: a sweep's field, or the one setting that differs across rows of one model."""
    if summary.study.get("vary"):
        return summary.study["vary"]
    for model in {row.model for row in summary.rows}:
        settings = [row.settings for row in summary.rows if row.model == model]
        if len(settings) < 2:
            continue
        differing = [key for key in settings[0] if key != "seed" and len({repr(s.get(key)) for s in settings}) > 1]
        if len(differing) == 1:
            return differing[0]
    return None


def plot_gaps(summary, setting: str, path: Path) -> None:
    """Each curve minus the first curve at every value of the varied setting, with seed-aware 95% intervals."""
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    curves = list(dict.fromkeys(gap.curve for gap in summary.gaps))
    numeric = all(isinstance(gap.value, (int, float)) and not isinstance(gap.value, bool) for gap in summary.gaps)
    labels = list(dict.fromkeys(str(gap.value) for gap in summary.gaps))
    for index, curve in enumerate(curves):
        gaps = [gap for gap in summary.gaps if gap.curve == curve]
        xs = [gap.value if numeric else labels.index(str(gap.value)) for gap in gaps]
        ys = [gap.difference.observed for gap in gaps]
        axis.plot(xs, ys, "-o", color=f"C{index + 1}", label=f"{curve} − {gaps[0].minus_curve}", markersize=4)
        bounded = [(x, gap.difference) for x, gap in zip(xs, gaps, strict=True) if gap.difference.ci_low is not None]
        if bounded:
            axis.errorbar([x for x, _ in bounded], [d.observed for _, d in bounded],
                          yerr=[[d.observed - d.ci_low for _, d in bounded], [d.ci_high - d.observed for _, d in bounded]],
                          fmt="none", ecolor=f"C{index + 1}", capsize=4)
    axis.axhline(0.0, color="black", linewidth=0.8)
    setting_axis(axis, setting, [gap.value for gap in summary.gaps], numeric, labels)
    axis.set(xlabel=setting, ylabel="test accuracy difference (points)", title=f"gap between curves vs {setting} (95% seed-aware CI)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, path)


def write_study_figures(summary, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if any(row.delta is not None and row.delta.ci_low is not None for row in summary.rows):
        plot_differences(summary, folder / "differences.png")
        written.append(folder / "differences.png")
    plot_curves(summary, folder / "curves.png")
    plot_accuracy_vs_time(summary, folder / "accuracy_vs_time.png")
    written += [folder / "curves.png", folder / "accuracy_vs_time.png"]
    setting = varied_setting(summary)
    if setting:
        path = folder / f"accuracy_vs_{setting}.png"
        plot_accuracy_vs_setting(summary, setting, path)
        written.append(path)
    if summary.gaps:
        path = folder / f"gaps_vs_{summary.study.get('vary')}.png"
        plot_gaps(summary, summary.study.get("vary"), path)
        written.append(path)
    return written
