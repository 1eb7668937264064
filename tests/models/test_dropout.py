import pytest
import torch

from vitlab.models.dropout import RESOLUTION, Dropout, drop_threshold, dropout_matmul, fast_dropout, keep_mask, keep_multiplier, keep_scale


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_drop_rate_and_the_expectation_match_p(p):
    torch.manual_seed(0)
    inputs = torch.ones(400_000)
    outputs = fast_dropout(inputs, p)
    dropped = (outputs == 0).float().mean().item()
    assert abs(dropped - drop_threshold(p) / RESOLUTION) < 0.003  # 400k draws: std ≈ 0.0008
    assert abs(drop_threshold(p) / RESOLUTION - p) < 1 / RESOLUTION
    assert abs(outputs.mean().item() - 1.0) < 0.005  # kept elements are scaled up


def test_every_lane_of_the_random_words_is_uniform():
    """Each int64 gives four elements; the top lane has one random bit fewer, so all use 15 bits."""
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([4 * 100_000]), 0.5, torch.device("cpu")).view(-1, 4).float()  # (words, lanes)
    assert torch.all((keep.mean(0) - 0.5).abs() < 0.01)


def test_gradient_flows_only_through_kept_elements_with_the_same_scale():
    torch.manual_seed(0)
    inputs = torch.randn(64, 33, requires_grad=True)
    outputs = fast_dropout(inputs, 0.25)
    outputs.sum().backward()
    kept = outputs != 0
    scale = RESOLUTION / (RESOLUTION - drop_threshold(0.25))
    assert torch.allclose(inputs.grad[kept], torch.full_like(inputs.grad[kept], scale))
    assert torch.all(inputs.grad[~kept] == 0)
    assert torch.allclose(outputs[kept], inputs[kept] * scale)


def test_module_is_identity_in_eval_and_reproducible_under_a_seed():
    layer = Dropout(0.3)
    inputs = torch.randn(8, 16, dtype=torch.bfloat16)
    assert torch.equal(layer.eval()(inputs), inputs)
    layer.train()
    torch.manual_seed(1)
    first = layer(inputs)
    torch.manual_seed(1)
    assert torch.equal(layer(inputs), first) and first.dtype == torch.bfloat16
    assert Dropout(0.0).train()(inputs) is inputs


def test_dropout_matmul_equals_dropout_then_matmul():
    probabilities, values = torch.rand(2, 3, 9, 9), torch.randn(2, 3, 9, 4)
    torch.manual_seed(7)
    fused = dropout_matmul(probabilities, values, 0.2)
    torch.manual_seed(7)  # the same mask
    torch.testing.assert_close(fused, fast_dropout(probabilities, 0.2) @ values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("p", [0.0001, 0.1, 0.5, 0.9])
def test_the_float_multiplier_is_the_bool_mask_drawn_from_the_same_numbers(dtype, p):
    shape = torch.Size([7, 1001])  # not a multiple of four: the last word is cut
    torch.manual_seed(3)
    multiplier = keep_multiplier(shape, p, dtype, torch.device("cpu"))
    torch.manual_seed(3)
    mask = keep_mask(shape, p, torch.device("cpu"))
    assert multiplier.dtype == dtype and multiplier.shape == shape
    assert torch.equal(multiplier, mask.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_dropout_equals_where_mask_then_scale_bit_for_bit(dtype):
    inputs = torch.randn(33, 65, dtype=torch.float64).to(dtype)
    torch.manual_seed(11)
    outputs = fast_dropout(inputs, 0.1)
    torch.manual_seed(11)
    expected = torch.where(keep_mask(inputs.shape, 0.1, inputs.device), inputs * keep_scale(0.1), 0.0)
    assert outputs.dtype == dtype and torch.equal(outputs, expected)
