"""ctypes bindings of gelu.c: GELU of bf16 activations that also writes its derivative for backward."""

from __future__ import annotations

import torch

from vitlab.kernels.build import compiled_library, library_capabilities, loaded_library


def shape_supported(x: torch.Tensor, library) -> bool:
    """Whether the library's GELU kernel can take x: a non-empty bf16 CPU tensor, and a CPU and compiler with AVX-512."""
    return (library is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.numel() > 0
            and library_capabilities(library).gelu)


def kernel_supports(x: torch.Tensor) -> bool:
    """Whether `gelu_forward` will take x (see shape_supported) with the kernels switched on."""
    return shape_supported(x, compiled_library())


def gelu_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU (the exact, erf form) of bf16 x → (GELU(x), GELU'(x)), both bf16 of x's shape."""
    if not shape_supported(x, loaded_library()):
        raise ValueError(f"the GELU kernel cannot take a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}")
    x = x.contiguous()
    out, derivative = torch.empty_like(x), torch.empty_like(x)
    loaded_library().vitlab_gelu_forward(x.data_ptr(), out.data_ptr(), derivative.data_ptr(), x.numel(), torch.get_num_threads())
    return out, derivative


def gelu_backward(grad_out: torch.Tensor, derivative: torch.Tensor) -> torch.Tensor:
    """grad_out · derivative, in bf16 (grad_out is cast to bf16 if it is not)."""
    grad_out = grad_out.to(torch.device("cpu"), torch.bfloat16).contiguous()
    if grad_out.shape != derivative.shape:
        raise ValueError(f"grad_out must have the derivative's shape {tuple(derivative.shape)}, got {tuple(grad_out.shape)}")
    grad_x = torch.empty_like(derivative)
    loaded_library().vitlab_gelu_backward(grad_out.data_ptr(), derivative.contiguous().data_ptr(), grad_x.data_ptr(),
                                          derivative.numel(), torch.get_num_threads())
    return grad_x
