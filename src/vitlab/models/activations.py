"""GELU that keeps its derivative instead of its input, in one pass on the CPU in bf16.

PyTorch's GELU backward recomputes erf and the normal density from the saved input. `GELU` here (an nn.GELU) runs
vitlab's C kernel (kernels/gelu.c) on bf16 CPU activations, the MLP's under bf16 autocast: forward writes GELU(x) and
GELU'(x) from one exponential, backward is one multiply (docs/performance.md). Everywhere else (fp32 or GPU inputs,
the tanh approximation, a hook on the module, a graph being recorded, no compiler or no AVX-512) it is nn.GELU.
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.kernels import gelu as gelu_kernel
from vitlab.kernels import recording_graph
from vitlab.models.base import has_hooks


class KernelGELU(torch.autograd.Function):
    """GELU of bf16 x by vitlab's C kernel, the derivative saved for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out, derivative = gelu_kernel.gelu_forward(x)
        ctx.save_for_backward(derivative)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward through the kernel (nn.GELU has one)
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (derivative,) = ctx.saved_tensors
        return gelu_kernel.gelu_backward(grad_out, derivative)


class GELU(nn.GELU):
    """nn.GELU (exact form) whose bf16 CPU activations go through vitlab's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate == "none" and not recording_graph() and gelu_kernel.kernel_supports(x) and not has_hooks(self):
            return KernelGELU.apply(x)
        return super().forward(x)
