"""Training-mode BatchNorm, and the ReLU after it, in vitlab's C kernel (kernels/batch_norm.c) for the CNNs.

Under CPU bf16 autocast a CNN's BatchNorm runs in bf16 with fp32 statistics, in PyTorch's operators: three reads of
its input forward and a ReLU's read and write after it, and backward the ReLU's mask and BatchNorm's own two passes
over the gradient and the input (docs/performance.md, "BatchNorm in one kernel"). `run_batch_norm(norm, x, relu)`
computes norm(x), and relu of it where `relu` is given, in the kernel's three passes forward and two backward, where
it applies: a plain nn.BatchNorm2d (no hook, no forward replaced) in training mode with eps above 0 (else
the module refuses it), a plain nn.ReLU if any, bf16
channels-last CPU input of a multiple of 16 channels and more than one value per channel, fp32 CPU parameters, no
graph being recorded, vitlab's CPU kernels switched on. The running estimates and `num_batches_tracked` update as the
module updates them. Everywhere else the modules run themselves.

The values are PyTorch's formulas with sums added in another order (kernels/batch_norm.c). Under
backward(create_graph=True) the gradient is PyTorch's own BatchNorm (and ReLU) recomputed from the saved input, so it
can be differentiated again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.kernels import batch_norm as batch_norm_kernel
from vitlab.kernels import recording_graph
from vitlab.kernels.batch_norm import BatchStatistics
from vitlab.models.base import intercepted


class KernelBatchNorm(torch.autograd.Function):
    """norm's BatchNorm of x over its batch statistics (ReLU'd if with_relu) for bf16 channels-last CPU x, by the
    kernel; weight and bias are norm's parameters, passed on their own so that autograd sees them. norm's running
    estimates are updated here, inside the operation as the module's own, so that a checkpoint's recompute updates
    them again as it does the module's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, norm: nn.BatchNorm2d,
                with_relu: bool) -> torch.Tensor:
        y, statistics = batch_norm_kernel.batch_norm_forward(x, weight, bias, norm.eps, with_relu)
        if norm.track_running_stats and norm.running_mean is not None:
            update_running_estimates(norm, statistics, rows=x.numel() // x.shape[1])
        ctx.save_for_backward(x, weight, bias, *statistics)
        ctx.eps, ctx.with_relu = norm.eps, with_relu
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, *statistics = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: PyTorch's operators, which can be differentiated again
            return (*recomputed_gradients(ctx, grad_out, x, weight, bias), None, None)
        grad_x, grad_weight, grad_bias = batch_norm_kernel.batch_norm_backward(
            grad_out, x, BatchStatistics(*statistics), weight, bias, ctx.with_relu, input_gradient=needs_x)
        return grad_x, grad_weight if needs_weight else None, grad_bias if needs_bias else None, None, None


def recomputed_gradients(ctx, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                         bias: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The gradients of x, weight and bias (None where not needed) through PyTorch's BatchNorm and ReLU, recomputed
    from x with a graph of their own."""
    wanted = [(index, tensor) for index, tensor in enumerate((x, weight, bias)) if ctx.needs_input_grad[index]]
    with torch.enable_grad():
        y = F.batch_norm(x, None, None, weight, bias, True, 0.0, ctx.eps)
        if ctx.with_relu:
            y = F.relu(y)
    found = torch.autograd.grad(y, [tensor for _, tensor in wanted], grad_out, create_graph=True, allow_unused=True)
    gradients: list[torch.Tensor | None] = [None, None, None]
    for (index, _), gradient in zip(wanted, found, strict=True):
        gradients[index] = gradient
    return tuple(gradients)


def plain_relu(module: nn.Module | None) -> bool:
    """Whether `module` is an nn.ReLU that runs nothing but its class's forward."""
    return type(module) is nn.ReLU and not intercepted(module)


def kernel_applies(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether `run_batch_norm` computes norm(x) in the kernel (see the module doc)."""
    return (type(norm) is nn.BatchNorm2d and not intercepted(norm) and norm.training and norm.eps > 0
            and not recording_graph() and batch_norm_kernel.kernel_supports(x, norm.weight, norm.bias))


def run_batch_norm(norm: nn.Module, x: torch.Tensor, relu: nn.Module | None = None) -> torch.Tensor:
    """relu(norm(x)) (norm(x) without `relu`), in the kernel where it applies (see the module doc)."""
    if not kernel_applies(norm, x) or not (relu is None or plain_relu(relu)):
        y = norm(x)
        return y if relu is None else relu(y)
    return KernelBatchNorm.apply(x, norm.weight, norm.bias, norm, relu is not None)


@torch.no_grad()
def update_running_estimates(norm: nn.BatchNorm2d, statistics: BatchStatistics, rows: int) -> None:
    """What nn.BatchNorm2d's training forward does to its buffers: count the batch (where it has a count), and move the
    running mean and the running (unbiased) variance towards the batch's by the momentum (None: a cumulative average
    over the counted batches; without a count, not at all)."""
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
    norm.running_mean.copy_(statistics.mean * factor + norm.running_mean * (1.0 - factor))
    norm.running_var.copy_(statistics.variance * (rows / (rows - 1)) * factor + norm.running_var * (1.0 - factor))
