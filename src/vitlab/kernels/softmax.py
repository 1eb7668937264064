"""ctypes bindings of softmax.c: softmax over the last axis of bf16 scores, forward and backward."""

from __future__ import annotations

import torch

from vitlab.kernels.build import compiled_library, library_capabilities, loaded_library


def kernel_supports(scores: torch.Tensor) -> bool:
    """Whether `softmax` can take these scores: bf16 on the CPU, rows the kernel's buffer holds, and a CPU and compiler
    with AVX-512 (without it PyTorch's softmax is the faster one)."""
    library = compiled_library()
    if library is None or scores.device.type != "cpu" or scores.dtype != torch.bfloat16 or scores.dim() < 1:
        return False
    capabilities = library_capabilities(library)
    return capabilities.softmax and 0 < scores.shape[-1] <= capabilities.softmax_max_columns


def softmax(scores: torch.Tensor, mask_diagonal: bool = False) -> torch.Tensor:
    """softmax(scores, dim=-1); with mask_diagonal, scores (..., T, T) leave out each row's own column (set to -inf)."""
    scores = scores.contiguous()
    if mask_diagonal and (scores.dim() < 2 or scores.shape[-1] != scores.shape[-2]):
        raise ValueError(f"mask_diagonal needs square (..., T, T) scores, got {tuple(scores.shape)}")
    out = torch.empty_like(scores)
    columns = scores.shape[-1]
    loaded_library().vitlab_softmax_bf16(scores.data_ptr(), out.data_ptr(), scores.numel() // columns, columns,
                                           int(mask_diagonal), torch.get_num_threads())
    return out


def softmax_backward(weights: torch.Tensor, grad_weights: torch.Tensor) -> torch.Tensor:
    """The gradient of the scores from softmax's output `weights` and the gradient of that output (both bf16)."""
    weights, grad_weights = weights.contiguous(), grad_weights.contiguous().to(torch.bfloat16)
    grad_scores = torch.empty_like(weights)
    columns = weights.shape[-1]
    loaded_library().vitlab_softmax_backward_bf16(weights.data_ptr(), grad_weights.data_ptr(), grad_scores.data_ptr(),
                                                    weights.numel() // columns, columns, torch.get_num_threads())
    return grad_scores
