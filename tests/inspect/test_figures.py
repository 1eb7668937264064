"""The inspection commands end to end: attention, explain, evaluate --figures, predict."""

import json

import numpy as np
import pytest
from PIL import Image

from vitlab.cli import main
from vitlab.inspect.figures import confusion_matrix

QUICK = ["--subset", "300", "--test_subset", "100", "--epochs", "1", "--batch-size", "50", "--progress", "false"]
VIT = ["--model", "vit", "--patch_size", "6", "--hidden_size", "16", "--num_heads", "2", "--num_blocks", "2"]


def train(tmp_path, cifar_root, name, args):
    run = tmp_path / name
    assert main(["train", *args, *QUICK, "--data-dir", str(cifar_root), "--out", str(run)]) == 0
    return run


def png_count(folder, pattern="*.png"):
    return len(list(folder.glob(pattern)))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_attention_writes_a_grid_per_image_and_the_distance_plot(pool, cifar_root, tmp_path, capsys):
    run = train(tmp_path, cifar_root, "vit", [*VIT, "--pool", pool])
    out = tmp_path / "figures"
    assert main(["attention", str(run), "--images", "3", "--data-dir", str(cifar_root), "--out", str(out)]) == 0
    assert png_count(out, "attention_0*.png") == 3 and (out / "attention_distance.png").is_file()
    assert main(["attention", str(run), "--images", "1", "--head", "all", "--method", "rollout", "--layer", "2",
                 "--data-dir", str(cifar_root), "--out", str(tmp_path / "more")]) == 0
    assert (tmp_path / "more" / "attention_000.png").is_file()


def test_attention_refuses_bad_choices_and_cnn_runs(cifar_root, tmp_path, capsys):
    vit = train(tmp_path, cifar_root, "vit", VIT)
    cnn = train(tmp_path, cifar_root, "cnn", ["--model", "cnn-small"])
    capsys.readouterr()
    for args, message in [([str(vit), "--layer", "7"], "--layer must be all or a layer number 1..2"),
                          ([str(vit), "--head", "9"], "--head must be mean, all or a head number 1..2"),
                          ([str(cnn)], "returns no attention")]:
        assert main(["attention", *args, "--images", "1", "--data-dir", str(cifar_root), "--out", str(tmp_path / "x")]) == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1, error


def test_explain_shows_cnn_and_vit_side_by_side_with_feature_maps(cifar_root, tmp_path, capsys):
    vit = train(tmp_path, cifar_root, "vit", VIT)
    cnn = train(tmp_path, cifar_root, "cnn", ["--model", "cnn-small"])
    out = tmp_path / "explain"
    assert main(["explain", str(cnn), str(vit), "--images", "2", "--data-dir", str(cifar_root), "--out", str(out)]) == 0
    assert (out / "explain.png").is_file() and (out / "feature_maps_cnn.png").is_file()
    with Image.open(out / "explain.png") as figure:  # rows: images; columns: the image, then one per run (2.0 × 2.1 inches each)
        assert figure.width / figure.height == pytest.approx((2.0 * 3) / (2.1 * 2), rel=0.05)
    ranking = json.loads((out / "explain_scores.json").read_text())["ranking"]  # auto: Grad-CAM for the CNN, rollout for the ViT
    assert sorted((row["run"], row["method"]) for row in ranking) == [("cnn", "gradcam"), ("vit", "rollout")]
    assert [row["rank"] for row in ranking] == [1, 2] and ranking[0]["score"] >= ranking[1]["score"]
    rows = [line for line in (out / "explain_scores.md").read_text().splitlines() if line.startswith(("| 1 |", "| 2 |", "| 3 |"))]
    assert len(rows) == 2


def test_evaluate_figures_and_the_confusion_matrix(cifar_root, tmp_path, capsys):
    run = train(tmp_path, cifar_root, "cnn", ["--model", "cnn-small"])
    assert main(["evaluate", str(run), "--data-dir", str(cifar_root), "--figures"]) == 0
    for name in ("confusion.png", "per_class.png", "mistakes.png"):
        assert (run / "figures" / name).is_file()
    import torch

    counts = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), classes=3)
    assert counts.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_predict_answers_every_readable_file_and_reports_the_rest(cifar_root, tmp_path, capsys):
    run = train(tmp_path, cifar_root, "cnn", ["--model", "cnn-small"])
    picture = tmp_path / "big.jpg"
    Image.fromarray((np.random.default_rng(0).random((120, 90, 3)) * 255).astype("uint8")).save(picture)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    capsys.readouterr()
    assert main(["predict", str(run), str(text), str(picture), "--top", "2"]) == 2
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{picture}: ") and lines[0].count("%") == 2
    assert "notes.txt: not a readable image" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert main(["predict", str(run), str(picture)]) == 0
