"""Studies: specs, plans, the compare/sweep commands end to end, resuming after a kill."""

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import vitlab_process
from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.study import StudyPlan, parse_spec, sweep_specs

TINY = ["--subset", "200", "--test_subset", "100", "--epochs", "1", "--batch-size", "50", "--progress", "false",
        "--hidden_size", "16", "--num_blocks", "1", "--seeds", "2"]


def test_parse_spec_reads_model_preset_and_typed_overrides():
    spec = parse_spec("vit:patch_size=6,pool=mean,dropout=0.1")
    assert (spec.model, spec.preset) == ("vit", None)
    assert spec.overrides == {"patch_size": 6, "pool": "mean", "dropout": 0.1}
    assert spec.slug == "vit_patch_size-6_pool-mean_dropout-0.1"
    assert parse_spec("vit-fast").preset == "vit-fast" and parse_spec("vit-fast").model == "vit"
    assert parse_spec("cnn-small").overrides == {}


@pytest.mark.parametrize("text, message", [
    ("resnet", "unknown model or preset"),
    ("vit:depth=3", "has no setting 'depth'"),
    ("vit:patch_size=big", "bad value 'big'"),
    ("vit:num_heads=3", "not divisible by num_heads"),
    ("vit:patch_size", "expected NAME=VALUE"),
])
def test_bad_specs_are_refused_with_the_reason(text, message):
    with pytest.raises(VitlabError, match=message):
        parse_spec(text)


def test_sweep_makes_one_spec_per_value():
    assert sweep_specs("vit", "num_blocks=2,4,8") == ["vit:num_blocks=2", "vit:num_blocks=4", "vit:num_blocks=8"]
    with pytest.raises(VitlabError, match="at least two values"):
        sweep_specs("vit", "num_blocks=2")


def test_budget_model_settings_apply_only_to_models_that_have_them():
    plan = StudyPlan(specs=["cnn-small", "vit:patch_size=8"], budget={"epochs": 3, "hidden_size": 32}, seeds=[0])
    cnn = plan.run_config(parse_spec("cnn-small"), seed=5)
    vit = plan.run_config(parse_spec("vit:patch_size=8"), seed=5)
    assert cnn.model_config == {} and cnn.train.epochs == 3 and cnn.train.seed == 5
    assert vit.model_config == {"hidden_size": 32, "patch_size": 8} and vit.train.epochs == 3


def test_compare_writes_tables_and_figures_and_a_rerun_trains_nothing(cifar_root, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["compare", "cnn-small", "vit:patch_size=8", "mlp", *TINY, "--data-dir", str(cifar_root), "--out", str(out)]
    assert main(args) == 0
    for name in ("study.json", "results.md", "results.csv", "results.json", "figures/bootstrap.png", "figures/curves.png",
                 "figures/accuracy_vs_time.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert [row["spec"] for row in results["rows"]] == ["cnn-small", "vit:patch_size=8", "mlp"]
    assert results["rows"][0]["delta"] is None and results["rows"][1]["delta"]["resamples"] == 10_000
    assert all(row["seeds"] == [0, 1] and row["flops_per_image"] > 0 for row in results["rows"])
    assert [(step["model"], step["minus"]) for step in results["steps"]] == [("mlp", "vit:patch_size=8")]
    assert len((out / "results.csv").read_text().splitlines()) == 4
    finished = {path: path.stat().st_mtime_ns for path in out.glob("runs/*/*/results.json")}
    assert len(finished) == 6
    capsys.readouterr()
    assert main(args) == 0
    assert "0 to train" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in out.glob("runs/*/*/results.json")} == finished


def test_a_different_study_in_the_same_folder_is_refused(cifar_root, tmp_path, capsys):
    out = tmp_path / "study"
    base = [*TINY, "--data-dir", str(cifar_root), "--out", str(out), "--seeds", "1"]
    assert main(["compare", "cnn-small", "mlp", *base]) == 0
    capsys.readouterr()
    assert main(["compare", "cnn-small", "vit", *base]) == 2
    error = capsys.readouterr().err
    assert "holds a different study" in error and len(error.strip().splitlines()) == 1


def test_sweep_varies_one_setting_and_plots_accuracy_against_it(cifar_root, tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", "vit", "--vary", "pos_embed=learned,sincos", *TINY, "--seeds", "1",
                 "--data-dir", str(cifar_root), "--out", str(out)]) == 0
    study = json.loads((out / "study.json").read_text())
    assert study["specs"] == ["vit:pos_embed=learned", "vit:pos_embed=sincos"] and study["vary"] == "pos_embed"
    assert (out / "figures" / "accuracy_vs_pos_embed.png").is_file()


def test_report_names_command_seeds_and_versions_and_embeds_figures(cifar_root, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["compare", "cnn-small", "mlp", *TINY, "--data-dir", str(cifar_root), "--out", str(out)]) == 0
    assert main(["report", str(out), "--html"]) == 0
    report = (out / "report.md").read_text()
    assert "vitlab compare cnn-small mlp" in report or "compare cnn-small mlp" in report
    assert "Seeds: 0, 1" in report and "torch" in report and "![bootstrap](figures/bootstrap.png)" in report
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_a_killed_study_resumes_without_redoing_finished_runs(cifar_root, tmp_path):
    out = tmp_path / "study"
    command = ["compare", "mlp", "vit:patch_size=8", *TINY, "--epochs", "3", "--data-dir", str(cifar_root), "--out", str(out)]
    process = vitlab_process(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("runs/*/*/results.json")):
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {path: path.stat().st_mtime_ns for path in out.glob("runs/*/*/results.json")}
    assert 1 <= len(finished) < 4, "kill the study half-way"
    rerun = vitlab_process(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    assert f"{len(finished)} already finished" in stdout
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    assert len(list(out.glob("runs/*/*/results.json"))) == 4
