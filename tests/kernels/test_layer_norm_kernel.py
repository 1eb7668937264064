import pytest
import torch
import torch.nn.functional as F

from vitlab.kernels import layer_norm as layer_norm_kernel

SUPPORTED = layer_norm_kernel.kernel_supports(torch.zeros(2, 16), torch.ones(16), torch.zeros(16))
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 C kernels on this machine")


def affine(features: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(features) * 0.5 + 1, torch.randn(features) * 0.1


@pytest.mark.parametrize("shape", [(1, 16), (3, 7, 64), (128, 65, 64), (5, 192), (2, 1024)])
def test_forward_is_the_float64_norm_rounded_to_bf16(shape):
    torch.manual_seed(shape[-1])
    x = torch.randn(shape) * 3 + 2  # an offset and a spread: the mean and variance both matter
    weight, bias = affine(shape[-1])
    out, mean, rstd = layer_norm_kernel.layer_norm_forward(x, weight, bias, 1e-5)
    expected = F.layer_norm(x.double(), shape[-1:], weight.double(), bias.double(), 1e-5)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and mean.shape == rstd.shape == (x.numel() // shape[-1],)
    torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=1e-5)  # within bf16's rounding
    torch.testing.assert_close(mean.double(), x.double().reshape(-1, shape[-1]).mean(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 7, 64), (64, 65, 128)])
def test_gradients_match_float64_autograd(shape):
    torch.manual_seed(1)
    x = torch.randn(shape) * 2 - 1
    weight, bias = affine(shape[-1])
    grad_out = torch.randn(shape).to(torch.bfloat16)
    _, mean, rstd = layer_norm_kernel.layer_norm_forward(x, weight, bias, 1e-5)
    grad_x, grad_weight, grad_bias = layer_norm_kernel.layer_norm_backward(grad_out, x, weight, mean, rstd)
    inputs = [t.double().requires_grad_() for t in (x, weight, bias)]
    F.layer_norm(inputs[0], shape[-1:], inputs[1], inputs[2], 1e-5).backward(grad_out.double())
    for got, exact in zip((grad_x, grad_weight, grad_bias), (t.grad for t in inputs), strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())


def test_without_the_input_gradient_it_gives_the_same_weight_and_bias_gradients_and_no_input_gradient():
    torch.manual_seed(2)
    x, (weight, bias) = torch.randn(300, 240) * 2 + 1, affine(240)
    grad_out = torch.randn(300, 240).to(torch.bfloat16)
    _, mean, rstd = layer_norm_kernel.layer_norm_forward(x, weight, bias, 1e-5)
    _, full_weight, full_bias = layer_norm_kernel.layer_norm_backward(grad_out, x, weight, mean, rstd)
    grad_x, grad_weight, grad_bias = layer_norm_kernel.layer_norm_backward(grad_out, x, weight, mean, rstd, input_gradient=False)
    assert grad_x is None and torch.equal(grad_weight, full_weight) and torch.equal(grad_bias, full_bias)


def test_a_norm_of_an_input_without_a_gradient_trains_its_weight_and_bias_as_with_one():
    from vitlab.models.norms import MatmulInputNorm

    norm = MatmulInputNorm(64)
    x = torch.randn(4, 9, 64)
    gradients = []
    for wants_gradient in (True, False):
        norm.zero_grad()
        x_ = x.clone().requires_grad_(wants_gradient)
        with torch.autocast("cpu", torch.bfloat16):
            out = norm(x_)
        assert out.dtype == torch.bfloat16  # the kernel's output
        out.float().square().sum().backward()
        assert (x_.grad is not None) == wants_gradient
        gradients.append((norm.weight.grad.clone(), norm.bias.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*gradients, strict=True))


def test_which_inputs_the_kernel_takes():
    weight, bias = torch.ones(64), torch.zeros(64)
    assert layer_norm_kernel.kernel_supports(torch.zeros(4, 64), weight, bias)
    for x, w, b in ((torch.zeros(4, 64, dtype=torch.bfloat16), weight, bias), (torch.zeros(4, 24), torch.ones(24), torch.zeros(24)),
                    (torch.zeros(4, 2048), torch.ones(2048), torch.zeros(2048)), (torch.zeros(0, 64), weight, bias),
                    (torch.zeros(4, 64), None, bias), (torch.zeros(4, 64), weight.double(), bias), (torch.zeros(4, 64), torch.ones(32), bias)):
        assert not layer_norm_kernel.kernel_supports(x, w, b)
    with pytest.raises(ValueError, match="cannot take"):
        layer_norm_kernel.layer_norm_forward(torch.zeros(4, 24), torch.ones(24), torch.zeros(24), 1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_with_an_addend_it_writes_the_fp32_total_and_normalises_that(with_bias):
    torch.manual_seed(2)
    x, addend = torch.randn(5, 9, 64) * 2, (torch.randn(5, 9, 64) * 3).to(torch.bfloat16)
    addend_bias = torch.randn(64) if with_bias else None
    weight, bias = affine(64)
    total, out, mean, rstd = layer_norm_kernel.residual_layer_norm_forward(x, addend, addend_bias, weight, bias, 1e-5)
    expected_total = x.double() + addend.double() + (addend_bias.double() if with_bias else 0)
    assert total.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(total.double(), expected_total, rtol=1e-6, atol=1e-6)
    expected = F.layer_norm(expected_total, (64,), weight.double(), bias.double(), 1e-5)
    torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=1e-5)


@pytest.mark.parametrize("stream_gradient", [True, False])
def test_with_an_addend_backward_adds_the_stream_gradient_and_sums_the_columns(stream_gradient):
    torch.manual_seed(3)
    shape = (6, 33, 128)
    x, addend, addend_bias = torch.randn(shape), torch.randn(shape).to(torch.bfloat16), torch.randn(128)
    weight, bias = affine(128)
    grad_out, grad_total = torch.randn(shape).to(torch.bfloat16), torch.randn(shape) if stream_gradient else None
    total, _, mean, rstd = layer_norm_kernel.residual_layer_norm_forward(x, addend, addend_bias, weight, bias, 1e-5)
    grad_x, grad_addend, grad_weight, grad_bias, grad_addend_bias = layer_norm_kernel.residual_layer_norm_backward(
        grad_out, total, weight, mean, rstd, grad_total, True)
    inputs = [t.double().requires_grad_() for t in (x, addend, addend_bias, weight, bias)]
    exact_total = inputs[0] + inputs[1] + inputs[2]
    normalised = F.layer_norm(exact_total, (128,), inputs[3], inputs[4], 1e-5)
    torch.autograd.backward([normalised] + ([exact_total] if stream_gradient else []),
                            [grad_out.double()] + ([grad_total.double()] if stream_gradient else []))
    assert grad_addend.dtype == torch.bfloat16 and torch.equal(grad_addend, grad_x.to(torch.bfloat16))
    for got, exact in zip((grad_x, grad_addend_bias, grad_weight, grad_bias), (inputs[0].grad, inputs[2].grad, inputs[3].grad, inputs[4].grad),
                          strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
    no_sums = layer_norm_kernel.residual_layer_norm_backward(grad_out, total, weight, mean, rstd, grad_total, False)
    assert no_sums[-1] is None and torch.equal(no_sums[0], grad_x)


def test_an_addend_of_another_shape_or_dtype_is_refused():
    x, (weight, bias) = torch.zeros(2, 32), affine(32)
    assert layer_norm_kernel.residual_kernel_supports(x, torch.zeros(2, 32, dtype=torch.bfloat16), torch.zeros(32), weight, bias)
    refused = [(torch.zeros(2, 32), None), (torch.zeros(3, 32, dtype=torch.bfloat16), None),
               (torch.zeros(2, 32, dtype=torch.bfloat16), torch.zeros(16)), (torch.zeros(2, 32, dtype=torch.bfloat16), torch.zeros(32).double())]
    assert not any(layer_norm_kernel.residual_kernel_supports(x, addend, addend_bias, weight, bias) for addend, addend_bias in refused)
    with pytest.raises(ValueError, match="cannot add"):
        layer_norm_kernel.residual_layer_norm_forward(x, torch.zeros(2, 32), None, weight, bias, 1e-5)
    with pytest.raises(ValueError, match="residual gradient"):
        layer_norm_kernel.residual_layer_norm_backward(torch.zeros(2, 32, dtype=torch.bfloat16), x, weight, torch.zeros(2), torch.ones(2),
                                                       torch.zeros(3, 32), False)
