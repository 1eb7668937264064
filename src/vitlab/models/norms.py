"""LayerNorm for a norm whose output only feeds a linear layer, in one pass on the CPU under bf16 autocast.

A pre-norm transformer block normalises its fp32 residual stream twice, and each output only feeds a linear layer
(attention's QKV projection, the MLP's first layer). Under bf16 autocast on the CPU PyTorch normalises in fp32,
writes an fp32 output, and the linear layer casts that to bf16; backward casts the bf16 gradient back to fp32 before
the norm's own backward. `MatmulInputNorm` writes the bf16 output straight from vitlab's C kernel
(kernels/layer_norm.c) and takes the bf16 gradient as it comes: the same rounding, two passes fewer each way
(docs/performance.md). Everywhere else (no autocast, fp32 or GPU inputs, a hook on the module such as a CAM's, a
graph being recorded, no compiler or no AVX-512) it is nn.LayerNorm, with the same parameters and state.

`MatmulInputNorm.after_residual` also does the residual add before the norm (the pre-norm block's
x + proj(attention), normalised for the MLP): the kernel adds the projection's bf16 output without its bias and the
bias to the fp32 stream, writes the new stream and its norm in one pass, and in backward adds the stream's own
gradient and writes the sum for the projection (in bf16) and its column sums for the projection's bias.
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.kernels import layer_norm as layer_norm_kernel
from vitlab.kernels import recording_graph
from vitlab.models.base import cpu_autocast_dtype, intercepted


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
        grad_x, grad_weight, grad_bias = layer_norm_kernel.layer_norm_backward(grad_normalised, x, weight, mean, rstd,
                                                                               input_gradient=ctx.needs_input_grad[0])
        return grad_x, grad_weight, grad_bias, None  # fp32, as the weight (shape_supported); grad_x None for x without one


class KernelResidualNorm(torch.autograd.Function):
    """total = x + addend (+ addend_bias) in fp32 and its LayerNorm into bf16, by vitlab's C kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, addend: torch.Tensor, addend_bias: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        total, normalised, mean, rstd = layer_norm_kernel.residual_layer_norm_forward(x, addend, addend_bias, weight, bias, eps)
        ctx.save_for_backward(total, weight, mean, rstd)
        ctx.has_addend_bias = addend_bias is not None
        return total, normalised  # (..., D) fp32, (..., D) bf16

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: torch.Tensor | None, grad_normalised: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        total, weight, mean, rstd = ctx.saved_tensors
        if grad_normalised is None:  # the norm's output did not reach the loss
            grad_normalised = torch.zeros(total.shape, dtype=torch.bfloat16)
        grad_x, grad_addend, grad_weight, grad_bias, grad_addend_bias = layer_norm_kernel.residual_layer_norm_backward(
            grad_normalised, total, weight, mean, rstd, grad_total, ctx.has_addend_bias and ctx.needs_input_grad[2])
        return grad_x, grad_addend, grad_addend_bias, grad_weight, grad_bias, None


class MatmulInputNorm(nn.LayerNorm):
    """nn.LayerNorm whose output only feeds a linear layer: bf16 from vitlab's kernel under CPU bf16 autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_applies() and layer_norm_kernel.kernel_supports(x, self.weight, self.bias):
            return KernelLayerNorm.apply(x, self.weight, self.bias, self.eps)  # (..., D) bf16
        return super().forward(x)

    def after_residual(self, x: torch.Tensor, addend: torch.Tensor,
                       addend_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(total, norm(total)) for total = x + addend (+ addend_bias): in one kernel pass where `forward` would use the
        kernel (x fp32, addend bf16 of x's shape), else as separate PyTorch operations (the bias in addend's dtype, as
        autocast's linear layer adds it)."""
        if (self.kernel_applies() and x.dim() >= 1
                and layer_norm_kernel.residual_kernel_supports(x, addend, addend_bias, self.weight, self.bias)):
            return KernelResidualNorm.apply(x, addend, addend_bias, self.weight, self.bias, self.eps)
        total = x + (addend if addend_bias is None else addend + addend_bias.to(addend.dtype))
        return total, self(total)

    def residual_kernel_applies(self, x: torch.Tensor) -> bool:
        """Whether `after_residual(x, addend, bias)` will run the kernel for a bf16 addend of x's shape (checked before
        the addend exists, so that its linear layer knows whether to leave its bias out)."""
        return self.kernel_applies() and layer_norm_kernel.kernel_supports(x, self.weight, self.bias)

    def kernel_applies(self) -> bool:
        """Whether this norm may run the kernel now: one normalised axis, CPU bf16 autocast on, no graph being
        recorded, no hook on the module, no subclass's forward in place of this one (the kernel checks the tensors)."""
        return (len(self.normalized_shape) == 1 and cpu_autocast_dtype() == torch.bfloat16 and not recording_graph()
                and not intercepted(self) and type(self).forward is MatmulInputNorm.forward)
