"""`vitlab report STUDY_DIR`: a self-contained report of a study (Markdown, optionally HTML with the
figures embedded), naming the command, versions, device and seeds behind every number."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from vitlab.io import atomic_write, read_json
from vitlab.study import RUNS_FOLDER, parse_spec
from vitlab.summary import FIGURES_FOLDER, StudySummary, summarize_study
from vitlab.training import RESULTS_FILE

FIGURE_CAPTIONS = {
    "bootstrap.png": "Accuracy difference to the baseline: paired bootstrap over test images (10,000 resamples), 95% CI.",
    "curves.png": "Validation accuracy and loss per epoch, mean over seeds.",
    "accuracy_vs_time.png": "Test accuracy (95% CI over seeds) against training time per run.",
}


def run_provenance(study_dir: Path, summary: StudySummary) -> list[dict]:
    """Device, precision, versions and commit of every finished run."""
    records = []
    for row in summary.rows:
        slug = parse_spec(row.spec).slug
        for seed in row.seeds:
            results = read_json(study_dir / RUNS_FOLDER / slug / f"seed{seed}" / RESULTS_FILE, "run results")
            records.append({"spec": row.spec, "seed": seed, "test_acc": results["test_acc"], "test_loss": results["test_loss"],
                            "train_seconds": results["train_seconds"], "device": results["device"], "precision": results["precision"],
                            "versions": results["versions"], "git_commit": results.get("git_commit"),
                            "resumed": results.get("resumed", False), "folder": f"{RUNS_FOLDER}/{slug}/seed{seed}"})
    return records


def ordering_sentence(summary: StudySummary) -> str:
    ranked = sorted(summary.rows, key=lambda row: -row.test_acc.mean)
    return "Ranking by mean test accuracy: " + " > ".join(f"{row.spec} ({row.test_acc.mean:.2f}%)" for row in ranked) + "."


def report_markdown(study_dir: Path, summary: StudySummary) -> str:
    study = summary.study
    records = run_provenance(study_dir, summary)
    devices = sorted({r["device"] for r in records})
    precisions = sorted({r["precision"] for r in records})
    version_sets = sorted({", ".join(f"{k} {v}" for k, v in r["versions"].items()) for r in records})
    commits = sorted({str(r["git_commit"]) for r in records})
    lines = [
        f"# Study report: {' vs '.join(study['specs'])}", "",
        "## How it was made", "",
        f"- Command: `{study.get('command', '')}` (run again in the same folder to resume or re-summarise)",
        f"- Kind: {study['kind']}" + (f", varying `{study['vary']}`" if study.get("vary") else ""),
        f"- Shared budget (every run): `{study['budget']}`; other settings are vitlab's defaults, recorded in each run's config.json",
        f"- Seeds: {', '.join(map(str, study['seeds']))} (the train/validation split is the same for all)",
        f"- Device: {'; '.join(devices)}; precision: {', '.join(precisions)}",
        f"- Versions: {'; '.join(version_sets)}",
        f"- vitlab commit: {', '.join(commits)}; study created {study.get('created', '?')}",
        "",
        "## Results", "",
        summary.markdown_table(), "",
        f"Test accuracy: mean ± sample std over seeds, with a 95% t-interval over seeds. Δ: accuracy minus {summary.baseline}'s, "
        "seed-averaged, with a 95% paired-bootstrap interval over the test images (10,000 resamples); P(Δ ≤ 0) is the share of "
        "resamples where the model is not better. McNemar: exact two-sided test per seed pair, largest p shown.", "",
        ordering_sentence(summary), "",
    ]
    if summary.steps:
        lines += ["Each model minus the one listed before it (same paired bootstrap), for questions of order:", "",
                  summary.steps_table(), ""]
    if summary.missing:
        lines += [f"**Unfinished runs ({len(summary.missing)}):** {', '.join(summary.missing)}", ""]
    figures = sorted((study_dir / FIGURES_FOLDER).glob("*.png"))
    if figures:
        lines += ["## Figures", ""]
        for figure in figures:
            caption = FIGURE_CAPTIONS.get(figure.name, f"Test accuracy against {figure.stem.removeprefix('accuracy_vs_')} (95% CI over seeds).")
            lines += [f"![{figure.stem}]({FIGURES_FOLDER}/{figure.name})", "", f"*{caption}*", ""]
    lines += ["## Every run", "", "| Model | Seed | Test acc % | Test loss | Train time | Resumed | Folder |",
              "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    lines += [f"| {r['spec']} | {r['seed']} | {r['test_acc']:.2f} | {r['test_loss']:.4f} | {r['train_seconds']:.0f} s | "
              f"{'yes' if r['resumed'] else 'no'} | `{r['folder']}` |" for r in records]
    classes = list(summary.rows[0].per_class_acc) if summary.rows else []
    if classes:
        lines += ["", "## Per-class test accuracy (mean over seeds, %)", "",
                  "| Model | " + " | ".join(classes) + " |", "| --- |" + " ---: |" * len(classes)]
        lines += [f"| {row.spec} | " + " | ".join(f"{row.per_class_acc[c]:.1f}" for c in classes) + " |" for row in summary.rows]
    return "\n".join(lines) + "\n"


def markdown_to_html(markdown: str, study_dir: Path) -> str:
    """Just enough Markdown for this report: headings, lists, tables, images (embedded), paragraphs."""
    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
        return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", text)

    body, table = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if not all(set(cell) <= set("-: ") for cell in cells):
                table.append(cells)
            continue
        if table:
            head, *rest = table
            body.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in rest) + "</table>")
            table = []
        if image := re.match(r"!\[([^\]]*)\]\(([^)]+)\)", line):
            data = base64.b64encode((study_dir / image.group(2)).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<ul><li>{inline(line[2:])}</li></ul>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}")
    head = f"<meta charset='utf-8'><title>vitlab study report</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>\n"


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
