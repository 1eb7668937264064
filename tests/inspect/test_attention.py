"""Attention rollout, patch scores, image mapping and attention distance against hand computations."""

import numpy as np
import pytest
import torch

from vitlab.inspect.attention import attention_stack, mean_attention_distance, patch_scores, rollout, to_image_grid
from vitlab.models import build_model
from vitlab.models.vit import ViTConfig


def rollout_by_hand(layers: list[np.ndarray]) -> np.ndarray:
    """Abnar & Zuidema written out with loops: Â = (A + I) with rows renormalised; R = Â_L ··· Â_1."""
    size = layers[0].shape[0]
    result = np.eye(size)
    for attention in layers:
        with_residual = np.array([[attention[i, j] + (1.0 if i == j else 0.0) for j in range(size)] for i in range(size)])
        for i in range(size):
            with_residual[i] /= sum(with_residual[i])
        product = np.zeros((size, size))
        for i in range(size):
            for j in range(size):
                product[i, j] = sum(with_residual[i, k] * result[k, j] for k in range(size))
        result = product
    return result


def test_rollout_equals_the_hand_computation_on_a_hand_made_stack():
    # Two layers, two heads, three tokens; rows of each head sum to 1.
    layer1 = torch.tensor([[[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]],
                           [[0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    layer2 = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]],
                           [[0.2, 0.2, 0.6], [0.1, 0.1, 0.8], [0.6, 0.2, 0.2]]], dtype=torch.float64)
    stack = torch.stack([layer1, layer2])[:, None]  # (L=2, B=1, heads=2, T=3, T=3)
    expected = rollout_by_hand([layer1.numpy().mean(axis=0), layer2.numpy().mean(axis=0)])
    result = rollout(stack)[0].numpy()
    np.testing.assert_allclose(result, expected, rtol=1e-12)
    np.testing.assert_allclose(result.sum(axis=1), 1.0, rtol=1e-12)  # still a mixing matrix


def test_rollout_of_no_mixing_is_the_identity():
    stack = torch.eye(5).expand(3, 2, 4, 5, 5)  # every token attends only to itself
    torch.testing.assert_close(rollout(stack), torch.eye(5).expand(2, 5, 5))


def test_patch_scores_read_the_cls_row_or_average_the_patch_rows_and_skip_registers():
    matrix = torch.arange(16.0).reshape(1, 4, 4)
    with_cls = ViTConfig(patch_size=16, hidden_size=8, num_heads=2, pool="cls")  # 4 patches: tokens [CLS, p0..p3]
    assert patch_scores(torch.arange(25.0).reshape(1, 5, 5), with_cls).tolist() == [[1.0, 2.0, 3.0, 4.0]]
    mean = ViTConfig(patch_size=16, hidden_size=8, num_heads=2, pool="mean")
    assert patch_scores(matrix, mean).tolist() == [[6.0, 7.0, 8.0, 9.0]]
    registers = ViTConfig(patch_size=16, hidden_size=8, num_heads=2, pool="cls", registers=2)  # [CLS, p0..p3, r0, r1]
    scores = patch_scores(torch.arange(49.0).reshape(1, 7, 7), registers)
    assert scores.tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_maps_of_a_non_dividing_patch_size_line_up_with_the_image():
    # Patch 6 on 32×32: the image is padded by 2 on each side to 36×36 = a 6×6 grid. A score on the
    # top-left patch only must light up image pixels 0..3 (patch pixels 2..5 after removing the pad).
    model = build_model("vit", patch_size=6, hidden_size=16, num_heads=2, num_blocks=1)
    scores = torch.zeros(1, 36)
    scores[0, 0] = 1.0
    image_map = to_image_grid(scores, model)
    assert image_map.shape == (1, 32, 32)
    assert image_map[0, :3, :3].min() > 0.5 and image_map[0, 8:, :].max() == 0 and image_map[0, :, 8:].max() == 0


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_attention_stack_logits_match_the_fast_path(pool):
    model = build_model("vit", patch_size=6, hidden_size=16, num_heads=2, num_blocks=2, pool=pool).eval()
    images = torch.randn(3, 3, 32, 32)
    logits, attention = attention_stack(model, images)
    torch.testing.assert_close(logits, model(images), rtol=1e-4, atol=1e-5)
    tokens = 36 + (pool == "cls")
    assert attention.shape == (2, 3, 2, tokens, tokens)


def test_mean_attention_distance_by_hand():
    # A 2×2 grid (patch 16): every patch attends to itself and its right neighbour... written as
    # uniform attention over all 4 patches: distances from a corner are 0, 16, 16, 16√2 pixels.
    model = build_model("vit", patch_size=16, hidden_size=16, num_heads=2, num_blocks=1, pool="mean")
    attention = torch.full((1, 1, 2, 4, 4), 0.25)
    expected = (0 + 16 + 16 + 16 * 2**0.5) / 4
    torch.testing.assert_close(mean_attention_distance(attention, model), torch.full((1, 2), expected))
    local = torch.eye(4).expand(1, 1, 2, 4, 4)  # attending only to itself: distance 0
    assert mean_attention_distance(local, model).abs().max() == 0
