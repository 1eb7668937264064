"""ctypes bindings of single_query.c: attention of one query per (image, head) against every token, forward and
backward (the CLS token's attention in a ViT's last block under CLS pooling)."""

from __future__ import annotations

import torch

from vitlab.kernels.build import compiled_library, loaded_library, recording_graph

CPU = torch.device("cpu")


def kernel_supports(query: torch.Tensor, key_value: torch.Tensor, heads: int) -> bool:
    """Whether `single_query_forward` takes these with the kernels switched on: bf16 CPU query (B, D) and key_value
    (B, T, 2D), D = heads · a head size the kernel takes, at least one image and token, no graph being recorded."""
    if recording_graph():  # first: a graph recorder must not trace into the library's loading
        return False
    library = compiled_library()
    if library is None:
        return False
    if query.device.type != "cpu" or key_value.device.type != "cpu" or query.dtype != torch.bfloat16 or key_value.dtype != torch.bfloat16:
        return False
    if query.dim() != 2 or key_value.dim() != 3 or heads <= 0 or query.shape[1] % heads:
        return False
    batch, hidden = query.shape
    return key_value.shape[0] == batch and key_value.shape[2] == 2 * hidden and sizes_supported(batch, key_value.shape[1], hidden,
                                                                                                heads, library)


def sizes_supported(batch: int, tokens: int, hidden: int, heads: int, library) -> bool:
    """Whether the library's kernel takes a bf16 CPU query (batch, hidden) and key_value (batch, tokens, 2 hidden) of
    `heads` heads."""
    return (batch > 0 and tokens > 0 and heads > 0 and hidden % heads == 0
            and 0 < hidden // heads <= library.vitlab_single_query_max_head_size())


def check(query: torch.Tensor, key_value: torch.Tensor, scales: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not kernel_supports(query, key_value, heads):
        raise ValueError(f"the single-query attention kernel cannot take a {query.dtype} query of shape {tuple(query.shape)} "
                         f"and {key_value.dtype} keys and values of shape {tuple(key_value.shape)} with {heads} heads")
    scales = scales.detach().to(CPU, torch.float32).reshape(-1).contiguous()
    if scales.shape != (heads,):
        raise ValueError(f"scales must hold one number per head ({heads}), got shape {tuple(scales.shape)}")
    return query.detach().contiguous(), key_value.detach().contiguous(), scales


def single_query_forward(query: torch.Tensor, key_value: torch.Tensor, scales: torch.Tensor, heads: int, mask_first: bool,
                         keep_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out (B, D) bf16, weights (B, H, T) fp32 or None): per head, softmax(query · scale · Kᵀ) V, K and V the halves of
    key_value (B, T, 2, H, Dh); mask_first leaves out token 0 (LSA). The weights are kept for backward."""
    query, key_value, scales = check(query, key_value, scales, heads)
    batch, tokens, _ = key_value.shape
    out = torch.empty(query.shape, dtype=torch.bfloat16)
    weights = torch.empty(batch, heads, tokens) if keep_weights else None
    failed = loaded_library().vitlab_single_query_forward(query.data_ptr(), key_value.data_ptr(), scales.data_ptr(), int(mask_first),
                                                          out.data_ptr(), None if weights is None else weights.data_ptr(), batch,
                                                          tokens, heads, query.shape[1] // heads, torch.get_num_threads())
    if failed:
        raise MemoryError("the single-query attention kernel could not allocate its scores")
    return out, weights


def single_query_backward(query: torch.Tensor, key_value: torch.Tensor, scales: torch.Tensor, weights: torch.Tensor,
                          grad_out: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `single_query_forward` from its weights: (grad_query (B, D) bf16, grad_key_value (B, T, 2D)
    bf16, grad_scale_sums (B, H) fp32: each image's share of each head's scale gradient)."""
    query, key_value, scales = check(query, key_value, scales, heads)
    batch, tokens, _ = key_value.shape
    weights = weights.to(CPU, torch.float32).contiguous()
    grad_out = grad_out.to(CPU, torch.bfloat16).contiguous()
    if weights.shape != (batch, heads, tokens) or grad_out.shape != query.shape:
        raise ValueError(f"weights must be {(batch, heads, tokens)} and grad_out {tuple(query.shape)}, got "
                         f"{tuple(weights.shape)} and {tuple(grad_out.shape)}")
    grad_query, grad_key_value = torch.empty_like(query), torch.empty_like(key_value)
    grad_scale_sums = torch.empty(batch, heads)
    failed = loaded_library().vitlab_single_query_backward(query.data_ptr(), key_value.data_ptr(), scales.data_ptr(), weights.data_ptr(),
                                                           grad_out.data_ptr(), grad_query.data_ptr(), grad_key_value.data_ptr(),
                                                           grad_scale_sums.data_ptr(), batch, tokens, heads, query.shape[1] // heads,
                                                           torch.get_num_threads())
    if failed:
        raise MemoryError("the single-query attention kernel could not allocate its gradient buffer")
    return grad_query, grad_key_value, grad_scale_sums
