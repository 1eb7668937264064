import pytest
import torch
import torch.nn.functional as F

from vitlab.kernels import gelu as gelu_kernel

SUPPORTED = gelu_kernel.kernel_supports(torch.zeros(3, dtype=torch.bfloat16))
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 C kernels on this machine")


@pytest.mark.parametrize("count", [1, 15, 16, 17, 1000, 128 * 65 * 256])
def test_forward_and_derivative_match_float64_to_bf16_rounding(count):
    torch.manual_seed(count)
    x = (torch.randn(count) * 3).to(torch.bfloat16)
    out, derivative = gelu_kernel.gelu_forward(x)
    exact = x.double().requires_grad_()
    F.gelu(exact).backward(torch.ones_like(exact))
    assert out.dtype == derivative.dtype == torch.bfloat16 and out.shape == derivative.shape == x.shape
    # within half a bf16 step of the exact values (plus the erf approximation's 1.5e-7), as PyTorch's bf16 GELU is
    torch.testing.assert_close(out.double(), F.gelu(x.double()), rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(derivative.double(), exact.grad, rtol=2**-8, atol=1e-6)


def test_zeros_tails_infinities_and_nan():
    x = torch.tensor([0.0, -0.0, 1e-30, -10.0, 10.0, 100.0, float("inf"), float("nan")]).to(torch.bfloat16)
    out, derivative = gelu_kernel.gelu_forward(x)
    assert out[:3].float().tolist() == F.gelu(x[:3].float()).to(torch.bfloat16).float().tolist()
    # GELU(-10) = -10 Φ(-10) ≈ -7.6e-23: PyTorch's fp32 erf gives -0 there (1 + erf cancels); the kernel its true size
    assert -1e-21 < out[3].item() <= 0 and out[4:6].float().tolist() == [10.0, 100.0]
    assert out[6:].isnan().all() and F.gelu(x[6:].float()).isnan().all()  # inf · Φ(inf) is NaN in PyTorch too
    assert derivative[:3].float().tolist() == [0.5, 0.5, 0.5] and derivative[4:6].float().tolist() == [1.0, 1.0]
    assert derivative[-1].isnan()


def test_backward_multiplies_by_the_derivative():
    torch.manual_seed(0)
    grad, derivative = torch.randn(5, 33).to(torch.bfloat16), torch.rand(5, 33).to(torch.bfloat16)
    grad_x, grad_bias = gelu_kernel.gelu_backward(grad, derivative)
    assert torch.equal(grad_x, (grad.float() * derivative.float()).to(torch.bfloat16)) and grad_bias is None
    with pytest.raises(ValueError, match="shape"):
        gelu_kernel.gelu_backward(grad[:4], derivative)


@pytest.mark.parametrize("shape", [(1, 16), (3, 48), (128, 65, 256)])
def test_a_bias_is_added_per_feature_before_gelu(shape):
    torch.manual_seed(len(shape))
    x = (torch.randn(shape) * 2).to(torch.bfloat16)
    bias = torch.randn(shape[-1])
    out, derivative = gelu_kernel.gelu_forward(x, bias)
    exact = (x.double() + bias.double()).requires_grad_()
    F.gelu(exact).backward(torch.ones_like(exact))
    torch.testing.assert_close(out.double(), F.gelu(x.double() + bias.double()), rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(derivative.double(), exact.grad, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 16), (7, 32), (128, 65, 256)])
def test_backward_sums_the_bias_gradient_over_rows(shape):
    torch.manual_seed(1)
    grad, derivative = torch.randn(shape).to(torch.bfloat16), torch.rand(shape).to(torch.bfloat16)
    grad_x, grad_bias = gelu_kernel.gelu_backward(grad, derivative, bias_gradient=True)
    products = grad.double() * derivative.double()
    assert torch.equal(grad_x, products.to(torch.bfloat16))
    assert grad_bias.dtype == torch.float32 and grad_bias.shape == shape[-1:]
    torch.testing.assert_close(grad_bias.double(), products.reshape(-1, shape[-1]).sum(0), rtol=1e-5, atol=1e-4)


def test_which_inputs_the_kernel_takes():
    assert gelu_kernel.kernel_supports(torch.zeros(2, 3, dtype=torch.bfloat16))
    assert not any(gelu_kernel.kernel_supports(x) for x in (torch.zeros(2, 3), torch.zeros(0, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="cannot take"):
        gelu_kernel.gelu_forward(torch.zeros(3))
    x = torch.zeros(2, 32, dtype=torch.bfloat16)
    assert gelu_kernel.kernel_supports(x, torch.zeros(32))
    wrong_biases = (torch.zeros(16), torch.zeros(32, dtype=torch.bfloat16), torch.zeros(1, 32))
    assert not any(gelu_kernel.kernel_supports(x, bias) for bias in wrong_biases)
    assert not gelu_kernel.kernel_supports(torch.zeros(2, 24, dtype=torch.bfloat16), torch.zeros(24))  # not a multiple of 16
    with pytest.raises(ValueError, match="bias of shape"):
        gelu_kernel.gelu_forward(x, torch.zeros(16))
