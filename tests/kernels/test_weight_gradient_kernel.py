import pytest
import torch

from vitlab.kernels import weight_gradient as weight_gradient_kernel
from vitlab.kernels.build import compiled_library, library_capabilities

SUPPORTED = weight_gradient_kernel.kernel_supports(16, 16, True)
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 BF16 C kernels on this machine")


def exact_gradients(grad_out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_rows, x_rows = grad_out.reshape(-1, grad_out.shape[-1]).double(), x.reshape(-1, x.shape[-1]).double()
    return grad_rows.t() @ x_rows, grad_rows.sum(0)


# rows: none, one (an unpaired last row), fewer than a chunk, odd, several chunks per thread, one past a chunk of the
# tile version (512 rows); widths 16–256 cover every tail of a tile (1, 2, 3 vectors of 16 after the tiles of 64) and,
# on the AMX tiles, either operand as the narrower one (the transposed one) with an odd number of tiles on each side
@pytest.mark.parametrize(("leading", "outs", "ins"), [((0,), 16, 16), ((1,), 16, 16), ((3,), 32, 48), ((127,), 64, 80),
                                                      ((4, 65), 192, 64), ((128, 65), 64, 256), ((7, 33), 48, 112),
                                                      ((1025,), 80, 48), ((513,), 16, 272)])
@pytest.mark.parametrize("threads", [1, 2])
def test_weight_and_bias_gradients_match_float64_in_fp32(leading, outs, ins, threads):
    torch.manual_seed(outs + ins)
    grad_out, x = torch.randn(*leading, outs).to(torch.bfloat16), torch.randn(*leading, ins).to(torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grad_weight, grad_bias = weight_gradient_kernel.weight_gradient(grad_out, x, bias_gradient=True)
    finally:
        torch.set_num_threads(before)
    exact_weight, exact_bias = exact_gradients(grad_out, x)
    assert grad_weight.dtype == grad_bias.dtype == torch.float32
    assert grad_weight.shape == (outs, ins) and grad_bias.shape == (outs,)
    # products of bf16 numbers are exact in fp32; only the fp32 sums round (far below bf16's 2^-9)
    rows = max(1, grad_out.numel() // outs)
    tolerance = 1e-6 * rows ** 0.5 * 4
    torch.testing.assert_close(grad_weight.double(), exact_weight, rtol=0, atol=tolerance * (1 + exact_weight.abs().max().item()))
    torch.testing.assert_close(grad_bias.double(), exact_bias, rtol=0, atol=tolerance * (1 + exact_bias.abs().max().item()))


def test_is_more_precise_than_autocast_bf16_matmul():
    torch.manual_seed(0)
    grad_out, x = torch.randn(8320, 64).to(torch.bfloat16), torch.randn(8320, 64).to(torch.bfloat16)
    grad_weight, _ = weight_gradient_kernel.weight_gradient(grad_out, x, bias_gradient=False)
    exact, _ = exact_gradients(grad_out, x)
    kernel_error = (grad_weight.double() - exact).abs().max().item()
    bf16_error = ((grad_out.t() @ x).double() - exact).abs().max().item()
    assert kernel_error < bf16_error / 100


def test_without_a_bias_gradient_returns_none_and_the_same_weight_gradient():
    torch.manual_seed(1)
    grad_out, x = torch.randn(50, 32).to(torch.bfloat16), torch.randn(50, 16).to(torch.bfloat16)
    with_bias, bias = weight_gradient_kernel.weight_gradient(grad_out, x, bias_gradient=True)
    without_bias, none = weight_gradient_kernel.weight_gradient(grad_out, x, bias_gradient=False)
    assert none is None and bias is not None and torch.equal(with_bias, without_bias)


def test_non_contiguous_inputs_are_read_as_their_values():
    torch.manual_seed(2)
    grad_out = torch.randn(32, 40).to(torch.bfloat16).t()  # (40, 32) transposed view
    x = torch.randn(40, 64).to(torch.bfloat16)[:, ::2]  # (40, 32) strided view
    grad_weight, grad_bias = weight_gradient_kernel.weight_gradient(grad_out, x, bias_gradient=True)
    exact_weight, exact_bias = exact_gradients(grad_out, x)
    torch.testing.assert_close(grad_weight.double(), exact_weight, rtol=0, atol=1e-4)
    torch.testing.assert_close(grad_bias.double(), exact_bias, rtol=0, atol=1e-4)


def test_infinities_and_nan_propagate():
    grad_out, x = torch.zeros(4, 16, dtype=torch.bfloat16), torch.ones(4, 16, dtype=torch.bfloat16)
    grad_out[1, 3], grad_out[2, 5] = float("inf"), float("nan")
    grad_weight, grad_bias = weight_gradient_kernel.weight_gradient(grad_out, x, bias_gradient=True)
    assert grad_weight[3].isinf().all() and grad_weight[5].isnan().all() and grad_bias[3].isinf() and grad_bias[5].isnan()
    assert (grad_weight[[0, 1, 2, 4]] == 0).all()


def test_refuses_what_it_cannot_take():
    bf16 = torch.zeros(4, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="share every axis but the last"):
        weight_gradient_kernel.weight_gradient(bf16, bf16[:3], bias_gradient=False)
    with pytest.raises(ValueError, match="bf16 CPU tensors"):
        weight_gradient_kernel.weight_gradient(bf16.float(), bf16, bias_gradient=False)
    with pytest.raises(ValueError, match="cannot take 8 → 16 features"):
        weight_gradient_kernel.weight_gradient(bf16, bf16[:, :8], bias_gradient=False)
    capabilities = library_capabilities(compiled_library())
    if capabilities.weight_gradient_on_tiles:  # layers of at most TILES_MAX_WEIGHTS weights, any bias
        assert weight_gradient_kernel.kernel_supports(512, 512, True) and not weight_gradient_kernel.kernel_supports(512, 528, False)
        assert weight_gradient_kernel.kernel_supports(16, weight_gradient_kernel.TILES_MAX_WEIGHTS // 16, True)
    else:
        widest = capabilities.weight_gradient_max_bias_features
        assert weight_gradient_kernel.kernel_supports(64, widest, True) and not weight_gradient_kernel.kernel_supports(64, widest + 16, True)
        assert weight_gradient_kernel.kernel_supports(64, widest + 16, False)
