import pytest
import torch
import torch.nn.functional as F

from vitlab.models import layers
from vitlab.models.layers import CPU_EXPLICIT_MAX_TOKENS, attention


def attention_inputs(tokens: int, dtype: torch.dtype, head_size: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(tokens)
    return [torch.randn(3, 4, tokens, head_size, generator=generator).to(dtype).requires_grad_() for _ in range(3)]


def reference_attention(query, key, value) -> torch.Tensor:
    """PyTorch's fused kernel in fp64: what every path must agree with."""
    return F.scaled_dot_product_attention(query.double(), key.double(), value.double())


@pytest.mark.parametrize("tokens", [5, 65, CPU_EXPLICIT_MAX_TOKENS, CPU_EXPLICIT_MAX_TOKENS + 1, 257])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_short_and_long_sequences_on_the_cpu_agree_with_the_fused_kernel(tokens, dtype, tolerance):
    query, key, value = attention_inputs(tokens, dtype)
    mixed, weights = attention(query, key, value)  # (B, H, T, Dh)
    assert weights is None and mixed.dtype == dtype and mixed.shape == query.shape
    expected = reference_attention(query, key, value)
    torch.testing.assert_close(mixed.double(), expected, rtol=tolerance, atol=tolerance)
    upstream = torch.randn_like(expected)
    actual_grads = torch.autograd.grad(mixed.double(), (query, key, value), upstream.to(dtype))
    expected_grads = torch.autograd.grad(expected, (query, key, value), upstream)
    for actual, wanted in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(actual.double(), wanted.double(), rtol=tolerance, atol=4 * tolerance)


def test_only_bf16_sequences_up_to_the_limit_take_the_explicit_path_on_the_cpu(monkeypatch):
    fused_calls = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        fused_calls.append((args[0].shape[-2], args[0].dtype))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", counting_sdpa)
    for tokens in (17, CPU_EXPLICIT_MAX_TOKENS, CPU_EXPLICIT_MAX_TOKENS + 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed, _ = attention(*attention_inputs(tokens, torch.bfloat16))
        assert mixed.dtype == torch.bfloat16
    assert fused_calls == [(CPU_EXPLICIT_MAX_TOKENS + 1, torch.float32)]  # the long one, upcast to fp32
    fused_calls.clear()
    attention(*attention_inputs(17, torch.float32))  # fp32 (e.g. --precision fp32) keeps the fused kernel
    assert fused_calls == [(17, torch.float32)]


def test_the_bf16_path_stays_close_with_peaked_scores():
    """Trained ViTs have attention scores up to ~17 (a seed-001 checkpoint); the bf16 path rounds them. Bound the error."""
    query, key, value = attention_inputs(65, torch.float32)
    query = (query * 6).detach()  # scores with a std of about 6 and maxima near 25
    reference = reference_attention(query, key, value)
    mixed, _ = attention(query.bfloat16(), key.bfloat16(), value.bfloat16())
    error = (mixed.double() - reference).abs()
    assert error.mean() < 0.008 and error.max() < 0.15  # about 1.6x the fp32 kernel on the same inputs (docs/performance.md)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_self_masked_attention_with_a_learned_scale_matches_a_masked_reference(dtype, tolerance):
    """LSA: no token attends to itself, and the per-head temperature gets the gradient a masked softmax gives it."""
    query, key, value = attention_inputs(65, dtype)
    scale = torch.tensor([0.3, 0.2, 0.25, 0.1]).view(4, 1, 1).to(dtype).requires_grad_()
    mixed, weights = attention(query, key, value, scale=scale, mask_self=True, return_weights=True)
    assert torch.all(weights.diagonal(dim1=-2, dim2=-1) == 0)
    scores = (query.double() * scale.double()) @ key.double().transpose(-2, -1)
    eye = torch.eye(65, dtype=torch.bool)
    expected = scores.masked_fill(eye, float("-inf")).softmax(-1) @ value.double()
    torch.testing.assert_close(mixed.double(), expected, rtol=tolerance, atol=tolerance)
    upstream = torch.randn_like(expected)
    actual_grads = torch.autograd.grad(mixed.double(), (query, key, value, scale), upstream.to(dtype))
    expected_grads = torch.autograd.grad(expected, (query, key, value, scale), upstream)
    for actual, wanted in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(actual.double(), wanted.double(), rtol=4 * tolerance, atol=4 * tolerance)
