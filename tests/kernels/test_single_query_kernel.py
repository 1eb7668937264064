import pytest
import torch

from vitlab.kernels import single_query as single_query_kernel
from vitlab.models.layers import KernelSingleQueryAttention, single_query_attention

SUPPORTED = single_query_kernel.kernel_supports(torch.zeros(1, 16, dtype=torch.bfloat16), torch.zeros(1, 2, 32, dtype=torch.bfloat16), 1)
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="no C compiler for vitlab's kernels")


def inputs(batch: int, tokens: int, heads: int, head_size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads * head_size, generator=generator).to(torch.bfloat16)
    key_value = torch.randn(batch, tokens, 2 * heads * head_size, generator=generator).to(torch.bfloat16)
    return query, key_value


def exact_attention(query, key_value, heads, scales, mask_first):
    """float64: per head softmax(q · scale · Kᵀ) V, q rounded to bf16 after scaling as `query * scale` is."""
    batch, tokens, _ = key_value.shape
    key, value = key_value.double().view(batch, tokens, 2, heads, -1).unbind(2)  # (B, T, H, Dh)
    scaled = (query.view(batch, heads, -1).float() * scales.view(1, heads, 1)).to(torch.bfloat16).double()
    scores = torch.einsum("bhd,bthd->bth", scaled, key)
    if mask_first:
        scores[:, 0] = float("-inf")
    return torch.einsum("bth,bthd->bhd", scores.softmax(dim=1), value).reshape(batch, -1)


SHAPES = [(1, 1, 16), (2, 2, 8), (65, 4, 16), (257, 4, 16), (17, 3, 64), (9, 2, 40)]  # (tokens, heads, head size)


# (a single token left out would leave the query nothing to attend to: NaN, as PyTorch's softmax gives)
@pytest.mark.parametrize("tokens,heads,head_size,mask_first", [(*shape, False) for shape in SHAPES] + [(*shape, True) for shape in SHAPES[1:]])
def test_forward_is_the_float64_attention_within_bf16s_rounding(tokens, heads, head_size, mask_first):
    query, key_value = inputs(5, tokens, heads, head_size, seed=tokens)
    scales = torch.rand(heads) + 0.1
    out, weights = single_query_kernel.single_query_forward(query, key_value, scales, heads, mask_first)
    assert out.dtype == torch.bfloat16 and out.shape == query.shape and weights.shape == (5, heads, tokens)
    torch.testing.assert_close(out.double(), exact_attention(query, key_value, heads, scales, mask_first), rtol=0.02, atol=0.02)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5, heads), rtol=0.01, atol=0.01)
    if mask_first:
        assert (weights[..., 0] == 0).all()


@pytest.mark.parametrize("tokens,heads,head_size,mask_first", [(65, 4, 16, False), (33, 2, 8, True), (20, 1, 64, True)])
def test_gradients_match_float64_autograd_including_a_learned_scale(tokens, heads, head_size, mask_first):
    query, key_value = inputs(6, tokens, heads, head_size, seed=1)
    log_temperature = torch.tensor(-1.0, requires_grad=True)
    query_, key_value_ = query.clone().requires_grad_(), key_value.clone().requires_grad_()
    out = KernelSingleQueryAttention.apply(query_, key_value_, torch.exp(log_temperature), heads, mask_first)
    grad_out = torch.randn(out.shape).to(torch.bfloat16)
    out.backward(grad_out)
    exact = [query.double().requires_grad_(), key_value.double().requires_grad_(), torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)]
    batch = 6
    key, value = exact[1].view(batch, tokens, 2, heads, -1).unbind(2)
    scores = torch.einsum("bhd,bthd->bth", exact[0].view(batch, heads, -1) * torch.exp(exact[2]), key)
    if mask_first:
        scores = scores.index_fill(1, torch.tensor([0]), float("-inf"))
    torch.einsum("bth,bthd->bhd", scores.softmax(dim=1), value).reshape(batch, -1).backward(grad_out.double())
    for got, expected in ((query_.grad, exact[0].grad), (key_value_.grad, exact[1].grad), (log_temperature.grad, exact[2].grad)):
        torch.testing.assert_close(got.double(), expected, rtol=0.05, atol=0.03 * (1 + expected.abs().max().item()))


def test_the_kernel_and_the_einsum_route_agree():
    query, key_value = inputs(4, 65, 4, 16, seed=2)
    kernel = single_query_attention(query, key_value, 4, scale=0.25)
    generic = single_query_attention(query.float(), key_value.float(), 4, scale=0.25)  # fp32: not the kernel's
    torch.testing.assert_close(kernel.float(), generic, rtol=0.02, atol=0.02)


def test_what_the_kernel_does_not_take_is_refused_with_a_message():
    query, key_value = inputs(2, 5, 2, 16)
    assert not single_query_kernel.kernel_supports(query.float(), key_value, 2)
    assert not single_query_kernel.kernel_supports(query, key_value[:, :, :32], 2)
    assert not single_query_kernel.kernel_supports(query, key_value, 3)
    assert not single_query_kernel.kernel_supports(query[:1], key_value, 2)
    assert not single_query_kernel.kernel_supports(torch.zeros(2, 512, dtype=torch.bfloat16), torch.zeros(2, 5, 1024, dtype=torch.bfloat16), 1)
    with pytest.raises(ValueError, match="single-query attention kernel cannot take"):
        single_query_kernel.single_query_forward(query, key_value, torch.ones(3), 3, False)
    with pytest.raises(ValueError, match="one number per head"):
        single_query_kernel.single_query_forward(query, key_value, torch.ones(3), 2, False)
