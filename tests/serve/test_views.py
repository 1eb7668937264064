"""What the page shows, checked without a browser: top-5 against the model's own softmax, maps against the
Grad-CAM / rollout / raw attention they claim to show, figures against the run folder's files."""

import json
import shutil

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from vitlab.data import CLASSES, normalize
from vitlab.errors import VitlabError
from vitlab.inspect.attention import attention_stack, patch_scores, rollout_maps, to_image_grid
from vitlab.inspect.explain import ExplainSettings, explanation_maps
from vitlab.inspect.figures import confusion_figure
from vitlab.serve import views
from vitlab.serve.runs import load_run


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_enlarge_repeats_every_pixel_as_a_block(images):
    big = views.enlarge(images[0], scale=6)
    assert big.shape == (192, 192, 3) and big.dtype == np.uint8
    for row, column in ((0, 0), (5, 17), (31, 31)):
        block = big[6 * row:6 * row + 6, 6 * column:6 * column + 6]
        assert (block == images[0][:, row, column].numpy()).all()


def test_heat_overlay_is_red_where_the_map_is_high_and_blue_where_low():
    grey = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    heat = torch.zeros(32, 32)
    heat[:8, :8] = 5.0  # any range: the map is stretched to [0, 1]
    overlay = views.heat_overlay(grey, heat)
    expected_hot = np.rint(255 * (0.5 * 128 / 255 + 0.5 * np.array(colormaps["jet"](1.0)[:3]))).astype(np.uint8)
    assert (overlay[0, 0] == expected_hot).all()
    assert overlay[0, 0, 0] > overlay[0, 0, 2] and overlay[-1, -1, 2] > overlay[-1, -1, 0]
    flat = views.heat_overlay(grey, torch.ones(32, 32))  # a constant map must not divide by zero
    assert (flat == flat[0, 0]).all()


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_top_classes_are_the_models_five_most_probable(served_runs, images, kind):
    run = load_run(served_runs[kind])
    top = views.top_classes(run, images[1])
    with torch.no_grad():
        probabilities = run.model(normalize(images[1:2]))[0].softmax(dim=0)
    expected = probabilities.argsort(descending=True)[:5]
    assert list(top) == [CLASSES[i] for i in expected.tolist()]
    assert list(top.values()) == pytest.approx(probabilities[expected].tolist(), abs=1e-6)


def test_cnn_map_is_grad_cam_for_the_predicted_class(served_runs, images):
    run = load_run(served_runs["cnn"])
    overlay, caption = views.where_it_looks(run, images[0])
    inputs = normalize(images[:1])
    logits = run.model(inputs)
    cam, _ = explanation_maps(run.model, inputs, "gradcam", logits.argmax(dim=1), ExplainSettings())  # the library's Grad-CAM
    assert np.array_equal(overlay, views.heat_overlay(images[0], cam[0]))
    assert caption == f"Grad-CAM at the last stage, for the predicted class '{CLASSES[int(logits.argmax())]}'"


def test_vit_map_is_the_attention_rollout(served_runs, images):
    run = load_run(served_runs["vit"])
    overlay, caption = views.where_it_looks(run, images[0])
    _, attention = attention_stack(run.model, normalize(images[:1]))
    assert np.array_equal(overlay, views.heat_overlay(images[0], rollout_maps(run.model, attention, 32)[0]))
    assert caption.startswith("attention rollout through all 2 layers")


def test_one_layers_attention_is_the_cls_row_of_that_layer_and_head(served_runs, images):
    run = load_run(served_runs["vit"])
    _, attention = attention_stack(run.model, normalize(images[2:3]))  # (L, 1, heads, T, T)

    def expected(layer, head):
        matrix = attention[layer - 1, 0].mean(dim=0) if head == 0 else attention[layer - 1, 0, head - 1]  # (T, T)
        return views.heat_overlay(images[2], to_image_grid(patch_scores(matrix[None], run.model.token_layout()), run.model.token_layout(), 32)[0])

    shown = {}
    for layer, head in ((1, 0), (1, 1), (2, 2)):
        shown[layer, head], caption = views.attention_overlay(run, images[2], layer, head)
        assert np.array_equal(shown[layer, head], expected(layer, head))
        assert caption.startswith(f"layer {layer} of 2, " + ("mean of 2 heads" if head == 0 else f"head {head} of 2"))
    assert not np.array_equal(shown[1, 0], shown[2, 2])


def test_attention_outside_the_model_or_of_a_cnn_is_refused(served_runs, images):
    vit, cnn = load_run(served_runs["vit"]), load_run(served_runs["cnn"])
    for layer, head in ((0, 0), (3, 0), (1, 3), (1, -1)):
        with pytest.raises(VitlabError, match="has layers 1..2 and heads 1..2"):
            views.attention_overlay(vit, images[0], layer, head)
    with pytest.raises(VitlabError, match="which has no attention"):
        views.attention_overlay(cnn, images[0], 1, 0)


def test_confusion_matrix_is_drawn_from_the_saved_test_predictions(served_runs, tmp_path):
    run = load_run(served_runs["vit"])
    image, caption = views.confusion_image(run)
    tensors = run.folder.predictions()
    path = confusion_figure(tensors["predictions"], tensors["labels"], tmp_path / "reference.png",
                            title="vit: confusion matrix (% of each true class)")
    assert np.array_equal(image, np.asarray(Image.open(path).convert("RGB")))
    test_acc = json.loads((served_runs["vit"] / "results.json").read_text())["test_acc"]
    assert caption == f"{len(tensors['labels'])} test images, {test_acc:.2f}% right"


def test_curves_come_from_the_run_folder_or_are_redrawn_from_its_history(served_runs, tmp_path):
    folder = tmp_path / "cnn"
    shutil.copytree(served_runs["cnn"], folder)
    image, caption = views.curves_image(load_run(folder))
    assert np.array_equal(image, np.asarray(Image.open(folder / "curves.png").convert("RGB")))
    assert caption == "curves.png from the run folder"
    (folder / "curves.png").write_bytes(b"damaged")
    image, caption = views.curves_image(load_run(folder))
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100
    assert caption == "redrawn from metrics.jsonl (1 epoch)"
    (folder / "metrics.jsonl").unlink()
    assert views.curves_image(load_run(folder)) == (None, f"no training curves: {folder} has neither a readable curves.png nor a history (metrics.jsonl)")


def test_a_run_without_predictions_shows_why_there_is_no_confusion_matrix(served_runs, tmp_path):
    folder = tmp_path / "cnn"
    shutil.copytree(served_runs["cnn"], folder)
    (folder / "test_predictions.safetensors").unlink()
    image, caption = views.confusion_image(load_run(folder))
    assert image is None and caption.startswith(f"no confusion matrix: {folder} has no test_predictions.safetensors")
