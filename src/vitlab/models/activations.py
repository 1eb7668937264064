"""GELU that keeps its derivative instead of its input, in one pass on the CPU in bf16; and the ViT's MLP, which
hands its first layer's bias to that pass.

PyTorch's GELU backward recomputes erf and the normal density from the saved input. `GELU` here (an nn.GELU) runs
vitlab's C kernel (kernels/gelu.c) on bf16 CPU activations, the MLP's under bf16 autocast: forward writes GELU(x) and
GELU'(x) from one exponential, backward is one multiply (docs/performance.md). Everywhere else (fp32 or GPU inputs,
the tanh approximation, a hook on the module, a graph being recorded, no compiler or no AVX-512) it is nn.GELU.

`MLP` (an nn.Sequential: linear, activation, dropout, linear, dropout, with the same parameter names) runs its first
layer without the bias and lets the GELU kernel add it: PyTorch's addmm copies the bias into its whole output before
the matmul, and backward sums the gradient for the bias in a pass of its own; the kernel does both in passes it makes
anyway.
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.kernels import gelu as gelu_kernel
from vitlab.kernels import recording_graph
from vitlab.models.base import bf16_on_cpu, has_hooks, inactive_dropout, intercepted, plain_linear
from vitlab.models.linear import linear, run_linear


class KernelGELU(torch.autograd.Function):
    """GELU of bf16 x (+ an fp32 bias per last-axis feature) by vitlab's C kernel, the derivative saved for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out, derivative = gelu_kernel.gelu_forward(x, bias)
        ctx.save_for_backward(derivative)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward through the kernel (nn.GELU has one)
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        (derivative,) = ctx.saved_tensors
        return gelu_kernel.gelu_backward(grad_out, derivative, bias_gradient=ctx.has_bias and ctx.needs_input_grad[1])


class GELU(nn.GELU):
    """nn.GELU (exact form) whose bf16 CPU activations go through vitlab's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_applies(x):
            return KernelGELU.apply(x)
        return super().forward(x)

    def takes_bias_of(self, linear: nn.Linear, x: torch.Tensor) -> bool:
        """Whether the kernel will add the bias of `linear` (whose output from x it activates): exact GELU, bf16 CPU
        output, no hook on either module, no graph being recorded, a width and bias the kernel takes."""
        return (self.approximate == "none" and type(self).forward is GELU.forward and bf16_on_cpu(x) and not recording_graph()
                and not intercepted(self) and plain_linear(linear) and gelu_kernel.adds_bias(linear.out_features, linear.bias))

    def kernel_applies(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
        """Whether x (+ bias) goes through the kernel: exact GELU, no hook, no graph being recorded, a shape it takes."""
        return (self.approximate == "none" and not recording_graph() and not has_hooks(self)
                and gelu_kernel.kernel_supports(x, bias))


class MLP(nn.Sequential):
    """linear → activation → dropout → linear → dropout; with vitlab's GELU kernel, the first linear layer's bias is
    added by the kernel (see the module doc). Without it (or with a hook on the first layer) as nn.Sequential."""

    def __init__(self, width: int, hidden: int, activation: nn.Module, dropout: nn.Module, output_dropout: nn.Module) -> None:
        super().__init__(nn.Linear(width, hidden), activation, dropout, nn.Linear(hidden, width), output_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[4](run_linear(self[3], self.hidden(x)))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The activations after the first layer, the activation and the dropout (..., hidden)."""
        first, activation, dropout = self[0], self[1], self[2]
        if isinstance(activation, GELU) and activation.takes_bias_of(first, x):
            hidden = linear(x, first.weight)  # (..., hidden) bf16, without the bias
            if gelu_kernel.kernel_supports(hidden, first.bias):  # the module's conditions were checked just above
                return dropout(KernelGELU.apply(hidden, first.bias))
            return dropout(activation(hidden + first.bias.to(hidden.dtype)))  # not expected: the bias as addmm has it
        return dropout(activation(run_linear(first, x)))

    def without_last_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the output without the last layer's bias, that bias), for whoever adds both to the residual stream (only where
        `last_bias_deferrable`)."""
        last = self[3]
        return linear(self.hidden(x), last.weight), last.bias

    def last_bias_deferrable(self) -> bool:
        """Whether the output is just the last layer's matmul plus its bias: the last dropout inactive, no hooks on it,
        on the last layer (a plain nn.Linear) or on the MLP."""
        return plain_linear(self[3]) and inactive_dropout(self[4]) and not intercepted(self)
