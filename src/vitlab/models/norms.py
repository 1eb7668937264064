"""LayerNorm for a norm whose output only feeds a linear layer, in one pass on the CPU under bf16 autocast.

A pre-norm transformer block normalises its fp32 residual stream twice, and each output only feeds a linear layer
(attention's QKV projection, the MLP's first layer). Under bf16 autocast on the CPU PyTorch normalises in fp32,
writes an fp32 output, and the linear layer casts that to bf16; backward casts the bf16 gradient back to fp32 before
the norm's own backward. `MatmulInputNorm` writes the bf16 output straight from vitlab's C kernel
(kernels/layer_norm.c) and takes the bf16 gradient as it comes: the same rounding, two passes fewer each way
(docs/performance.md). Everywhere else (no autocast, fp32 or GPU inputs, a hook on the module such as a CAM's, a
graph being recorded, no compiler or no AVX-512) it is nn.LayerNorm, with the same parameters and state.
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.kernels import layer_norm as layer_norm_kernel
from vitlab.kernels import recording_graph
from vitlab.models.base import has_hooks


def cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype CPU autocast casts matmul inputs to right now, or None when it is off."""
    try:
        enabled, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    except TypeError:  # torch < 2.4
        enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return dtype if enabled else None


class KernelLayerNorm(torch.autograd.Function):
    """LayerNorm over the last axis of fp32 x into bf16, by vitlab's C kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        normalised, mean, rstd = layer_norm_kernel.layer_norm_forward(x, weight, bias, eps)  # (..., D) bf16, (N,), (N,)
        ctx.save_for_backward(x, weight, mean, rstd)
        return normalised

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward through the kernel (nn.LayerNorm has one)
    def backward(ctx, grad_normalised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = layer_norm_kernel.layer_norm_backward(grad_normalised, x, weight, mean, rstd)
        return grad_x, grad_weight, grad_bias, None  # fp32, as the weight (shape_supported)


class MatmulInputNorm(nn.LayerNorm):
    """nn.LayerNorm whose output only feeds a linear layer: bf16 from vitlab's kernel under CPU bf16 autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (len(self.normalized_shape) == 1 and cpu_autocast_dtype() == torch.bfloat16 and not recording_graph()
                and layer_norm_kernel.kernel_supports(x, self.weight, self.bias) and not has_hooks(self)):
            return KernelLayerNorm.apply(x, self.weight, self.bias, self.eps)  # (..., D) bf16
        return super().forward(x)
