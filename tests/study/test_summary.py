"""Study summaries and reports from run folders: seed-aware intervals, one seed, a missing baseline, unequal seeds,
and a crafted study folder that must not leak files into the report."""

import json
import shutil

import pytest

from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.study.summary import summarize_study

TINY = ["--subset", "200", "--test_subset", "100", "--epochs", "1", "--batch-size", "50", "--progress", "false"]


def make_study(cifar_root, out, seeds: int = 3, specs=("cnn-small", "mlp:hidden_size=16")) -> None:
    assert main(["compare", *specs, *TINY, "--seeds", str(seeds), "--data-dir", str(cifar_root), "--out", str(out)]) == 0


def test_one_seed_gives_no_interval_and_says_so(cifar_root, tmp_path):
    out = tmp_path / "study"
    make_study(cifar_root, out, seeds=1)
    summary = summarize_study(out)
    assert summary.rows[1].delta.ci_low is None and summary.rows[0].test_acc.ci_low is None
    table = (out / "results.md").read_text()
    assert "n/a — needs ≥2 seeds" in table and "n=1" in table


def test_a_missing_baseline_is_stated_and_rows_keep_their_places(cifar_root, tmp_path):
    out = tmp_path / "study"
    make_study(cifar_root, out, seeds=2)
    shutil.rmtree(out / "runs" / "cnn-small")
    summary = summarize_study(out)
    assert [row.spec for row in summary.rows] == ["mlp:hidden_size=16"] and summary.rows[0].delta is None
    assert not summary.baseline_finished
    assert "The baseline (cnn-small) has no finished run yet" in (out / "results.md").read_text()
    assert "n/a (baseline not finished)" in (out / "results.md").read_text()


def test_unequal_seed_sets_use_every_finished_seed_in_both_columns(cifar_root, tmp_path):
    out = tmp_path / "study"
    make_study(cifar_root, out, seeds=3)
    shutil.rmtree(out / "runs" / "mlp_hidden_size-16" / "seed2")
    summary = summarize_study(out)
    mlp = summary.rows[1]
    assert mlp.seeds == [0, 1] and mlp.test_acc.count == 2
    assert (mlp.delta.seeds_a, mlp.delta.seeds_b) == (2, 3)
    assert mlp.delta.observed == pytest.approx(mlp.test_acc.mean - summary.rows[0].test_acc.mean)
    assert [d.seed for d in mlp.diagnostics] == [0, 1]  # per-seed diagnostics only where both have the seed


def test_the_report_embeds_only_the_study_figures_and_escapes_what_it_reads(cifar_root, tmp_path):
    out = tmp_path / "study"
    make_study(cifar_root, out, seeds=2)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG private")
    study = json.loads((out / "study.json").read_text())
    (out / "figures" / "zz.png").symlink_to(out / "figures" / "zz.png")  # a loop is skipped, not a crash
    study["command"] = f"vitlab compare\n\n![leak]({secret})\n![loop](figures/zz.png)\n<script>alert(1)</script>"
    (out / "study.json").write_text(json.dumps(study))
    assert main(["report", str(out), "--html"]) == 0
    page = (out / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "cHJpdmF0ZQ" not in page and "private" not in page  # the secret file's bytes, base64 or not
    assert page.count("data:image/png;base64,") == len([p for p in (out / "figures").glob("*.png") if p.name != "zz.png"])
    report = (out / "report.md").read_text()
    assert "Seeds: 0, 1" in report and "torch" in report and "![differences](figures/differences.png)" in report


@pytest.mark.parametrize("damage", [
    lambda study: study.update(specs="cnn-small"),
    lambda study: study.update(seeds=[0, "one"]),
    lambda study: study.clear(),
    lambda study: study.update(vary=["lr"]),
])
def test_a_damaged_study_json_is_one_clear_error(cifar_root, tmp_path, damage, capsys):
    out = tmp_path / "study"
    make_study(cifar_root, out, seeds=1)
    study = json.loads((out / "study.json").read_text())
    damage(study)
    (out / "study.json").write_text(json.dumps(study))
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    error = capsys.readouterr().err
    assert "study.json is damaged" in error and len(error.strip().splitlines()) == 1
    with pytest.raises(VitlabError):
        summarize_study(out)


@pytest.mark.parametrize(("file", "edit", "message"), [
    ("results.json", lambda results: results.update(params="abc"), "'params' 'abc', not a number"),
    ("results.json", lambda results: results.update(per_class_acc=[1, 2]), "'per_class_acc' that is not class names"),
    ("results.json", lambda results: results["per_class_acc"].pop("cat"), None),  # a class one seed lacks: left out of the table
    ("metrics.jsonl", None, "lacks one of"),
])
def test_edited_run_files_are_one_clear_error_or_left_out(cifar_root, tmp_path, file, edit, message, capsys):
    out = tmp_path / "study"
    make_study(cifar_root, out, seeds=2)
    path = sorted(out.glob(f"runs/*/seed1/{file}"))[0]
    if edit is None:  # a metrics line without its validation loss
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        lines[0].pop("val_loss")
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    else:
        results = json.loads(path.read_text())
        edit(results)
        path.write_text(json.dumps(results))
    capsys.readouterr()
    status = main(["report", str(out)])
    error = capsys.readouterr().err
    if message is None:
        header = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| Model | airplane"))
        assert status == 0 and "| cat |" not in header and "| dog |" in header, error
    else:
        assert status == 2 and message in error and len(error.strip().splitlines()) == 1, error
