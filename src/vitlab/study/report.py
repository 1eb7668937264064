"""`vitlab report STUDY_DIR`: a self-contained report of a study (Markdown, optionally HTML with the
figures embedded), naming the command, versions, device and seeds behind every number."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from vitlab.io import atomic_write
from vitlab.rundir import FIGURES_FOLDER, RunDir
from vitlab.study.plan import RUNS_FOLDER, parse_spec
from vitlab.study.summary import StudySummary, escaped, summarize_study

FIGURE_CAPTIONS = {
    "differences.png": "Accuracy difference to the baseline with its 95% seed-aware interval (training seeds and test images).",
    "curves.png": "Validation accuracy and loss per epoch, mean over seeds.",
    "accuracy_vs_time.png": "Test accuracy (95% CI over seeds) against training time per run.",
}


def run_provenance(study_dir: Path, summary: StudySummary) -> list[dict]:
    """Device, precision, versions and commit of every finished run."""
    records = []
    for row in summary.rows:
        slug = parse_spec(row.spec).slug
        for seed in row.seeds:
            results = RunDir(study_dir / RUNS_FOLDER / slug / f"seed{seed}").results()
            records.append({"spec": row.spec, "seed": seed, "test_acc": results["test_acc"], "test_loss": results["test_loss"],
                            "train_seconds": results["train_seconds"], "device": str(results.get("device", "?")),
                            "precision": str(results.get("precision", "?")),
                            "versions": results.get("versions") if isinstance(results.get("versions"), dict) else {},
                            "git_commit": results.get("git_commit"),
                            "resumed": results.get("resumed", False), "folder": f"{RUNS_FOLDER}/{slug}/seed{seed}"})
    return records


def ordering_sentence(summary: StudySummary) -> str:
    ranked = sorted(summary.rows, key=lambda row: -row.test_acc.mean)
    return "Ranking by mean test accuracy: " + " > ".join(f"{escaped(row.spec)} ({row.test_acc.mean:.2f}%)" for row in ranked) + "."


def report_markdown(study_dir: Path, summary: StudySummary) -> str:
    study = summary.study
    records = run_provenance(study_dir, summary)
    devices = sorted({r["device"] for r in records})
    precisions = sorted({r["precision"] for r in records})
    version_sets = sorted({", ".join(f"{k} {v}" for k, v in r["versions"].items()) for r in records})
    commits = sorted({str(r["git_commit"]) for r in records})
    lines = [
        f"# Study report: {escaped(' vs '.join(study['specs']))}", "",
        "## How it was made", "",
        f"- Command: <code>{escaped(study.get('command', ''))}</code> (run again in the same folder to resume or re-summarise)",
        f"- Kind: {escaped(study.get('kind', '?'))}" + (f", varying <code>{escaped(study['vary'])}</code>" if study.get("vary") else ""),
        f"- Shared budget (every run): <code>{escaped(study.get('budget'))}</code>; other settings are vitlab's defaults, "
        "recorded in each run's config.json",
        f"- Seeds: {escaped(', '.join(map(str, study['seeds'])))} (the train/validation split is the same for all)",
        f"- Device: {escaped('; '.join(devices))}; precision: {escaped(', '.join(precisions))}",
        f"- Versions: {escaped('; '.join(version_sets))}",
        f"- vitlab commit: {escaped(', '.join(commits))}; study created {escaped(study.get('created', '?'))}",
        "",
        "## Results", "",
        summary.markdown_table(), "",
        "Test accuracy: mean ± sample std over seeds, with a 95% t-interval over seeds (none for one seed). Δ: its 95% interval "
        "covers both training-seed noise and test-set sampling (see vitlab.study.stats and its calibration). McNemar: exact "
        "two-sided test per seed pair, largest p shown: a per-seed diagnostic of two trained networks, not of two configurations.", "",
        ordering_sentence(summary), "",
    ]
    if summary.steps:
        lines += ["Each model minus the one listed before it (the same seed-aware interval), for questions of order:", "",
                  summary.steps_table(), ""]
    if summary.gaps:
        lines += [summary.gaps_markdown(), ""]
    if summary.missing:
        lines += [f"**Unfinished runs ({len(summary.missing)}):** {', '.join(summary.missing)}", ""]
    figures = sorted((study_dir / FIGURES_FOLDER).glob("*.png"))
    if figures:
        lines += ["## Figures", ""]
        for figure in figures:
            if figure.name.startswith("gaps_vs_"):
                caption = (f"Each curve minus the first at every {figure.stem.removeprefix('gaps_vs_')}, "
                           "with its 95% seed-aware interval (training seeds and test images).")
            else:
                caption = FIGURE_CAPTIONS.get(figure.name, f"Test accuracy against {figure.stem.removeprefix('accuracy_vs_')} (95% CI over seeds).")
            lines += [f"![{figure.stem}]({FIGURES_FOLDER}/{figure.name})", "", f"*{caption}*", ""]
    lines += ["## Every run", "", "| Model | Seed | Test acc % | Test loss | Train time | Resumed | Folder |",
              "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    lines += [f"| {escaped(r['spec'])} | {r['seed']} | {r['test_acc']:.2f} | {r['test_loss']:.4f} | {r['train_seconds']:.0f} s | "
              f"{'yes' if r['resumed'] else 'no'} | <code>{escaped(r['folder'])}</code> |" for r in records]
    classes = [name for name in summary.rows[0].per_class_acc if all(name in row.per_class_acc for row in summary.rows)] if summary.rows else []
    if classes:
        lines += ["", "## Per-class test accuracy (mean over seeds, %)", "",
                  "| Model | " + " | ".join(escaped(c) for c in classes) + " |", "| --- |" + " ---: |" * len(classes)]
        lines += [f"| {escaped(row.spec)} | " + " | ".join(f"{row.per_class_acc[c]:.1f}" for c in classes) + " |" for row in summary.rows]
    return "\n".join(lines) + "\n"


def markdown_to_html(markdown_text: str, study_dir: Path) -> str:
    """The report as one self-contained HTML page (Python-Markdown with tables); only the study's own
    figures (PNG files in STUDY_DIR/figures) are embedded, as data URIs; any other image reference is dropped."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    figures = (study_dir / FIGURES_FOLDER).resolve()

    def embed(match: re.Match) -> str:
        alt, source = match.group("alt"), html.unescape(match.group("src"))
        try:
            path = (study_dir / source).resolve()
        except (OSError, RuntimeError):  # a symbolic link loop
            path = None
        if path is None or path.parent != figures or path.suffix != ".png" or not path.is_file():
            return f"<em>[figure {html.escape(source)} not embedded: not one of this study's figures]</em>"
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img alt="{alt}" src="data:image/png;base64,{data}">'

    body = re.sub(r'<img alt="(?P<alt>[^"]*)" src="(?P<src>[^"]*)"\s*/?>', embed, body)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}")
    head = f"<meta charset='utf-8'><title>vitlab study report</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{body}</body></html>\n"


def write_report(study_dir: str | Path, html: bool = False) -> list[Path]:
    study_dir = Path(study_dir)
    summary = summarize_study(study_dir)  # refresh tables and figures first
    markdown = report_markdown(study_dir, summary)
    written = [study_dir / "report.md"]
    atomic_write(written[0], lambda tmp: Path(tmp).write_text(markdown))
    if html:
        written.append(study_dir / "report.html")
        page = markdown_to_html(markdown, study_dir)
        atomic_write(written[1], lambda tmp: Path(tmp).write_text(page))
    return written
