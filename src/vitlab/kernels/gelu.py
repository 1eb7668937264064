"""ctypes bindings of gelu.c: GELU of bf16 activations that also writes its derivative for backward, optionally with
the preceding linear layer's bias added first."""

from __future__ import annotations

import torch

from vitlab.kernels.build import compiled_library, fp32_cpu_vector, library_capabilities, loaded_library


def shape_supported(x: torch.Tensor, library, bias: torch.Tensor | None = None) -> bool:
    """Whether the library's GELU kernel can take x: a non-empty bf16 CPU tensor, and a CPU and compiler with AVX-512;
    with a bias, an fp32 CPU vector of x's last dimension, a multiple of 16."""
    if library is None or x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.numel() == 0 or not library_capabilities(library).gelu:
        return False
    return bias is None or (x.dim() >= 1 and bias_fits(x.shape[-1], bias))


def bias_fits(features: int, bias: torch.Tensor | None) -> bool:
    """Whether the kernel can add `bias` to rows of `features`: an fp32 CPU vector of them, a multiple of 16."""
    return features % 16 == 0 and fp32_cpu_vector(bias, features)


def kernel_supports(x: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `gelu_forward` will take x (and bias; see shape_supported) with the kernels switched on."""
    return shape_supported(x, compiled_library(), bias)


def adds_bias(features: int, bias: torch.Tensor | None) -> bool:
    """Whether, with the kernels switched on, the kernel will add `bias` to bf16 CPU activations of `features` per row
    (checked before the activations exist, so that a linear layer knows whether to leave its bias out)."""
    library = compiled_library()
    return library is not None and library_capabilities(library).gelu and bias_fits(features, bias)


def gelu_forward(x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU (the exact, erf form) of bf16 x (+ bias, per last-axis feature, in fp32) → (GELU, GELU'), both bf16 of x's
    shape."""
    if not shape_supported(x, loaded_library(), bias):
        bias_text = "" if bias is None else f" with a {bias.dtype} bias of shape {tuple(bias.shape)}"
        raise ValueError(f"the GELU kernel cannot take a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}{bias_text}")
    x = x.contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    out, derivative = torch.empty_like(x), torch.empty_like(x)
    loaded_library().vitlab_gelu_forward(x.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
                                         derivative.data_ptr(), x.numel(), x.shape[-1] if x.dim() else 1,
                                         torch.get_num_threads())
    return out, derivative


def gelu_backward(grad_out: torch.Tensor, derivative: torch.Tensor,
                  bias_gradient: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_out · derivative in bf16 (grad_out is cast to bf16 if it is not), and with `bias_gradient` its sums over
    every axis but the last in fp32, else None)."""
    grad_out = grad_out.to(torch.device("cpu"), torch.bfloat16).contiguous()
    if grad_out.shape != derivative.shape:
        raise ValueError(f"grad_out must have the derivative's shape {tuple(derivative.shape)}, got {tuple(grad_out.shape)}")
    grad_x = torch.empty_like(derivative)
    columns = derivative.shape[-1] if derivative.dim() else 1
    grad_bias = torch.empty(columns) if bias_gradient else None
    failed = loaded_library().vitlab_gelu_backward(grad_out.data_ptr(), derivative.contiguous().data_ptr(), grad_x.data_ptr(),
                                                   None if grad_bias is None else grad_bias.data_ptr(), derivative.numel(),
                                                   columns, torch.get_num_threads())
    if failed:
        raise MemoryError("the GELU kernel could not allocate its per-thread sums")
    return grad_x, grad_bias
