"""Attention rollout, patch scores, image mapping and attention distance against hand computations."""

import numpy as np
import pytest
import torch

from vitlab.errors import VitlabError
from vitlab.inspect.attention import (
    attention_stack,
    attention_with_gradients,
    discard_lowest,
    mean_attention_distance,
    patch_scores,
    rollout,
    rollout_maps,
    to_image_grid,
)
from vitlab.models import build_model
from vitlab.models.base import TokenLayout


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


def layout(prefix_tokens: int, grid_size: int, readout: str, patch_size: int = 16, padding: int = 0, suffix_tokens: int = 0) -> TokenLayout:
    return TokenLayout(prefix_tokens=prefix_tokens, grid_size=grid_size, patch_size=patch_size, padding=padding, readout=readout,
                       num_layers=1, num_heads=1, suffix_tokens=suffix_tokens)


def test_patch_scores_read_the_cls_row_or_average_the_patch_rows():
    assert patch_scores(torch.arange(25.0).reshape(1, 5, 5), layout(1, 2, "cls")).tolist() == [[1.0, 2.0, 3.0, 4.0]]  # [CLS, 2×2 patches]
    assert patch_scores(torch.arange(16.0).reshape(1, 4, 4), layout(0, 2, "mean")).tolist() == [[6.0, 7.0, 8.0, 9.0]]
    # a timm ViT with CLS + a register token before one patch, mean-pooled: the patch row over the patch column
    assert patch_scores(torch.arange(9.0).reshape(1, 3, 3), layout(2, 1, "mean")).tolist() == [[8.0]]
    # a vitlab ViT with its two registers after the patches: [CLS, patch, register, register]
    assert patch_scores(torch.arange(16.0).reshape(1, 4, 4), layout(1, 1, "cls", suffix_tokens=2)).tolist() == [[1.0]]


def test_a_grid_that_misses_pixels_leaves_them_dark():
    # timm's patch 6 on 32×32 without padding: a 5×5 grid covers pixels 0..29; rows and columns 30, 31 stay 0.
    image_map = to_image_grid(torch.ones(1, 25), layout(1, 5, "cls", patch_size=6), 32)
    assert image_map.shape == (1, 32, 32) and image_map[0, :30, :30].min() > 0.999 and image_map[0, 30:].max() == 0 and image_map[0, :, 30:].max() == 0


def test_maps_of_a_non_dividing_patch_size_line_up_with_the_image():
    # Patch 6 on 32×32: the image is padded by 2 on each side to 36×36 = a 6×6 grid. A score on the
    # top-left patch only must light up image pixels 0..3 (patch pixels 2..5 after removing the pad).
    model = build_model("vit", patch_size=6, hidden_size=16, num_heads=2, num_blocks=1)
    scores = torch.zeros(1, 36)
    scores[0, 0] = 1.0
    image_map = to_image_grid(scores, model.token_layout(), 32)
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
    torch.testing.assert_close(mean_attention_distance(attention, model.token_layout()), torch.full((1, 2), expected))
    local = torch.eye(4).expand(1, 1, 2, 4, 4)  # attending only to itself: distance 0
    assert mean_attention_distance(local, model.token_layout()).abs().max() == 0


def test_head_fusion_max_and_min_take_the_elementwise_extremes():
    heads = torch.tensor([[[0.6, 0.4], [0.1, 0.9]], [[0.2, 0.8], [0.7, 0.3]]])[None, None]  # (L=1, B=1, heads=2, 2, 2)
    largest = torch.tensor([[0.6, 0.8], [0.7, 0.9]])
    smallest = torch.tensor([[0.2, 0.4], [0.1, 0.3]])
    for fusion, fused in (("max", largest), ("min", smallest)):
        with_residual = fused + torch.eye(2)
        torch.testing.assert_close(rollout(heads, head_fusion=fusion)[0], with_residual / with_residual.sum(dim=1, keepdim=True))
    with pytest.raises(VitlabError, match="head fusion must be one of mean, max, min"):
        rollout(heads, head_fusion="median")


def test_discard_ratio_zeroes_the_weakest_entries_but_keeps_the_diagonal():
    fused = torch.tensor([[0.05, 0.5, 0.2], [0.01, 0.3, 0.6], [0.4, 0.02, 0.03]])[None]  # (B=1, 3, 3)
    kept = discard_lowest(fused, 4 / 9)  # the 4 weakest: 0.01, 0.02, 0.03 (diagonal: kept), 0.05 (diagonal: kept)
    expected = fused.clone()
    expected[0, 1, 0] = expected[0, 2, 1] = 0.0
    torch.testing.assert_close(kept, expected)
    assert torch.equal(discard_lowest(fused, 0.0), fused)
    with pytest.raises(VitlabError, match="discard ratio"):
        discard_lowest(fused, 1.0)


def test_gradient_weighted_rollout_with_unit_gradients_is_plain_rollout_and_clips_negatives():
    torch.manual_seed(0)
    attention = torch.rand(3, 2, 4, 5, 5).softmax(dim=-1)
    torch.testing.assert_close(rollout(attention, gradients=torch.ones_like(attention)), rollout(attention))
    # all-negative gradients clip every head to zero: only the residual identity is left
    torch.testing.assert_close(rollout(attention, gradients=-torch.ones_like(attention)), torch.eye(5).expand(2, 5, 5))


def test_attention_gradients_reach_only_the_cls_row_of_the_last_layer():
    # With CLS read-out, the last block's patch rows never reach the logits: their gradient is exactly 0.
    torch.manual_seed(0)
    model = build_model("vit", patch_size=8, hidden_size=16, num_heads=2, num_blocks=2)
    torch.nn.init.normal_(model.head.weight)  # the zero-initialised head would give zero gradients everywhere
    images = torch.randn(2, 3, 32, 32)
    logits, attention, gradients = attention_with_gradients(model, images)
    assert gradients.shape == attention.shape == (2, 2, 2, 17, 17)
    assert gradients[-1, :, :, 1:].abs().max() == 0 and gradients[-1, :, :, 0].abs().max() > 0
    assert gradients[0].abs().max() > 0  # the first layer's every row matters
    torch.testing.assert_close(logits, model(images), rtol=1e-4, atol=1e-5)
    maps = rollout_maps(model, attention, 32, gradients=gradients)
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all()
