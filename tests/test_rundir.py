"""The run folder's own rules: what a new run may clear, and who may train it."""

import pytest

from vitlab.errors import VitlabError
from vitlab.rundir import RUN_MARKER, RunDir


def test_a_folder_of_the_users_own_is_refused_and_left_untouched(tmp_path):
    folder = tmp_path / "mine"
    (folder / "snapshots").mkdir(parents=True)
    (folder / "config.json").write_text('{"mine": true}')
    (folder / "snapshots" / "notes.txt").write_text("notes")
    with pytest.raises(VitlabError, match="not empty"):
        RunDir(folder).prepare()
    assert (folder / "config.json").read_text() == '{"mine": true}' and (folder / "snapshots" / "notes.txt").is_file()
    assert not (folder / RUN_MARKER).exists()


def test_a_failed_start_of_vitlabs_own_is_cleared_for_the_new_run(tmp_path):
    folder = RunDir(tmp_path / "run")
    folder.prepare()
    assert folder.marker.is_file()
    folder.config_file.write_text("{}")  # what a run killed before its first checkpoint leaves
    (folder.path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    folder.prepare()
    assert sorted(entry.name for entry in folder.path.iterdir()) == [RUN_MARKER]


def test_a_run_another_process_is_training_is_refused(tmp_path):
    folder = RunDir(tmp_path / "run")
    folder.prepare()
    with folder.training_lock():
        folder.config_file.write_text("{}")
        with pytest.raises(VitlabError, match="being trained by another process"):
            RunDir(folder.path).prepare()
        with pytest.raises(VitlabError, match="being trained by another process"):
            with RunDir(folder.path).training_lock():
                pass
    assert folder.config_file.read_text() == "{}"


def test_a_symbolic_link_loop_is_a_one_line_error(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(VitlabError, match="symbolic link loop"):
        RunDir(tmp_path).is_run_file(loop / "x.gif")


def test_a_run_folder_whose_name_is_not_utf8_reads_back(tmp_path):
    import os

    import torch

    from vitlab.models import build_model
    from vitlab.models.base import VitlabModel

    folder = RunDir(tmp_path / os.fsdecode(b"run\xff"))  # a byte the file system takes and UTF-8 does not
    folder.path.mkdir()
    labels = torch.tensor([1, 2, 3])
    folder.save_predictions(labels, labels.clone(), torch.eye(4)[1:])
    assert torch.equal(folder.predictions()["predictions"], labels)
    model = build_model("mlp", hidden_size=8)
    model.save(folder.path)
    restored = VitlabModel.load(folder.path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values(), strict=True))
