"""Tables and figures of a study folder, made from its run folders alone.

Writes `results.json`, `results.csv`, `results.md` and `figures/*.png` into the study folder.

- Test accuracy over seeds: mean ± sample std with a 95% t-interval (none for a single seed).
- Δ to the baseline and between neighbouring rows: the seed-aware interval of `vitlab.study.stats`
  (training seeds and test images). Every finished seed of each row is used, in the mean column and in
  Δ alike; seeds need not match.
- Per-seed diagnostics (image-only paired bootstrap, McNemar) for seeds both rows finished: whether two
  trained networks differ on this test set, not whether two configurations do.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vitlab.errors import VitlabError
from vitlab.io import atomic_write, write_json
from vitlab.rundir import FIGURES_FOLDER, RunDir
from vitlab.study.plan import RUNS_FOLDER, STUDY_FILE, base_of, parse_spec, read_study
from vitlab.study.stats import Difference, Spread, mcnemar, mean_and_ci, paired_bootstrap, seed_aware_contrast, seed_aware_difference


def escaped(value) -> str:
    """A field read from a study or run folder, made inert in Markdown and HTML: one line, no markup."""
    import html

    text = " ".join(str(value).split())
    return html.escape(text).replace("`", "&#96;").replace("|", "&#124;").replace("[", "&#91;").replace("]", "&#93;")


@dataclass
class SeedDiagnostic:
    """One seed pair of two rows: the image-only paired bootstrap and McNemar's test."""

    seed: int
    difference: float
    bootstrap_low: float
    bootstrap_high: float
    mcnemar_p: float


@dataclass
class Row:
    """One SPEC of a study, over its finished seeds."""

    spec: str
    model: str
    settings: dict  # the run's whole config, flattened (model, data and training settings by name)
    params: int
    flops_per_image: float
    seeds: list[int]
    test_acc: Spread
    test_loss: Spread
    train_seconds: Spread
    images_per_second: float
    per_seed_acc: dict[int, float]
    per_class_acc: dict[str, float]  # mean over seeds
    delta: Difference | None = None  # against the baseline; None for the baseline itself or without it
    diagnostics: list[SeedDiagnostic] = field(default_factory=list)  # against the baseline, per common seed
    history: list[dict] = field(default_factory=list, repr=False)  # per-epoch means over seeds

    @property
    def mcnemar_max_p(self) -> float | None:
        return max((d.mcnemar_p for d in self.diagnostics), default=None)


@dataclass
class Gap:
    """One curve of a sweep minus the reference curve at one value of the varied setting."""

    value: object
    curve: str
    minus_curve: str
    difference: Difference


@dataclass
class GapChange:
    """(curve − reference) at the last value minus (curve − reference) at the first."""

    curve: str
    minus_curve: str
    first: object
    last: object
    gap_first: float
    gap_last: float
    change: Difference


def curve_gaps(rows: list[Row], setting: str, stacked) -> tuple[list[Gap], list[GapChange]]:
    """Gaps between the curves of a sweep with several SPECs (`stacked(spec)` gives its (S, N) correctness)."""
    curves: dict[str, dict] = {}
    for row in rows:
        value = row.settings.get(setting)
        curves.setdefault(base_of(row.spec, setting), {})[tuple(value) if isinstance(value, list) else value] = row
    if len(curves) < 2:
        return [], []
    reference_name, *others = curves
    reference = curves[reference_name]
    gaps, changes = [], []
    for name in others:
        common = [value for value in curves[name] if value in reference]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in common):
            common = sorted(common)
        for value in common:
            gaps.append(Gap(value, name, reference_name, seed_aware_difference(stacked(curves[name][value].spec), stacked(reference[value].spec))))
        if len(common) >= 2:
            first, last = common[0], common[-1]
            change = seed_aware_contrast([(1.0, stacked(curves[name][last].spec)), (-1.0, stacked(reference[last].spec)),
                                          (-1.0, stacked(curves[name][first].spec)), (1.0, stacked(reference[first].spec))])
            gap_at = {gap.value: gap.difference.observed for gap in gaps if gap.curve == name}
            changes.append(GapChange(name, reference_name, first, last, gap_at[first], gap_at[last], change))
    return gaps, changes


@dataclass
class StudySummary:
    study: dict
    baseline: str
    baseline_finished: bool
    rows: list[Row]
    missing: list[str]  # runs not finished yet
    # Each row against the one listed before it, for questions of order ("is patch 2 better than patch 4?").
    steps: list[tuple[str, str, Difference]] = field(default_factory=list)
    # A sweep of several curves (e.g. models against train_size): each curve minus the first at every value,
    # and how that gap changes from the first value to the last ("does the gap narrow with data?").
    gaps: list[Gap] = field(default_factory=list)
    gap_changes: list[GapChange] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"study": self.study, "baseline": self.baseline, "baseline_finished": self.baseline_finished, "missing": self.missing,
                "rows": [dataclasses.asdict(row) for row in self.rows],
                "steps": [{"spec": a, "minus": b, **dataclasses.asdict(d)} for a, b, d in self.steps],
                "gaps": [dataclasses.asdict(gap) for gap in self.gaps],
                "gap_changes": [dataclasses.asdict(change) for change in self.gap_changes]}

    def markdown_table(self) -> str:
        lines = [f"| Model | Params | FLOPs/img | Test loss | Test acc % mean ± std [95% CI over seeds] (n) | "
                 f"Δ vs {escaped(self.baseline)} [95% seed-aware CI] | McNemar p, per seed (max) | Train time |",
                 "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
        for row in self.rows:
            if row.spec == self.baseline:
                delta = "baseline"
            elif row.delta is None:
                delta = "n/a (baseline not finished)"
            else:
                delta = f"**{row.delta.describe()}**" if row.delta.excludes_zero else row.delta.describe()
            p_value = "" if row.mcnemar_max_p is None else f"{row.mcnemar_max_p:.2g}"
            lines.append(f"| {escaped(row.spec)} | {row.params:,} | {row.flops_per_image / 1e6:.1f} M | {row.test_loss.mean:.3f} | "
                         f"{row.test_acc.describe()} | {delta} | {p_value} | {row.train_seconds.mean:.0f} s |")
        notes = ["", "Δ: mean accuracy over this row's finished seeds minus the baseline's (every finished seed of each row, in "
                 "the mean and Δ columns alike); its 95% interval accounts for training-seed noise and test-set sampling "
                 "(vitlab.study.stats); **bold**: the interval excludes 0."]
        if not self.baseline_finished:
            notes.append(f"The baseline ({self.baseline}) has no finished run yet: no Δ is shown.")
        return "\n".join(lines + notes)

    def steps_table(self) -> str:
        lines = ["| Model | minus | Δ test acc [95% seed-aware CI; **bold**: excludes 0] | seeds |", "| --- | --- | --- | --- |"]
        lines += [f"| {escaped(a)} | {escaped(b)} | {f'**{d.describe()}**' if d.excludes_zero else d.describe()} | {d.seeds_a} vs {d.seeds_b} |"
                  for a, b, d in self.steps]
        return "\n".join(lines)

    def gaps_markdown(self) -> str:
        setting = self.study.get("vary")
        reference = self.gaps[0].minus_curve
        lines = [f"Each curve minus {escaped(reference)} at the same {escaped(setting)} (seed-aware 95% CI):\n",
                 f"| {escaped(setting)} | curve | minus | Δ test acc [95% seed-aware CI] | seeds |", "| --- | --- | --- | --- | --- |"]
        for gap in self.gaps:
            text = gap.difference.describe()
            lines.append(f"| {escaped(gap.value)} | {escaped(gap.curve)} | {escaped(gap.minus_curve)} | "
                         f"{f'**{text}**' if gap.difference.excludes_zero else text} | {gap.difference.seeds_a} vs {gap.difference.seeds_b} |")
        if self.gap_changes:
            lines += ["", f"How that gap changes from the first {escaped(setting)} to the last (a difference of differences over four "
                      "configurations, seed-aware 95% CI; **bold**: the change is established):\n",
                      "| curve | minus | from | to | gap there | gap here | change [95% seed-aware CI] |", "| --- | --- | --- | --- | ---: | ---: | --- |"]
            for change in self.gap_changes:
                text = change.change.describe()
                lines.append(f"| {escaped(change.curve)} | {escaped(change.minus_curve)} | {escaped(change.first)} | {escaped(change.last)} | "
                             f"{change.gap_first:+.2f} | {change.gap_last:+.2f} | {f'**{text}**' if change.change.excludes_zero else text} |")
        return "\n".join(lines)

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["model", "params", "flops_per_image", "seeds", "test_loss_mean", "test_acc_mean", "test_acc_std",
                         "test_acc_ci_low", "test_acc_ci_high", "delta", "delta_ci_low", "delta_ci_high", "delta_dof",
                         "mcnemar_max_p", "train_seconds_mean", "images_per_second"])

        def number(value, digits: int = 3) -> str:
            return "" if value is None else f"{value:.{digits}f}"

        for row in self.rows:
            delta = row.delta
            writer.writerow([row.spec, row.params, f"{row.flops_per_image:.0f}", " ".join(map(str, row.seeds)), number(row.test_loss.mean, 4),
                             number(row.test_acc.mean), number(row.test_acc.std), number(row.test_acc.ci_low), number(row.test_acc.ci_high),
                             *([""] * 4 if delta is None else [number(delta.observed), number(delta.ci_low), number(delta.ci_high),
                                                               number(delta.degrees_of_freedom, 1)]),
                             "" if row.mcnemar_max_p is None else f"{row.mcnemar_max_p:.3g}", number(row.train_seconds.mean, 1),
                             f"{row.images_per_second:.0f}"])
        return buffer.getvalue()


def finished_runs(study_dir: Path, spec_text: str, seeds: list[int]) -> tuple[dict[int, RunDir], list[str]]:
    slug = parse_spec(spec_text).slug
    done, missing = {}, []
    for seed in seeds:
        folder = RunDir(study_dir / RUNS_FOLDER / slug / f"seed{seed}")
        if folder.state() == "finished":
            done[seed] = folder
        else:
            missing.append(f"{spec_text} seed {seed}")
    return done, missing


def mean_history(folders: list[RunDir]) -> list[dict]:
    """Per-epoch mean of each metric over seeds (epochs every seed has)."""
    histories = [{record["epoch"]: record for record in folder.history()} for folder in folders]
    epochs = sorted(set.intersection(*(set(h) for h in histories))) if histories else []
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    for folder, history in zip(folders, histories, strict=True):
        for epoch in epochs:
            if not all(isinstance(history[epoch].get(key), (int, float)) and not isinstance(history[epoch].get(key), bool) for key in keys):
                raise VitlabError(f"{folder.metrics_file}: epoch {epoch} lacks one of {', '.join(keys)}; the run folder is corrupt, "
                                  "train the run again")
    return [{"epoch": epoch, **{key: sum(h[epoch][key] for h in histories) / len(histories) for key in keys}} for epoch in epochs]


def flat_settings(folder: RunDir) -> dict:
    config = folder.config()
    return {**dataclasses.asdict(config.model), **dataclasses.asdict(config.data), **dataclasses.asdict(config.train)}


def correctness(folder: RunDir, expected_labels: torch.Tensor | None) -> torch.Tensor:
    predictions = folder.predictions()
    if expected_labels is not None and not torch.equal(predictions["labels"], expected_labels):
        raise VitlabError(f"{folder.predictions_file} was tested on other images than the rest of the study; "
                          "all runs of a study must share the test set")
    return predictions["predictions"] == predictions["labels"]


def diagnostics_against(own: dict[int, torch.Tensor], other: dict[int, torch.Tensor], resamples: int) -> list[SeedDiagnostic]:
    result = []
    for seed in sorted(set(own) & set(other)):
        bootstrap = paired_bootstrap(own[seed], other[seed], resamples=resamples)
        result.append(SeedDiagnostic(seed, bootstrap.observed, bootstrap.ci_low, bootstrap.ci_high, mcnemar(own[seed], other[seed]).p_value))
    return result


def summarize_study(study_dir: str | Path, write: bool = True, resamples: int = 2_000) -> StudySummary:
    study_dir = Path(study_dir)
    if not (study_dir / STUDY_FILE).is_file():
        raise VitlabError(f"{study_dir} is not a study folder (no {STUDY_FILE}); make one with 'vitlab compare' or 'vitlab sweep'")
    study = read_study(study_dir)
    specs, seeds = study["specs"], study["seeds"]
    correct: dict[str, dict[int, torch.Tensor]] = {}
    rows, missing, labels = [], [], None
    for spec in specs:
        runs, not_done = finished_runs(study_dir, spec, seeds)
        missing += not_done
        if not runs:
            continue
        results = {seed: folder.results() for seed, folder in runs.items()}
        correct[spec] = {}
        for seed, folder in runs.items():
            correct[spec][seed] = correctness(folder, labels)
            labels = labels if labels is not None else folder.predictions()["labels"]
        first = next(iter(results.values()))
        # classes every seed has (a damaged or foreign results.json may lack some)
        classes = [name for name in (first.get("per_class_acc") or {}) if all(name in (r.get("per_class_acc") or {}) for r in results.values())]
        rows.append(Row(
            spec=spec, model=first.get("model", "?"), settings=flat_settings(next(iter(runs.values()))), params=int(first.get("params") or 0),
            flops_per_image=float(first.get("flops_per_image") or float("nan")), seeds=sorted(runs),
            test_acc=mean_and_ci([r["test_acc"] for r in results.values()]),
            test_loss=mean_and_ci([r["test_loss"] for r in results.values()]),
            train_seconds=mean_and_ci([r["train_seconds"] for r in results.values()]),
            images_per_second=sum(float(r.get("images_per_second") or 0.0) for r in results.values()) / len(results),
            per_seed_acc={seed: r["test_acc"] for seed, r in sorted(results.items())},
            per_class_acc={name: sum(r["per_class_acc"][name] for r in results.values()) / len(results) for name in classes},
            history=mean_history(list(runs.values())),
        ))
    baseline = specs[0]

    def stacked(spec: str) -> torch.Tensor:
        return torch.stack([correct[spec][seed] for seed in sorted(correct[spec])])  # (S, N)

    for row in rows:
        if row.spec != baseline and baseline in correct:
            row.delta = seed_aware_difference(stacked(row.spec), stacked(baseline))
            row.diagnostics = diagnostics_against(correct[row.spec], correct[baseline], resamples)
    vary = study.get("vary")
    steps = [(current.spec, previous.spec, seed_aware_difference(stacked(current.spec), stacked(previous.spec)))
             for previous, current in zip(rows, rows[1:], strict=False)
             if not vary or base_of(previous.spec, vary) == base_of(current.spec, vary)]  # a sweep: neighbours on one curve
    gaps, gap_changes = curve_gaps(rows, vary, stacked) if vary else ([], [])
    summary = StudySummary(study=study, baseline=baseline, baseline_finished=baseline in correct, rows=rows, missing=missing, steps=steps,
                           gaps=gaps, gap_changes=gap_changes)
    if write:
        write_summary(summary, study_dir)
    return summary


def write_summary(summary: StudySummary, study_dir: Path) -> None:
    from vitlab.study.figures import write_study_figures

    write_json(study_dir / "results.json", summary.to_dict())
    atomic_write(study_dir / "results.csv", lambda tmp: Path(tmp).write_text(summary.csv_text()))
    notes = ["# Study results\n", f"Command: `{summary.study.get('command', '')}`\n",
             f"Seeds: {', '.join(map(str, summary.study['seeds']))}; budget: `{summary.study.get('budget')}`\n",
             summary.markdown_table(), ""]
    if summary.steps:
        notes += ["Each row minus the row before it:\n", summary.steps_table(), ""]
    if summary.gaps:
        notes += [summary.gaps_markdown(), ""]
    if summary.missing:
        notes.append(f"Not finished yet ({len(summary.missing)}): {', '.join(summary.missing)}\n")
    atomic_write(study_dir / "results.md", lambda tmp: Path(tmp).write_text("\n".join(notes)))
    if summary.rows:
        write_study_figures(summary, study_dir / FIGURES_FOLDER)
