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
    assert torch.equal(gelu_kernel.gelu_backward(grad, derivative), (grad.float() * derivative.float()).to(torch.bfloat16))
    with pytest.raises(ValueError, match="shape"):
        gelu_kernel.gelu_backward(grad[:4], derivative)


def test_which_inputs_the_kernel_takes():
    assert gelu_kernel.kernel_supports(torch.zeros(2, 3, dtype=torch.bfloat16))
    assert not any(gelu_kernel.kernel_supports(x) for x in (torch.zeros(2, 3), torch.zeros(0, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="cannot take"):
        gelu_kernel.gelu_forward(torch.zeros(3))
