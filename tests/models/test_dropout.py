import pytest
import torch

import vitlab.models.dropout as dropout_module
from vitlab.kernels.build import compiled_library
from vitlab.models.dropout import RESOLUTION, Dropout, drop_threshold, dropout_matmul, fast_dropout, keep_mask, keep_multiplier, keep_scale


@pytest.fixture(params=["kernel", "operators"])
def path(request, monkeypatch):
    """Run the test through the C kernel and through PyTorch operators."""
    if request.param == "kernel" and compiled_library() is None:
        pytest.skip("vitlab's C kernels are not available here")
    if request.param == "operators":
        monkeypatch.setattr(dropout_module, "kernel_supports", lambda inputs: False)
    return request.param


@pytest.fixture
def operators(monkeypatch):
    monkeypatch.setattr(dropout_module, "kernel_supports", lambda inputs: False)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_drop_rate_and_the_expectation_match_p(p, path):
    torch.manual_seed(0)
    inputs = torch.ones(400_000)
    outputs = fast_dropout(inputs, p)
    dropped = (outputs == 0).float().mean().item()
    assert abs(dropped - drop_threshold(p) / RESOLUTION) < 0.003  # 400k draws: std ≈ 0.0008
    assert abs(drop_threshold(p) / RESOLUTION - p) < 1 / RESOLUTION
    assert abs(outputs.mean().item() - 1.0) < 0.005  # kept elements are scaled up


def test_every_lane_of_the_random_words_is_uniform(operators):
    """Each int64 gives four elements; the top lane has one random bit fewer, so all use 15 bits."""
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([4 * 100_000]), 0.5, torch.device("cpu")).view(-1, 4).float()  # (words, lanes)
    assert torch.all((keep.mean(0) - 0.5).abs() < 0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_flows_only_through_kept_elements_with_the_same_scale(path, dtype):
    torch.manual_seed(0)
    inputs = torch.randn(640, 33, dtype=dtype, requires_grad=True)
    outputs = fast_dropout(inputs, 0.25)
    outputs.sum().backward()
    kept = outputs != 0
    scale = RESOLUTION / (RESOLUTION - drop_threshold(0.25))
    assert torch.equal(inputs.grad[kept], torch.full_like(inputs.grad[kept], scale))
    assert torch.all(inputs.grad[~kept] == 0)
    assert torch.equal(outputs[kept], inputs[kept] * scale)


def test_the_kernel_path_stores_no_mask_and_survives_autocast():
    if compiled_library() is None:
        pytest.skip("vitlab's C kernels are not available here")
    layer, linear = Dropout(0.1).train(), torch.nn.Linear(16, 16)
    inputs = torch.randn(4096, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = layer(linear(inputs))
    assert outputs.dtype == torch.bfloat16 and type(outputs.grad_fn).__name__ == "KernelDropoutBackward"
    outputs.float().sum().backward()
    assert torch.isfinite(inputs.grad).all() and linear.weight.grad is not None


def test_module_is_identity_in_eval_and_reproducible_under_a_seed(path):
    layer = Dropout(0.3)
    inputs = torch.randn(8, 16, dtype=torch.bfloat16)
    assert torch.equal(layer.eval()(inputs), inputs)
    layer.train()
    torch.manual_seed(1)
    first = layer(inputs)
    torch.manual_seed(1)
    assert torch.equal(layer(inputs), first) and first.dtype == torch.bfloat16
    assert not torch.equal(layer(inputs), first)  # the next call draws a new mask
    assert Dropout(0.0).train()(inputs) is inputs


def test_dropout_matmul_equals_dropout_then_matmul(path):
    probabilities, values = torch.rand(2, 3, 9, 9), torch.randn(2, 3, 9, 4)
    torch.manual_seed(7)
    fused = dropout_matmul(probabilities, values, 0.2)
    torch.manual_seed(7)  # the same mask
    torch.testing.assert_close(fused, fast_dropout(probabilities, 0.2) @ values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("p", [0.0001, 0.1, 0.5, 0.9])
def test_the_float_multiplier_is_the_bool_mask_drawn_from_the_same_numbers(dtype, p, operators):
    shape = torch.Size([7, 1001])  # not a multiple of four: the last word is cut
    torch.manual_seed(3)
    multiplier = keep_multiplier(shape, p, dtype, torch.device("cpu"))
    torch.manual_seed(3)
    mask = keep_mask(shape, p, torch.device("cpu"))
    assert multiplier.dtype == dtype and multiplier.shape == shape
    assert torch.equal(multiplier, mask.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_dropout_equals_where_mask_then_scale_bit_for_bit(dtype, operators):
    inputs = torch.randn(33, 65, dtype=torch.float64).to(dtype)
    torch.manual_seed(11)
    outputs = fast_dropout(inputs, 0.1)
    torch.manual_seed(11)
    expected = torch.where(keep_mask(inputs.shape, 0.1, inputs.device), inputs * keep_scale(0.1), 0.0)
    assert outputs.dtype == dtype and torch.equal(outputs, expected)


def test_an_inactive_dropout_whose_forward_was_replaced_is_not_skipped():
    from vitlab.models.base import inactive_dropout

    layer = Dropout(0.0)
    assert inactive_dropout(layer)
    layer.forward = lambda t: t * 2
    assert not inactive_dropout(layer)
