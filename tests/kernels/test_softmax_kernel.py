import ctypes
import subprocess
from pathlib import Path

import pytest
import torch

import vitlab.kernels.build as build
from vitlab.kernels.softmax import kernel_supports, softmax, softmax_backward
from vitlab.models.layers import KernelSoftmax, self_mask_bias

pytestmark = pytest.mark.skipif(build.compiled_library() is None, reason="vitlab's C kernels are not available here")
# The softmax kernel itself needs AVX-512 (elsewhere vitlab keeps PyTorch's softmax and the C function is a stub).
requires_softmax_kernel = pytest.mark.skipif(not kernel_supports(torch.ones(1, 2, dtype=torch.bfloat16)),
                                             reason="no AVX-512 softmax kernel on this machine")
BF16_ULP = 2**-7  # relative spacing of bf16 numbers near 1


def random_scores(*shape, spread=4.0):
    return (torch.randn(*shape, dtype=torch.float64) * spread).to(torch.bfloat16)


@requires_softmax_kernel
@pytest.mark.parametrize("tokens", [1, 5, 16, 17, 64, 65, 257])
def test_forward_matches_pytorch_to_bf16_rounding(tokens):
    scores = random_scores(3, 2, tokens, tokens)
    weights = softmax(scores)
    expected = scores.double().softmax(-1)
    assert weights.dtype == torch.bfloat16 and weights.shape == scores.shape
    torch.testing.assert_close(weights.double(), expected, rtol=BF16_ULP, atol=1e-30)
    torch.testing.assert_close(weights.double().sum(-1), torch.ones(3, 2, tokens, dtype=torch.float64), rtol=0, atol=tokens * BF16_ULP)


@requires_softmax_kernel
@pytest.mark.parametrize("tokens", [2, 17, 65])
def test_the_diagonal_is_left_out_as_with_an_added_minus_infinity(tokens):
    scores = random_scores(4, 3, tokens, tokens)
    weights = softmax(scores, mask_diagonal=True)
    expected = (scores.double() + self_mask_bias(tokens, torch.float64, scores.device)).softmax(-1)
    assert torch.all(weights.diagonal(dim1=-2, dim2=-1) == 0)
    torch.testing.assert_close(weights.double(), expected, rtol=BF16_ULP, atol=1e-30)


@requires_softmax_kernel
def test_special_values_as_pytorch_gives_them():
    scores = torch.tensor([[0.0, -float("inf"), 1.0], [float("nan"), 0.0, 0.0], [-float("inf")] * 3, [1e30, -1e30, 0.0]],
                          dtype=torch.bfloat16)
    weights, expected = softmax(scores), scores.float().softmax(-1).to(torch.bfloat16)
    assert torch.equal(weights.isnan(), expected.isnan())  # a NaN or an all -inf row gives NaN
    assert torch.equal(weights[~weights.isnan()], expected[~expected.isnan()])
    assert torch.all(softmax(torch.tensor([[0.0]], dtype=torch.bfloat16), mask_diagonal=True).isnan())  # nothing left


@requires_softmax_kernel
def test_backward_matches_pytorchs_gradient():
    scores = random_scores(8, 4, 65, 65)
    weights = softmax(scores)
    grad = torch.randn(weights.shape, dtype=torch.bfloat16)
    expected = torch.ops.aten._softmax_backward_data(grad.double(), weights.double(), -1, torch.float64)
    torch.testing.assert_close(softmax_backward(weights, grad).double(), expected, rtol=2 * BF16_ULP, atol=1e-3 * expected.abs().max().item())


@requires_softmax_kernel
def test_autograd_function_through_a_mixed_precision_graph():
    torch.manual_seed(0)
    query = torch.randn(2, 3, 9, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = query @ query.transpose(-2, -1)
        weights = KernelSoftmax.apply(scores, True)
        loss = (weights * torch.arange(9.0)).sum()
    loss.backward()
    reference_query = query.detach().clone().requires_grad_()
    reference_scores = (reference_query @ reference_query.transpose(-2, -1)).to(torch.bfloat16).double()
    reference = (reference_scores + self_mask_bias(9, torch.float64, query.device)).softmax(-1)
    (reference * torch.arange(9.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(query.grad, reference_query.grad, rtol=0.05, atol=0.05)


@requires_softmax_kernel
def test_layouts_and_what_the_kernel_takes():
    scores = random_scores(2, 7, 7).transpose(-2, -1)  # not contiguous
    assert torch.equal(softmax(scores), softmax(scores.contiguous()))
    assert kernel_supports(torch.ones(2, 3, dtype=torch.bfloat16))
    assert not kernel_supports(torch.ones(2, 3)) and not kernel_supports(torch.ones(2, 0, dtype=torch.bfloat16))
    assert not kernel_supports(torch.ones(1, 4097, dtype=torch.bfloat16))  # longer rows than the kernel's buffer
    with pytest.raises(ValueError, match="square"):
        softmax(torch.ones(2, 3, dtype=torch.bfloat16), mask_diagonal=True)


def library_built_for(target: str, folder: Path) -> ctypes.CDLL:
    """This folder's kernels compiled for another CPU (`-march=target`); skips where the compiler does not know it."""
    compiler = build.find_compiler()
    sources = [str(Path(build.__file__).with_name(name)) for name in build.SOURCES]
    library_file = folder / f"{target}.so"
    flags = [flag for flag in build.FLAGS if not flag.startswith("-march")]
    try:
        subprocess.run([*compiler, *flags, f"-march={target}", "-o", str(library_file), *sources], check=True, capture_output=True)
    except subprocess.CalledProcessError as error:
        if target.encode() in error.stderr:  # the compiler rejected the target itself (e.g. not an x86 machine)
            pytest.skip(f"this compiler cannot build for {target}")
        raise
    return ctypes.CDLL(str(library_file))


def test_a_build_without_avx512_leaves_softmax_and_attention_to_pytorch(tmp_path):
    """On a CPU without AVX-512 the library still builds (dropout runs anywhere) but reports these two kernels
    unsupported, so vitlab keeps PyTorch's vectorised operators there."""
    library = library_built_for("x86-64-v2", tmp_path)
    assert library.vitlab_softmax_supported() == 0 and library.vitlab_attention_supported() == 0
    assert library.vitlab_layer_norm_supported() == library.vitlab_gelu_supported() == 0
    this_machine = build.compiled_library()
    assert this_machine.vitlab_softmax_supported() == int(kernel_supports(torch.ones(2, 3, dtype=torch.bfloat16)))


def test_a_build_for_avx512_without_bf16_keeps_every_kernel_but_attention(tmp_path):
    """Skylake-SP to Ice Lake: AVX-512 without its BF16 instructions. The library must still build (one source that
    needed BF16 would take every kernel away), with softmax, layer norm and GELU on and attention off."""
    library = library_built_for("icelake-server", tmp_path)
    assert library.vitlab_softmax_supported() == library.vitlab_layer_norm_supported() == library.vitlab_gelu_supported() == 1
    assert library.vitlab_attention_supported() == 0
