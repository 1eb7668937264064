import pytest
import torch
import torch.nn.functional as F

from vitlab.kernels import matmul as matmul_kernel

SUPPORTED = matmul_kernel.kernel_supports(16, 16)
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 BF16 C kernels on this machine, or AMX (oneDNN's products)")


def with_threads(threads: int, function):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return function()
    finally:
        torch.set_num_threads(before)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


# rows: none, one, fewer than a tile, a tile, a tile and one, many; widths 16–192 cover every tail of a tile (1, 2, 3
# vectors of 16 after the tiles of 64); depths 16 to 512
SHAPES = [((0,), 16, 16), ((1,), 32, 16), ((5,), 48, 32), ((6,), 64, 64), ((7,), 80, 48), ((4, 65), 64, 192),
          ((2, 257), 256, 64), ((3, 41), 512, 128), ((13,), 128, 112)]


@pytest.mark.parametrize(("leading", "depth", "width"), SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_forward_is_pytorchs_bf16_linear_bit_for_bit(leading, depth, width, threads):
    torch.manual_seed(depth + width)
    x, weight = torch.randn(*leading, depth).to(torch.bfloat16), (torch.randn(width, depth) * 0.2).to(torch.bfloat16)
    bias = torch.randn(width).to(torch.bfloat16)
    packed = matmul_kernel.pack_weight(weight, backward=False)
    assert packed.backward is None
    assert_same_bits(with_threads(threads, lambda: matmul_kernel.matmul(x, packed.forward)), x @ weight.t())
    assert_same_bits(with_threads(threads, lambda: matmul_kernel.matmul(x, packed.forward, bias)), F.linear(x, weight, bias))


@pytest.mark.parametrize(("leading", "depth", "width"), SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_input_gradient_is_pytorchs_bf16_matmul_bit_for_bit(leading, depth, width, threads):
    torch.manual_seed(depth * width)
    grad_out, weight = torch.randn(*leading, depth).to(torch.bfloat16), (torch.randn(depth, width) * 0.2).to(torch.bfloat16)
    packed = matmul_kernel.pack_weight(weight, backward=True)  # weight (out = depth, in = width)
    assert_same_bits(with_threads(threads, lambda: matmul_kernel.matmul(grad_out, packed.backward)), grad_out @ weight)


def test_packed_layouts_hold_the_weights_pairs():
    weight = torch.arange(32 * 48, dtype=torch.float32).reshape(32, 48).to(torch.bfloat16)  # (out, in)
    packed = matmul_kernel.pack_weight(weight, backward=True)
    as_pairs = weight.view(torch.int32)  # (32, 24): (weight[o][2p], weight[o][2p+1]) in one number
    assert torch.equal(packed.forward, as_pairs.t())
    interleaved = torch.stack([weight[0::2], weight[1::2]], dim=-1).view(torch.int32).squeeze(-1)  # (16, 48)
    assert torch.equal(packed.backward, interleaved)
    assert (packed.out_features, packed.in_features) == (32, 48)


def test_nan_inf_and_signed_zeros_come_out_as_pytorchs():
    torch.manual_seed(5)
    x, weight = torch.randn(20, 64).to(torch.bfloat16), torch.randn(32, 64).to(torch.bfloat16)
    x[0, 3], x[1, 5], x[2, 7], x[3] = float("nan"), float("inf"), float("-inf"), -0.0
    weight[4, 9] = float("inf")
    assert_same_bits(matmul_kernel.matmul(x, matmul_kernel.pack_weight(weight, False).forward), x @ weight.t())


def test_strided_inputs_are_read_as_their_values():
    torch.manual_seed(6)
    x = torch.randn(64, 40).to(torch.bfloat16).t()  # (40, 64), a transposed view
    weight = torch.randn(16, 64).to(torch.bfloat16)
    assert_same_bits(matmul_kernel.matmul(x, matmul_kernel.pack_weight(weight, False).forward), x.contiguous() @ weight.t())


def test_bad_arguments_are_refused_with_what_was_given():
    weight = torch.randn(16, 32).to(torch.bfloat16)
    pairs = matmul_kernel.pack_weight(weight, False).forward
    with pytest.raises(ValueError, match=r"bf16 CPU tensor \(\.\.\., 32\), got torch.float32"):
        matmul_kernel.matmul(torch.randn(4, 32), pairs)
    with pytest.raises(ValueError, match=r"\(\.\.\., 32\), got torch.bfloat16 \(4, 48\)"):
        matmul_kernel.matmul(torch.randn(4, 48).to(torch.bfloat16), pairs)
    with pytest.raises(ValueError, match="contiguous int32 matrix"):
        matmul_kernel.matmul(torch.randn(4, 32).to(torch.bfloat16), pairs.t())
    with pytest.raises(ValueError, match="bias must be a bf16 CPU vector of 16"):
        matmul_kernel.matmul(torch.randn(4, 32).to(torch.bfloat16), pairs, torch.zeros(16))
    with pytest.raises(ValueError, match="cannot take 24 → 16 features"):
        matmul_kernel.pack_weight(torch.randn(16, 24).to(torch.bfloat16), False)
    with pytest.raises(ValueError, match="packs a bf16 CPU matrix"):
        matmul_kernel.pack_weight(torch.randn(16, 32), False)


def test_only_widths_in_sixteens_up_to_the_deepest_sum_are_supported():
    assert matmul_kernel.kernel_supports(64, 192) and matmul_kernel.kernel_supports(16, 512)
    assert not matmul_kernel.kernel_supports(64, 10) and not matmul_kernel.kernel_supports(24, 64)
    assert not matmul_kernel.kernel_supports(0, 16)
    # deeper than 512, oneDNN adds separately summed blocks: the kernel's single chain would differ in the last bit
    assert not matmul_kernel.kernel_supports(576, 64) and not matmul_kernel.kernel_supports(64, 576)


def test_not_supported_where_the_cpu_has_amx(amx_cpu):  # oneDNN's products run on AMX tiles there
    assert not matmul_kernel.kernel_supports(64, 192)


def test_products_it_cannot_take_are_refused_not_left_unwritten():
    zeros = torch.zeros(8, 24, dtype=torch.int32)  # width 24: not a multiple of 16
    with pytest.raises(ValueError, match="depth 16 and width 24"):
        matmul_kernel.matmul(torch.randn(4, 16).to(torch.bfloat16), zeros)
    with pytest.raises(ValueError, match="depth 0 and width 16"):
        matmul_kernel.matmul(torch.randn(4, 0).to(torch.bfloat16), torch.zeros(0, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="depth 576 and width 16"):
        matmul_kernel.matmul(torch.randn(4, 576).to(torch.bfloat16), torch.zeros(288, 16, dtype=torch.int32))
