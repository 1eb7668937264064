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
from vitlab.kernels import matmul as matmul_kernel
from vitlab.kernels import recording_graph
from vitlab.kernels import weight_gradient as weight_gradient_kernel
from vitlab.models.base import bf16_on_cpu, has_hooks, inactive_dropout, plain_linear
from vitlab.models.linear import kernel_applies, linear, run_linear


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


class KernelMLP(torch.autograd.Function):
    """GELU(x W1ᵀ + b1) W2ᵀ (+ b2) for bf16 CPU x and fp32 weights under bf16 autocast, in vitlab's kernels, the GELU
    inside the first product's pass: it writes GELU and its derivative instead of its own output. The same bits as
    `linear`, KernelGELU and `linear` one after the other (the weight and bias gradients in fp32 as there), with a
    pass over the hidden activations and two autograd nodes fewer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, first_weight: torch.Tensor, first_bias: torch.Tensor, last_weight: torch.Tensor,
                last_bias: torch.Tensor | None) -> torch.Tensor:
        first = matmul_kernel.pack_weight(first_weight.detach().to(torch.bfloat16), backward=ctx.needs_input_grad[0])
        last = matmul_kernel.pack_weight(last_weight.detach().to(torch.bfloat16), backward=True)
        hidden, derivative = matmul_kernel.matmul_gelu(x, first.forward, first_bias.detach())  # (..., hidden) bf16 each
        out = matmul_kernel.matmul(hidden, last.forward, None if last_bias is None else last_bias.detach().to(torch.bfloat16))
        ctx.save_for_backward(x, hidden, derivative, first.backward, last.backward)
        ctx.has_last_bias = last_bias is not None
        return out  # (..., width) bf16

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # backward(create_graph=True): the kernels' gradients have no derivative of their own
            raise RuntimeError("vitlab's MLP kernels cannot be differentiated twice (a backward with create_graph=True); "
                               "switch vitlab's C kernels off: --cpu_kernels false, or vitlab.kernels.switch_kernels(False)")
        x, hidden, derivative, first_pairs, last_pairs = ctx.saved_tensors
        needs_x, needs_first_weight, needs_first_bias, needs_last_weight, needs_last_bias = ctx.needs_input_grad
        grad_out = grad_out.to(torch.bfloat16)
        grad_last_weight = grad_last_bias = None
        if needs_last_weight:
            grad_last_weight, grad_last_bias = weight_gradient_kernel.weight_gradient(grad_out, hidden, ctx.has_last_bias and needs_last_bias)
        elif ctx.has_last_bias and needs_last_bias:
            grad_last_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0, dtype=torch.float32)
        grad_x = grad_first_weight = grad_first_bias = None
        if needs_x or needs_first_weight or needs_first_bias:
            grad_hidden, grad_first_bias = gelu_kernel.gelu_backward(matmul_kernel.matmul(grad_out, last_pairs), derivative, needs_first_bias)
            if needs_x:
                grad_x = matmul_kernel.matmul(grad_hidden, first_pairs)
            if needs_first_weight:
                grad_first_weight, _ = weight_gradient_kernel.weight_gradient(grad_hidden, x, False)
        return grad_x, grad_first_weight, grad_first_bias, grad_last_weight, grad_last_bias


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
                and not has_hooks(self) and plain_linear(linear) and gelu_kernel.adds_bias(linear.out_features, linear.bias))

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
        if self.runs_in_one_kernel(x):
            return self[4](KernelMLP.apply(x, self[0].weight, self[0].bias, self[3].weight, self[3].bias))
        return self[4](run_linear(self[3], self.hidden(x)))

    def runs_in_one_kernel(self, x: torch.Tensor) -> bool:
        """Whether both layers and the GELU between them go through KernelMLP: the GELU kernel takes the first layer's
        bias, the dropout between is inactive, the last layer is a plain nn.Linear, both layers run on the linear-layer
        kernels (see `linear.kernel_applies`) with fp32 weights and biases."""
        first, activation, dropout, last = self[0], self[1], self[2], self[3]
        return (isinstance(activation, GELU) and activation.takes_bias_of(first, x) and inactive_dropout(dropout) and plain_linear(last)
                and kernel_applies(x, first.weight) and matmul_kernel.kernel_supports(first.in_features, first.out_features)
                and matmul_kernel.kernel_supports(last.in_features, last.out_features)
                and weight_gradient_kernel.kernel_supports(last.in_features, last.out_features, last.bias is not None)
                and last.weight.dtype == torch.float32 and last.weight.device.type == "cpu"
                and (last.bias is None or (last.bias.dtype == torch.float32 and last.bias.device.type == "cpu")))

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
        if self.runs_in_one_kernel(x):
            return KernelMLP.apply(x, self[0].weight, self[0].bias, last.weight, None), last.bias
        return linear(self.hidden(x), last.weight), last.bias

    def last_bias_deferrable(self) -> bool:
        """Whether the output is just the last layer's matmul plus its bias: the last dropout inactive, no hooks on it,
        on the last layer (a plain nn.Linear) or on the MLP."""
        return plain_linear(self[3]) and inactive_dropout(self[4]) and not has_hooks(self)
