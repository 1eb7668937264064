"""Tables and figures of a study folder, made from its run folders alone.

Writes `results.json`, `results.csv`, `results.md` and `figures/*.png` into the study folder. Accuracy
over seeds is mean ± sample std with a 95% t-interval; the difference to the baseline is a paired
bootstrap over test images of the seed-averaged accuracies (seeds paired by seed number), and
McNemar's test is run per seed pair (the largest p is reported).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vitlab.errors import VitlabError
from vitlab.io import atomic_write, read_epoch_history, read_json, write_json
from vitlab.stats import BootstrapDifference, Spread, mcnemar, mean_and_ci, paired_bootstrap
from vitlab.study import RUNS_FOLDER, STUDY_FILE, parse_spec
from vitlab.training import CONFIG_FILE, METRICS_FILE, RESULTS_FILE, load_predictions

FIGURES_FOLDER = "figures"


@dataclass
class Row:
    """One model of a study, over its finished seeds."""

    spec: str
    model: str
    model_config: dict
    params: int
    flops_per_image: float
    seeds: list[int]
    test_acc: Spread
    test_loss: Spread
    train_seconds: Spread
    images_per_second: float
    per_seed_acc: dict[int, float]
    per_class_acc: dict[str, float]  # mean over seeds
    delta: BootstrapDifference | None = None  # against the baseline; None for the baseline itself
    mcnemar_max_p: float | None = None
    history: list[dict] = field(default_factory=list, repr=False)  # per-epoch means over seeds


@dataclass
class StudySummary:
    study: dict
    baseline: str
    rows: list[Row]
    missing: list[str]  # runs not finished yet
    # Each model against the one listed before it (paired bootstrap): answers ordering questions such
    # as "is patch 2 better than patch 4?" with an interval, not only each model against the baseline.
    steps: list[tuple[str, str, BootstrapDifference]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"study": self.study, "baseline": self.baseline, "missing": self.missing,
                "rows": [dataclasses.asdict(row) for row in self.rows],
                "steps": [{"model": a, "minus": b, **dataclasses.asdict(d)} for a, b, d in self.steps]}

    def steps_table(self) -> str:
        lines = ["| Model | minus | Δ test acc [95% CI] | P(Δ ≤ 0) |", "| --- | --- | --- | ---: |"]
        lines += [f"| {a} | {b} | {d.observed:+.2f} [{d.ci_low:+.2f}, {d.ci_high:+.2f}] | {d.share_at_or_below_zero:.3f} |"
                  for a, b, d in self.steps]
        return "\n".join(lines)

    def markdown_table(self) -> str:
        lines = ["| Model | Params | FLOPs/img | Test loss | Test acc % (mean ± std) [95% CI] | "
                 f"Δ vs {self.baseline} [95% CI] | P(Δ ≤ 0) | McNemar p (max) | Train time |",
                 "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
        for row in self.rows:
            acc = row.test_acc
            delta = "baseline" if row.delta is None else f"{row.delta.observed:+.2f} [{row.delta.ci_low:+.2f}, {row.delta.ci_high:+.2f}]"
            share = "" if row.delta is None else f"{row.delta.share_at_or_below_zero:.3f}"
            p_value = "" if row.mcnemar_max_p is None else f"{row.mcnemar_max_p:.2g}"
            lines.append(f"| {row.spec} | {row.params:,} | {row.flops_per_image / 1e6:.1f} M | {row.test_loss.mean:.3f} | "
                         f"{acc.mean:.2f} ± {acc.std:.2f} [{acc.ci_low:.2f}, {acc.ci_high:.2f}] (n={acc.count}) | {delta} | {share} | "
                         f"{p_value} | {row.train_seconds.mean:.0f} s |")
        return "\n".join(lines)

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["model", "params", "flops_per_image", "seeds", "test_loss_mean", "test_loss_std", "test_acc_mean", "test_acc_std",
                         "test_acc_ci_low", "test_acc_ci_high", "delta", "delta_ci_low", "delta_ci_high", "delta_share_le_0",
                         "mcnemar_max_p", "train_seconds_mean", "images_per_second"])
        for row in self.rows:
            delta = row.delta
            writer.writerow([row.spec, row.params, f"{row.flops_per_image:.0f}", " ".join(map(str, row.seeds)),
                             f"{row.test_loss.mean:.4f}", f"{row.test_loss.std:.4f}", f"{row.test_acc.mean:.3f}", f"{row.test_acc.std:.3f}",
                             f"{row.test_acc.ci_low:.3f}", f"{row.test_acc.ci_high:.3f}",
                             *([""] * 4 if delta is None else [f"{delta.observed:.3f}", f"{delta.ci_low:.3f}", f"{delta.ci_high:.3f}",
                                                               f"{delta.share_at_or_below_zero:.4f}"]),
                             "" if row.mcnemar_max_p is None else f"{row.mcnemar_max_p:.3g}", f"{row.train_seconds.mean:.1f}",
                             f"{row.images_per_second:.0f}"])
        return buffer.getvalue()


def finished_runs(study_dir: Path, spec_text: str, seeds: list[int]) -> tuple[dict[int, Path], list[str]]:
    slug = parse_spec(spec_text).slug
    done, missing = {}, []
    for seed in seeds:
        run_dir = study_dir / RUNS_FOLDER / slug / f"seed{seed}"
        if (run_dir / RESULTS_FILE).is_file():
            done[seed] = run_dir
        else:
            missing.append(f"{spec_text} seed {seed}")
    return done, missing


def mean_history(run_dirs: list[Path]) -> list[dict]:
    """Per-epoch mean of each metric over seeds (epochs every seed has)."""
    histories = [read_epoch_history(run_dir / METRICS_FILE) for run_dir in run_dirs]
    epochs = sorted(set.intersection(*(set(h) for h in histories))) if histories else []
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    return [{"epoch": epoch, **{key: sum(h[epoch][key] for h in histories) / len(histories) for key in keys}} for epoch in epochs]


def summarize_study(study_dir: str | Path, write: bool = True, resamples: int = 10_000) -> StudySummary:
    study_dir = Path(study_dir)
    if not (study_dir / STUDY_FILE).is_file():
        raise VitlabError(f"{study_dir} is not a study folder (no {STUDY_FILE}); make one with 'vitlab compare' or 'vitlab sweep'")
    study = read_json(study_dir / STUDY_FILE, "study description")
    specs, seeds = study["specs"], study["seeds"]
    correct: dict[str, dict[int, torch.Tensor]] = {}
    rows, missing = [], []
    for spec in specs:
        runs, not_done = finished_runs(study_dir, spec, seeds)
        missing += not_done
        if not runs:
            continue
        results = {seed: read_json(run_dir / RESULTS_FILE, "run results") for seed, run_dir in runs.items()}
        config = read_json(next(iter(runs.values())) / CONFIG_FILE, "run config")
        correct[spec] = {}
        for seed, run_dir in runs.items():
            predictions = load_predictions(run_dir)
            correct[spec][seed] = predictions["predictions"] == predictions["labels"]
        first = next(iter(results.values()))
        classes = list(first["per_class_acc"])
        rows.append(Row(
            spec=spec, model=first["model"], model_config=config["model_config"], params=first["params"],
            flops_per_image=first.get("flops_per_image", float("nan")), seeds=sorted(runs),
            test_acc=mean_and_ci([r["test_acc"] for r in results.values()]),
            test_loss=mean_and_ci([r["test_loss"] for r in results.values()]),
            train_seconds=mean_and_ci([r["train_seconds"] for r in results.values()]),
            images_per_second=sum(r["images_per_second"] for r in results.values()) / len(results),
            per_seed_acc={seed: r["test_acc"] for seed, r in sorted(results.items())},
            per_class_acc={name: sum(r["per_class_acc"][name] for r in results.values()) / len(results) for name in classes},
            history=mean_history(list(runs.values())),
        ))
    baseline = specs[0]

    def paired(spec_a: str, spec_b: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Correctness (S, N) of two specs over the seeds both have finished."""
        seeds_both = sorted(set(correct.get(spec_a, {})) & set(correct.get(spec_b, {})))
        if not seeds_both:
            return None
        return (torch.stack([correct[spec_a][seed] for seed in seeds_both]), torch.stack([correct[spec_b][seed] for seed in seeds_both]))

    for row in rows:
        pair = paired(row.spec, baseline) if row.spec != baseline else None
        if pair is not None:
            row.delta = paired_bootstrap(*pair, resamples=resamples)
            row.mcnemar_max_p = max(mcnemar(a, b).p_value for a, b in zip(*pair, strict=True))
    steps = []
    for previous, current in zip(rows[1:-1], rows[2:], strict=False):  # among the non-baseline models, in order
        pair = paired(current.spec, previous.spec)
        if pair is not None:
            steps.append((current.spec, previous.spec, paired_bootstrap(*pair, resamples=resamples)))
    summary = StudySummary(study=study, baseline=baseline, rows=rows, missing=missing, steps=steps)
    if write:
        write_summary(summary, study_dir)
    return summary


def write_summary(summary: StudySummary, study_dir: Path) -> None:
    from vitlab.study_plots import write_study_figures

    write_json(study_dir / "results.json", summary.to_dict())
    atomic_write(study_dir / "results.csv", lambda tmp: Path(tmp).write_text(summary.csv_text()))
    notes = ["# Study results\n", f"Command: `{summary.study.get('command', '')}`\n",
             f"Seeds: {', '.join(map(str, summary.study['seeds']))}; budget: `{summary.study['budget']}`\n",
             summary.markdown_table(), ""]
    if summary.steps:
        notes += ["Each model minus the one before it (paired bootstrap, seed-averaged):\n", summary.steps_table(), ""]
    if summary.missing:
        notes.append(f"Not finished yet ({len(summary.missing)}): {', '.join(summary.missing)}\n")
    atomic_write(study_dir / "results.md", lambda tmp: Path(tmp).write_text("\n".join(notes)))
    if summary.rows:
        write_study_figures(summary, study_dir / FIGURES_FOLDER)
