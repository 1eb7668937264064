import pytest
import torch
import torch.nn.functional as F

from vitlab.kernels import batch_norm as batch_norm_kernel
from vitlab.kernels.batch_norm import batch_norm_backward, batch_norm_forward

LAST = torch.channels_last
SUPPORTED = batch_norm_kernel.kernel_supports(torch.zeros(2, 16, 1, 1, dtype=torch.bfloat16).contiguous(memory_format=LAST),
                                              None, None)
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 C kernels on this machine")


def activations(shape: tuple[int, ...], seed: int, offset: float = 1.5, spread: float = 3.0) -> torch.Tensor:
    torch.manual_seed(seed)
    return (torch.randn(shape) * spread + offset).to(torch.bfloat16).contiguous(memory_format=LAST)


def reference(x: torch.Tensor, weight, bias, relu: bool, grad_out: torch.Tensor, dtype: torch.dtype,
              eps: float = 1e-5) -> list[torch.Tensor]:
    """[y, grad_x, grad_weight, grad_bias] by PyTorch's BatchNorm (and ReLU), x in `dtype` (float64: the exact
    reference; bf16: PyTorch's own bf16 path, parameters fp32)."""
    x = x.to(dtype).requires_grad_()
    parameter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = (None if p is None else p.to(parameter_dtype).requires_grad_() for p in (weight, bias))
    y = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if relu:
        y = torch.relu(y)
    y.backward(grad_out.to(dtype))
    return [y.detach(), x.grad, *(None if p is None else p.grad for p in (weight, bias))]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("shape", [(128, 64, 16, 16), (4, 16, 3, 5), (2, 512, 4, 4), (3, 48, 7, 7), (1, 192, 1, 2), (5, 80, 2, 3)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_values_and_gradients_are_as_close_to_float64_as_pytorchs_bf16_path(shape, relu, threads):
    x = activations(shape, seed=shape[1] + threads)
    weight, bias = torch.randn(shape[1]), torch.randn(shape[1])
    grad_out = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=LAST)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, statistics = batch_norm_forward(x, weight, bias, 1e-5, relu)
        grads = batch_norm_backward(grad_out, x, statistics, weight, bias, relu, input_gradient=True)
    finally:
        torch.set_num_threads(previous)
    exact = reference(x, weight, bias, relu, grad_out, torch.float64)
    pytorch = reference(x, weight, bias, relu, grad_out, torch.bfloat16)
    for got, expected, theirs in zip([y, *grads], exact, pytorch, strict=True):
        assert relative_error(got, expected) <= 1.5 * relative_error(theirs, expected) + 1e-3
    assert y.dtype == grads[0].dtype == torch.bfloat16 and grads[1].dtype == grads[2].dtype == torch.float32
    assert y.is_contiguous(memory_format=LAST) and grads[0].is_contiguous(memory_format=LAST)
    assert torch.allclose(statistics.mean.double(), x.double().mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    assert torch.allclose(statistics.variance.double(), x.double().var((0, 2, 3), unbiased=False), rtol=1e-5)
    assert torch.allclose(statistics.invstd.double(), (statistics.variance.double() + 1e-5).rsqrt(), rtol=1e-6)


def test_a_large_mean_leaves_the_variance_exact():
    """The variance is summed around the mean (two passes), so a mean far above the spread costs no precision."""
    x = activations((64, 16, 8, 8), seed=1, offset=4096.0, spread=64.0)
    _, statistics = batch_norm_forward(x, None, None, 1e-5, False)
    assert torch.allclose(statistics.variance.double(), x.double().var((0, 2, 3), unbiased=False), rtol=1e-6)


@pytest.mark.parametrize("parameters", ["none", "weight only", "bias only"])
def test_missing_parameters_count_as_a_scale_of_one_and_a_shift_of_zero(parameters):
    x = activations((6, 32, 5, 5), seed=2)
    weight = torch.randn(32) if parameters == "weight only" else None
    bias = torch.randn(32) if parameters == "bias only" else None
    grad_out = torch.randn(x.shape).to(torch.bfloat16)
    y, statistics = batch_norm_forward(x, weight, bias, 1e-5, True)
    grad_x, grad_weight, grad_bias = batch_norm_backward(grad_out, x, statistics, weight, bias, True, input_gradient=True)
    full_weight = weight if weight is not None else torch.ones(32)
    full_bias = bias if bias is not None else torch.zeros(32)
    expected_y, _ = batch_norm_forward(x, full_weight, full_bias, 1e-5, True)
    expected = batch_norm_backward(grad_out, x, statistics, full_weight, full_bias, True, input_gradient=True)
    assert torch.equal(y, expected_y) and torch.equal(grad_x, expected[0])
    assert torch.equal(grad_weight, expected[1]) and torch.equal(grad_bias, expected[2])


def test_the_relu_passes_the_gradient_exactly_where_its_output_is_above_zero():
    """Backward recomputes forward's output to find the ReLU's mask; it must be forward's mask to the bit, zeros and
    ties included (a channel of one repeated value normalises to exactly the shift)."""
    x = activations((16, 32, 6, 6), seed=3)
    x[:, :4] = 2.0  # constant channels: y = bias exactly, for biases of either sign and 0
    bias = torch.randn(32)
    bias[:2] = 0.0
    weight = torch.randn(32)
    grad_out = torch.randn(x.shape).to(torch.bfloat16).contiguous(memory_format=LAST)
    y, statistics = batch_norm_forward(x, weight, bias, 1e-5, True)
    assert (y == 0).any() and (y > 0).any()
    fused = batch_norm_backward(grad_out, x, statistics, weight, bias, True, input_gradient=True)
    masked = batch_norm_backward(grad_out * (y > 0), x, statistics, weight, bias, False, input_gradient=True)
    for got, expected in zip(fused, masked, strict=True):
        assert torch.equal(got, expected)


def test_the_relu_keeps_nan_and_passes_its_gradient_as_pytorchs():
    x = activations((4, 16, 2, 2), seed=4)
    x[0, 0, 0, 0] = float("nan")
    y, _ = batch_norm_forward(x, None, None, 1e-5, True)
    assert y[:, 0].isnan().all() and not y[:, 1:].isnan().any()  # NaN spreads through its channel's mean, as PyTorch's


def test_the_relu_passes_the_gradient_of_a_nan_output_of_either_sign_as_threshold_backward():
    """An arithmetic NaN (inf − inf, here from an inf input) has its sign bit set on x86; NaN is not <= 0, so
    PyTorch's ReLU passes its gradient, and so must the kernel."""
    x = activations((4, 16, 3, 3), seed=7)
    x[0, 0, 0, 0] = float("inf")
    grad_out = torch.ones(x.shape, dtype=torch.bfloat16)
    y, statistics = batch_norm_forward(x, torch.ones(16), torch.zeros(16), 1e-5, True)
    assert y[:, 0].isnan().all()
    _, _, grad_bias = batch_norm_backward(grad_out, x, statistics, torch.ones(16), torch.zeros(16), True, input_gradient=True)
    expected = reference(x, torch.ones(16), torch.zeros(16), True, grad_out, torch.bfloat16)[3]
    assert grad_bias[0].item() == expected[0].item() == 36.0


@pytest.mark.parametrize("eps", [1e-50, 1e40])
def test_eps_is_taken_as_the_double_it_is(eps):
    """Rounded to fp32, 1e-50 would be 0 (a constant channel: 0 / 0, NaN) and 1e40 infinite (every output 0)."""
    x = activations((4, 16, 3, 3), seed=8)
    x[:, 0] = 2.0
    bias = torch.full((16,), 0.5)
    bias[0] = 0.0
    y, statistics = batch_norm_forward(x, None, bias, eps, False)
    expected = reference(x, None, bias, False, torch.zeros(x.shape), torch.float64, eps)[0]
    assert torch.isfinite(statistics.invstd).all() and (statistics.invstd > 0).all()
    assert relative_error(y, expected) <= 1e-2


def test_no_input_gradient_when_not_asked_for():
    x = activations((4, 16, 3, 3), seed=5)
    _, statistics = batch_norm_forward(x, None, None, 1e-5, False)
    grad_x, grad_weight, grad_bias = batch_norm_backward(torch.ones(x.shape), x, statistics, None, None, False,
                                                         input_gradient=False)
    assert grad_x is None and grad_weight.shape == grad_bias.shape == (16,)
    assert torch.allclose(grad_bias, torch.full((16,), 36.0))


@pytest.mark.parametrize("case", ["channels not a multiple of 16", "NCHW memory", "fp32", "one value per channel",
                                  "fp64 weight", "weight of another size", "a negated view"])
def test_what_the_kernel_cannot_take_is_refused(case):
    x = activations((2, 16, 3, 3), seed=6)
    weight = torch.ones(16)
    if case == "channels not a multiple of 16":
        x = activations((2, 24, 3, 3), seed=6)
        weight = torch.ones(24)
    elif case == "NCHW memory":
        x = x.contiguous()
    elif case == "fp32":
        x = x.float()
    elif case == "one value per channel":
        x = x[:1, :, :1, :1]
    elif case == "fp64 weight":
        weight = weight.double()
    elif case == "weight of another size":
        weight = torch.ones(32)
    else:
        x = torch._neg_view(x)
    assert not batch_norm_kernel.kernel_supports(x, weight, None)
    with pytest.raises(ValueError, match="BatchNorm kernel takes"):
        batch_norm_forward(x, weight, None, 1e-5, False)
