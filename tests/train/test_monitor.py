"""Training monitors: the GIF (one frame per epoch, rebuildable) and TensorBoard logs."""

import pytest
from PIL import Image

from vitlab.cli import main

VIT = ["--model", "vit", "--patch_size", "6", "--hidden_size", "16", "--num_heads", "2", "--num_blocks", "1", "--pool", "mean"]
QUICK = ["--subset", "300", "--test_subset", "100", "--batch-size", "50", "--progress", "false"]


@pytest.mark.parametrize("model_args, epochs", [(VIT, 3), (["--model", "cnn-small"], 2)])
def test_gif_has_one_frame_per_epoch_and_can_be_rebuilt(model_args, epochs, cifar_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *model_args, *QUICK, "--epochs", str(epochs), "--gif", "true", "--data-dir", str(cifar_root), "--out", str(run)]) == 0
    assert Image.open(run / "training.gif").n_frames == epochs
    assert len(list((run / "snapshots").glob("epoch_*.safetensors"))) == epochs
    (run / "training.gif").unlink()
    assert main(["gif", str(run)]) == 0
    assert Image.open(run / "training.gif").n_frames == epochs


def test_gif_of_a_run_without_snapshots_is_a_one_line_error(cifar_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "cnn-small", *QUICK, "--epochs", "1", "--data-dir", str(cifar_root), "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["gif", str(run)]) == 2
    assert "--gif true" in capsys.readouterr().err


def test_tensorboard_logs_scalars_every_epoch_and_attention_images(cifar_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["train", *VIT, *QUICK, "--epochs", "2", "--tensorboard", "true", "--data-dir", str(cifar_root), "--out", str(run)]) == 0
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    for tag in ("loss/train", "loss/validation", "accuracy/train", "accuracy/validation", "learning_rate", "images_per_second"):
        assert [event.step for event in events.Scalars(tag)] == [1, 2], tag
    assert any(tag.startswith("attention_rollout") for tag in tags["images"])
    assert (run / "metrics.jsonl").is_file()  # always written as well
