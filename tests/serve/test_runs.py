"""Run folders for `vitlab serve`: loaded with the right kind and names, bad ones refused with the fix."""

import json
import shutil

import pytest

from vitlab.data import CLASSES
from vitlab.errors import VitlabError
from vitlab.models import build_model
from vitlab.models.base import InputSpec
from vitlab.rundir import RunDir
from vitlab.serve.runs import ServedRun, load_run, load_runs


def test_runs_load_with_their_kind_classes_and_accuracy(served_runs):
    cnn, vit = load_runs([served_runs["cnn"], served_runs["vit"]])
    assert (cnn.name, cnn.kind, vit.name, vit.kind) == ("cnn", "cnn", "vit", "vit")
    for run, folder in ((cnn, served_runs["cnn"]), (vit, served_runs["vit"])):
        assert run.classes == list(CLASSES)
        assert run.test_acc == json.loads((folder / "results.json").read_text())["test_acc"]
        assert not run.model.training
        assert f"test accuracy {run.test_acc:.2f}%" in run.title()


def test_a_model_without_attention_or_stages_is_shown_as_predictions_only(tmp_path):
    run = ServedRun("mlp", RunDir(tmp_path), build_model("mlp"), list(CLASSES), 10.0)
    assert run.kind == "other"


def test_runs_sharing_a_folder_name_are_named_by_their_path(served_runs, tmp_path):
    other = tmp_path / "elsewhere" / "cnn"
    shutil.copytree(served_runs["cnn"], other)
    first, second = load_runs([served_runs["cnn"], other])
    assert first.name == str(served_runs["cnn"]) and second.name == str(other)


def damaged_copy(source, tmp_path, remove=(), write=None):
    folder = tmp_path / "damaged"
    shutil.copytree(source, folder)
    for name in remove:
        (folder / name).unlink()
    for name, text in (write or {}).items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("damage, pattern", [
    ({"remove": ["results.json"]}, "has not finished training (no results.json); let it finish or continue it with 'vitlab train --resume"),
    ({"remove": ["results.json", "checkpoint.pt"]}, "is not a finished run folder"),
    ({"write": {"results.json": '{"test_acc": "high"}'}}, "has no valid 'test_acc'"),
    ({"remove": ["model.safetensors"]}, "missing model.safetensors"),
    ({"write": {"model.safetensors": "not weights"}}, "corrupt or truncated"),
])
def test_damaged_run_folders_are_refused_with_the_fix(served_runs, tmp_path, damage, pattern):
    folder = damaged_copy(served_runs["cnn"], tmp_path, **damage)
    with pytest.raises(VitlabError) as error:
        load_runs([folder])
    assert pattern in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_folders_files_repeats_and_nothing_are_refused(served_runs, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cases = [([tmp_path / "loop"], "symbolic link loop"),
             ([tmp_path / "no-such-run"], "does not exist"), ([tmp_path / "notes.txt"], "is a file; pass a run folder"),
             ([served_runs["cnn"], served_runs["cnn"]], "is given twice"), ([], "no run folder given")]
    for paths, pattern in cases:
        with pytest.raises(VitlabError, match=pattern):
            load_runs(paths)


def test_a_run_for_other_images_is_refused(served_runs, tmp_path):
    folder = damaged_copy(served_runs["cnn"], tmp_path)
    description = json.loads((folder / "model.json").read_text())
    description["config"]["num_classes"] = 100
    model = build_model(description["model"], **description["config"])
    model.input_spec = InputSpec(classes=tuple(f"class{i}" for i in range(100)), dataset="cifar100")
    model.save(tmp_path / "other")  # a finished run's folder refuses save(): the foreign model goes in by copy
    for name in ("model.safetensors", "model.json"):
        shutil.copy(tmp_path / "other" / name, folder / name)
    with pytest.raises(VitlabError, match=r"holds a model for 100 classes of 32×32 images \(cifar100\); vitlab serve shows CIFAR-10"):
        load_run(folder)
