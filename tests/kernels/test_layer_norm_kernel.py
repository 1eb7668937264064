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


def test_which_inputs_the_kernel_takes():
    weight, bias = torch.ones(64), torch.zeros(64)
    assert layer_norm_kernel.kernel_supports(torch.zeros(4, 64), weight, bias)
    for x, w, b in ((torch.zeros(4, 64, dtype=torch.bfloat16), weight, bias), (torch.zeros(4, 24), torch.ones(24), torch.zeros(24)),
                    (torch.zeros(4, 2048), torch.ones(2048), torch.zeros(2048)), (torch.zeros(0, 64), weight, bias),
                    (torch.zeros(4, 64), None, bias), (torch.zeros(4, 64), weight.double(), bias), (torch.zeros(4, 64), torch.ones(32), bias)):
        assert not layer_norm_kernel.kernel_supports(x, w, b)
    with pytest.raises(ValueError, match="cannot take"):
        layer_norm_kernel.layer_norm_forward(torch.zeros(4, 24), torch.ones(24), torch.zeros(24), 1e-5)
