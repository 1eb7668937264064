"""ctypes bindings of attention.c: self-attention of short sequences straight from the QKV projection's output."""

from __future__ import annotations

import torch

from vitlab.kernels.build import compiled_library


def kernel_supports(qkv: torch.Tensor) -> bool:
    """Whether `attention_forward` can take this (B, T, 3, H, Dh) tensor: bf16 on the CPU, at most the kernel's tokens,
    heads of a multiple of 16 up to its limit, and a CPU and compiler with AVX-512 BF16."""
    library = compiled_library()
    if library is None or qkv.device.type != "cpu" or qkv.dtype != torch.bfloat16 or qkv.dim() != 5 or qkv.shape[2] != 3:
        return False
    batch, tokens, _, heads, head_size = qkv.shape
    return (bool(library.vitlab_attention_supported()) and batch > 0 and heads > 0 and 0 < tokens <= library.vitlab_attention_max_tokens()
            and head_size % 16 == 0 and 0 < head_size <= library.vitlab_attention_max_head_size())


def attention_forward(qkv: torch.Tensor, scales: torch.Tensor, mask_diagonal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, T, 3, H, Dh) bf16, scales (H,) fp32 → (out (B, T, H, Dh), weights (B, H, T, T)), both bf16.

    out = softmax(scale_h · Q Kᵀ [diagonal left out]) V per image and head h, the query rounded to bf16 after
    scaling; weights are the softmax's output, kept for backward."""
    qkv, scales = qkv.contiguous(), scales.to(torch.float32).contiguous()
    batch, tokens, _, heads, head_size = qkv.shape
    out = torch.empty(batch, tokens, heads, head_size, dtype=qkv.dtype)
    weights = torch.empty(batch, heads, tokens, tokens, dtype=qkv.dtype)
    compiled_library().vitlab_attention_forward(qkv.data_ptr(), out.data_ptr(), weights.data_ptr(), batch, tokens, heads, head_size,
                                                scales.data_ptr(), int(mask_diagonal), torch.get_num_threads())
    return out, weights


def attention_backward(qkv: torch.Tensor, out: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor,
                       scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `attention_forward`: (grad_qkv (B, T, 3, H, Dh) bf16, grad_scale_sums (B, H) fp32), where
    grad_scale_sums[b, h] is image b's share of the gradient of scales[h]."""
    qkv, out, weights, scales = qkv.contiguous(), out.contiguous(), weights.contiguous(), scales.to(torch.float32).contiguous()
    grad_out = grad_out.contiguous().to(torch.bfloat16)
    batch, tokens, _, heads, head_size = qkv.shape
    grad_qkv = torch.empty_like(qkv)
    grad_scale_sums = torch.empty(batch, heads, dtype=torch.float32)
    compiled_library().vitlab_attention_backward(qkv.data_ptr(), out.data_ptr(), weights.data_ptr(), grad_out.data_ptr(),
                                                 grad_qkv.data_ptr(), grad_scale_sums.data_ptr(), batch, tokens, heads, head_size,
                                                 scales.data_ptr(), torch.get_num_threads())
    return grad_qkv, grad_scale_sums
