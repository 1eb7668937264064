"""Attention kernels: the one place that decides how softmax(Q Kᵀ / τ) V is computed.

`self_attention` takes the QKV projection's output (B, T, 3, H, Dh); on the CPU in bf16 it runs vitlab's C kernel
(kernels/attention.c: up to 272 tokens, heads of 16-64 features, a CPU with AVX-512 BF16) whenever neither attention
dropout nor the weights are asked for: Q, K and V are read where the projection wrote them and the output is
written where the next projection reads it, so no head-major copies are made and the T × T scores stay in the
cache. It was faster than every PyTorch route below at 64, 65 and 257 tokens (docs/performance.md). Everything
else goes through `attention`, which has two kernels with one result (tests check they agree), chosen as follows:

- **fused**: `F.scaled_dot_product_attention`, the default while training and evaluating;
- **explicit**: the softmax written out (by vitlab's C softmax on AVX-512 CPUs in bf16), when the weights are
  wanted (attention maps, rollout), when the attention needs a diagonal mask or a learned temperature (LSA), and
  for attention dropout on the CPU (SDPA's dropout there samples with the slow `bernoulli_`; see models/dropout.py);
- on the CPU, bf16 sequences of at most `CPU_EXPLICIT_MAX_TOKENS` tokens (every CIFAR ViT with patch >= 4)
  take the explicit path in bf16: PyTorch's CPU flash-attention kernel works in blocks sized for long
  sequences and lost to two batched matmuls and a softmax at 64-129 tokens (docs/performance.md). The
  scores are rounded to bf16 there, as autocast's matmul does on a GPU's non-fused path; the written-out
  path in fp32 was not faster than the fused kernel, so fp32 inputs keep the fused kernel;
- longer sequences on the CPU in bf16 run the fused kernel in fp32: PyTorch's CPU flash-attention backward
  is slower in bf16 than in fp32, and CPU autocast would cast fp32 inputs back to bf16;
- on CUDA, the fused kernel may be FlashAttention, memory-efficient attention or the math path, not
  cuDNN's attention, which PyTorch prefers on Hopper GPUs and whose bf16 backward has known NaN cases
  (pytorch/pytorch#196678, NVIDIA/cudnn-frontend#160). On an H200 this cost nothing measurable at
  vitlab's sizes; whether cuDNN caused the first GPU session's NaN in vit-fast (now vit-cct) was tested and not
  established (docs/gpu/README.md).

`single_query_attention` is the attention of one query per image against every token (the CLS token's in a ViT's last
block under CLS pooling, models/vit.py): vitlab's C kernel on the CPU in bf16 (kernels/single_query.c), else two batched
matmuls. Within `written_out_attention()` every attention takes the explicit path without keeping its weights, so that
a FLOP counter sees its products (models/flops.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitlab.kernels import attention as attention_kernel
from vitlab.kernels import recording_graph
from vitlab.kernels import single_query as single_query_kernel
from vitlab.kernels import softmax as softmax_kernel
from vitlab.kernels.dropout import random_key
from vitlab.models.base import ThreadSwitch
from vitlab.models.dropout import drop_threshold, dropout_matmul, keep_scale

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3 has no backend selection (and no cuDNN attention)
    SDPBackend = sdpa_kernel = None

# The kernels SDPA may use on CUDA (None: PyTorch's own choice, cuDNN included).
CUDA_SDPA_BACKENDS = (None if SDPBackend is None else
                      [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
# Up to this many tokens the CPU computes bf16 attention explicitly: written out won at every length measured up to 129
# tokens and lost from 145 tokens with 16-wide heads (docs/performance.md).
CPU_EXPLICIT_MAX_TOKENS = 128


_written_out = ThreadSwitch()


def written_out_attention():
    """Within it, every attention on this thread is written out as matmuls and a softmax (no C kernel, no fused
    kernel), as with return_attention=True but without keeping the weights: what a FLOP counter can see."""
    return _written_out.on()


def attention_written_out() -> bool:
    """Whether `written_out_attention` is on for this thread."""
    return _written_out.is_on()


def self_mask_bias(tokens: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(T, T): -inf on the diagonal, 0 elsewhere. Added to the scores, it removes the entries LSA leaves out (a token
    may not attend to itself): `masked_fill` with a bool mask over all B·H·T² scores is several times slower on the
    CPU than this add (docs/performance.md), so the bool mask only touches the T² entries of the bias. (Built with
    masked_fill, not fill_diagonal_, which ONNX export cannot convert.)"""
    diagonal = torch.eye(tokens, dtype=torch.bool, device=device)
    return torch.zeros(tokens, tokens, dtype=dtype, device=device).masked_fill_(diagonal, float("-inf"))


class KernelSoftmax(torch.autograd.Function):
    """softmax over the last axis by vitlab's C kernel (bf16 on the CPU), optionally without the diagonal."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, mask_diagonal: bool) -> torch.Tensor:
        weights = softmax_kernel.softmax(scores, mask_diagonal)
        ctx.save_for_backward(weights)
        return weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_weights: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weights,) = ctx.saved_tensors
        return softmax_kernel.softmax_backward(weights, grad_weights), None


def attention_softmax(scores: torch.Tensor, mask_self: bool) -> torch.Tensor:
    """softmax(scores, dim=-1) over (B, H, T, T), with each token's score for itself left out if mask_self."""
    if not recording_graph() and softmax_kernel.kernel_supports(scores):
        return KernelSoftmax.apply(scores, mask_self)
    if mask_self:
        scores = scores + self_mask_bias(scores.shape[-1], scores.dtype, scores.device)
    return scores.softmax(dim=-1)


@dataclass(frozen=True)
class SavedAttention:
    """What `kernel_attention_backward` needs of a `kernel_attention_forward`."""

    qkv: torch.Tensor  # (B, T, 3, H, Dh) bf16
    out: torch.Tensor  # (B, T, H, Dh) bf16
    weights: torch.Tensor | None  # (B, H, T, T) bf16, a view of padded rows; None where none was kept
    scales: torch.Tensor  # (H,) fp32
    dropout: attention_kernel.AttentionDropout
    scale_shape: torch.Size | None  # a tensor scale's shape and dtype, for its gradient; None for a float
    scale_dtype: torch.dtype | None


def kernel_attention_forward(qkv: torch.Tensor, scale: torch.Tensor | float, mask_self: bool, keep_weights: bool,
                             dropout: float = 0.0) -> tuple[torch.Tensor, SavedAttention]:
    """(self-attention of qkv (B, T, 3, H, Dh) by vitlab's C kernel → (B, T, H, Dh), what backward needs). No
    autograd: KernelSelfAttention's forward, and a fused block's (models/fused_block.py)."""
    scales = per_head_scales(scale, qkv.shape[3])  # (H,)
    drop = kernel_attention_dropout(dropout, qkv.device)
    out, weights = attention_kernel.attention_forward(qkv, scales, mask_self, keep_weights, drop)  # (B, T, H, Dh), (B, H, T, T)
    tensor_scale = isinstance(scale, torch.Tensor)
    return out, SavedAttention(qkv, out, weights, scales, drop, scale.shape if tensor_scale else None,
                               scale.dtype if tensor_scale else None)


def kernel_attention_dropout(dropout: float, device: torch.device) -> attention_kernel.AttentionDropout:
    """The attention kernel's dropout of probability `dropout`: with dropout, a key from PyTorch's generator, as
    vitlab's Dropout draws one."""
    if dropout > 0:
        return attention_kernel.AttentionDropout(drop_threshold(dropout), keep_scale(dropout), random_key(device))
    return attention_kernel.NO_DROPOUT


def kernel_attention_backward(saved: SavedAttention, grad_out: torch.Tensor,
                              scale_gradient_wanted: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_qkv, the gradient of a tensor scale or None) of `kernel_attention_forward`."""
    grad_qkv, grad_scale_sums = attention_kernel.attention_backward(saved.qkv, saved.out, saved.weights, grad_out, saved.scales,
                                                                    saved.dropout)
    grad_scale = None
    if saved.scale_shape is not None and scale_gradient_wanted:
        grad_scale = scale_gradient(grad_scale_sums, saved.scale_shape, saved.scale_dtype)
    return grad_qkv, grad_scale


class KernelSelfAttention(torch.autograd.Function):
    """Self-attention by vitlab's C kernel, straight from the QKV projection's output (see kernels/attention.c)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, scale: torch.Tensor | float, mask_self: bool, keep_weights: bool,
                dropout: float = 0.0) -> torch.Tensor:
        out, saved = kernel_attention_forward(qkv, scale, mask_self, keep_weights, dropout)
        ctx.save_for_backward(saved.qkv, saved.out, saved.weights, saved.scales)
        ctx.dropout, ctx.scale_shape, ctx.scale_dtype = saved.dropout, saved.scale_shape, saved.scale_dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward through the kernel (cpu_kernels false has one)
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None, None, None]:
        qkv, out, weights, scales = ctx.saved_tensors
        saved = SavedAttention(qkv, out, weights, scales, ctx.dropout, ctx.scale_shape, ctx.scale_dtype)
        grad_qkv, grad_scale = kernel_attention_backward(saved, grad_out, ctx.needs_input_grad[1])
        return grad_qkv, grad_scale, None, None, None


def per_head_scales(scale: torch.Tensor | float, heads: int) -> torch.Tensor:
    """(H,) fp32 CPU: a float, or a one-number or per-head tensor (a learned temperature), for every head."""
    if isinstance(scale, torch.Tensor):
        return scale.detach().to("cpu", torch.float32).reshape(-1).expand(heads)
    return torch.full((heads,), float(scale), device="cpu")


def scale_gradient(grad_scale_sums: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of a tensor scale of `shape` (one number, or one per head) from the kernels' (B, H) sums."""
    per_head = grad_scale_sums.sum(0)  # (H,)
    return (per_head.sum() if shape.numel() == 1 else per_head).reshape(shape).to(dtype)


class KernelSingleQueryAttention(torch.autograd.Function):
    """Attention of one query per (image, head) against every token by vitlab's C kernel (kernels/single_query.c)."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key_value: torch.Tensor, scale: torch.Tensor | float, heads: int,
                mask_first: bool) -> torch.Tensor:
        scales = per_head_scales(scale, heads)
        out, weights = single_query_kernel.single_query_forward(query, key_value, scales, heads, mask_first,
                                                                keep_weights=any(ctx.needs_input_grad))  # (B, D), (B, H, T)
        ctx.save_for_backward(query, key_value, scales, weights)
        ctx.heads = heads
        ctx.scale_shape = scale.shape if isinstance(scale, torch.Tensor) else None
        ctx.scale_dtype = scale.dtype if isinstance(scale, torch.Tensor) else None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, None, None]:
        query, key_value, scales, weights = ctx.saved_tensors
        grad_query, grad_key_value, grad_scale_sums = single_query_kernel.single_query_backward(
            query, key_value, scales, weights, grad_out, ctx.heads)
        grad_scale = None
        if ctx.scale_shape is not None and ctx.needs_input_grad[2]:
            grad_scale = scale_gradient(grad_scale_sums, ctx.scale_shape, ctx.scale_dtype)
        return grad_query, grad_key_value, grad_scale, None, None


def single_query_attention(query: torch.Tensor, key_value: torch.Tensor, heads: int, *, scale: torch.Tensor | float,
                           mask_first: bool = False, dropout: float = 0.0) -> torch.Tensor:
    """One query per image against every token: query (B, D), key_value (B, T, 2D) as (B, T, 2, H, Dh) → (B, D), per
    head softmax(scale · q Kᵀ [token 0 left out if mask_first]) V. On the CPU in bf16 without attention dropout by
    vitlab's C kernel; elsewhere as two batched matmuls of one row per (image, head)."""
    if dropout == 0.0 and not attention_written_out() and single_query_kernel.kernel_supports(query, key_value, heads):
        return KernelSingleQueryAttention.apply(query, key_value, scale, heads, mask_first)
    batch, tokens, _ = key_value.shape
    key, value = key_value.view(batch, tokens, 2, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, Dh) each
    scaled = query.view(batch, heads, 1, -1) * (scale.reshape(-1, 1, 1) if isinstance(scale, torch.Tensor) else scale)
    scores = scaled @ key.transpose(-2, -1)  # (B, H, 1, T)
    if mask_first:  # LSA: the query's own token left out
        scores = scores.index_fill(-1, torch.zeros(1, dtype=torch.long, device=scores.device), float("-inf"))
    weights = F.dropout(scores.softmax(dim=-1), dropout, dropout > 0)
    return (weights.to(value.dtype) @ value).reshape(batch, -1)  # (B, D)


def self_attention(qkv: torch.Tensor, *, dropout: float = 0.0, scale: torch.Tensor | float | None = None, mask_self: bool = False,
                   return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`attention` of the QKV projection's output: qkv (B, T, 3, H, Dh) → ((B, T, H·Dh), weights (B, H, T, T) or None).

    On the CPU, bf16 sequences the C kernel takes (kernels/attention.c: at most 272 tokens, heads of 16, 32, 48 or 64
    features, AVX-512 BF16) run there, attention dropout included, unless the weights are to be returned: no copies into
    head-major layouts, the scores never leave the cache. Everything else goes through `attention`."""
    batch, tokens, _, heads, head_size = qkv.shape
    if not recording_graph() and not return_weights and not attention_written_out() and attention_kernel.kernel_supports(qkv):
        scale = head_size**-0.5 if scale is None else scale
        # Backward needs the weights; evaluation does not (written only if a gradient can be asked for).
        keep_weights = torch.is_grad_enabled() and (qkv.requires_grad or (isinstance(scale, torch.Tensor) and scale.requires_grad))
        mixed = KernelSelfAttention.apply(qkv, scale, mask_self, keep_weights, dropout)  # (B, T, H, Dh)
        return mixed.reshape(batch, tokens, heads * head_size), None
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, T, Dh)
    mixed, weights = attention(query, key, value, dropout=dropout, scale=scale, mask_self=mask_self, return_weights=return_weights)
    return mixed.transpose(1, 2).reshape(batch, tokens, heads * head_size), weights  # (B, T, D)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, dropout: float = 0.0,
              scale: torch.Tensor | float | None = None, mask_self: bool = False,
              return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(scale · Q Kᵀ [self masked]) V for query, key, value (B, H, T, Dh) → ((B, H, T, Dh), weights or None).

    Args:
        dropout: attention dropout on the weights (only pass > 0 while training).
        scale: multiplies the scores; a float, a (H, 1, 1) tensor (a learned per-head temperature), or
            None for 1/sqrt(Dh).
        mask_self: leave out each token's attention to itself (Lee et al. 2021's diagonal masking).
        return_weights: also return the attention weights (B, H, T, T) (the explicit path).
    """
    head_size = query.shape[-1]
    scale = head_size**-0.5 if scale is None else scale
    cpu_dropout = dropout > 0 and query.device.type == "cpu"
    learned_scale = isinstance(scale, torch.Tensor)
    short_on_cpu = query.device.type == "cpu" and query.dtype == torch.bfloat16 and query.shape[-2] <= CPU_EXPLICIT_MAX_TOKENS
    if return_weights or cpu_dropout or mask_self or learned_scale or short_on_cpu or attention_written_out():
        # Scaling Q (T × Dh) instead of the scores (T × T) saves a pass over the largest tensor.
        scores = (query * scale) @ key.transpose(-2, -1)  # (B, H, T, T)
        weights = attention_softmax(scores, mask_self)
        if cpu_dropout:
            mixed = dropout_matmul(weights, value, dropout)
        else:
            mixed = F.dropout(weights, dropout, dropout > 0) @ value  # (B, H, T, Dh)
        return mixed, weights if return_weights else None
    if query.device.type == "cpu" and query.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            mixed = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), scale=scale)
        return mixed.to(value.dtype), None
    if query.device.type == "cuda" and CUDA_SDPA_BACKENDS is not None:
        with sdpa_kernel(CUDA_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scale), None
    return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scale), None
