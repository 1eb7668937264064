"""ReLU followed by a 2×2 max-pool in one pass (vitlab's C kernel, kernels/pool.c), for the CNNs' feature stacks; and
the max-pool alone.

`run_layers(layers, x)` runs an nn.Sequential as it would run itself, except that a ReLU directly followed by a
2×2, stride-2 max-pool goes through the kernel where it applies: bf16 or fp32 channels-last CPU activations (the
CNNs' under CPU bf16 autocast or in fp32), plain modules with no hook on either (a hook sees what the modules
compute, so Grad-CAM and feature figures run them as they are), no graph being recorded or transformed. The same
values as the two modules; where the kernel does not apply, the modules themselves. A fused `nn.ReLU(inplace=True)`
leaves its input as it was (the CNNs' ReLUs follow a convolution or a BatchNorm, whose outputs nothing else reads).
`run_pool(pool, x)` runs a lone 2×2 max-pool (aircnn's, after a convolution) through the same kernel without its ReLU,
under the same conditions, with the same values and gradients as the module (a NaN maximum in bf16 keeps its input's
NaN bits, where PyTorch's channels-last bf16 pool writes its own NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.kernels import pool as pool_kernel
from vitlab.kernels import recording_graph
from vitlab.models.base import intercepted
from vitlab.models.batch_norm import kernel_applies as batch_norm_kernel_applies
from vitlab.models.batch_norm import plain_relu, run_batch_norm
from vitlab.models.conv import run_conv


class KernelReLUMaxPool(torch.autograd.Function):
    """max_pool2d(relu(x), 2) for bf16 or fp32 channels-last CPU x, the winners' positions saved for backward.

    Backward is the kernel's; under `create_graph=True` (a gradient penalty, say) it is the same routing written in
    PyTorch operators, so that it can be differentiated again with respect to the output gradient (not to x: the
    routing keeps no link to x, whose second derivative here is 0; asking for it raises where PyTorch gives zeros)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return pool_keeping_positions(ctx, x, torch.ops.vitlab.relu_max_pool2d)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (position,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return routed_gradient(grad_out, position, *ctx.size)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)  # the flatten after a last pool hands NCHW
        return torch.ops.vitlab.relu_max_pool2d_backward(grad_out, position, *ctx.size)


class KernelMaxPool(KernelReLUMaxPool):
    """max_pool2d(x, 2) for bf16 or fp32 channels-last CPU x, by the same kernel without its ReLU; backward as
    KernelReLUMaxPool's (every position names a winner)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return pool_keeping_positions(ctx, x, torch.ops.vitlab.max_pool2d)


def pool_keeping_positions(ctx, x: torch.Tensor, operator) -> torch.Tensor:
    """The pooled x from one of the kernel's forward operators, its winning positions and x's size kept in ctx."""
    out, position = operator(x)  # (B, C, H/2, W/2) in x's dtype and uint8, channels-last
    ctx.save_for_backward(position)
    ctx.size = x.shape[2:]
    return out


def routed_gradient(grad_out: torch.Tensor, position: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The kernel's backward in differentiable PyTorch operators: each output's gradient to the window position that
    won (0 where ReLU stopped it), (B, C, height, width) channels-last."""
    batch, channels, out_height, out_width = grad_out.shape
    places = position.unsqueeze(-1) == torch.arange(4, dtype=position.dtype)  # (B, C, H/2, W/2, 4): NO_GRADIENT matches none
    routed = torch.where(places, grad_out.unsqueeze(-1), torch.zeros((), dtype=grad_out.dtype))  # (B, C, H/2, W/2, 4)
    windows = routed.reshape(batch, channels, out_height, out_width, 2, 2).permute(0, 1, 2, 4, 3, 5)  # (B, C, H/2, 2, W/2, 2)
    grad_x = windows.reshape(batch, channels, 2 * out_height, 2 * out_width)
    grad_x = F.pad(grad_x, (0, width - 2 * out_width, 0, height - 2 * out_height))  # an odd last row or column: no window
    return (grad_x + 0.0).contiguous(memory_format=torch.channels_last)  # + 0: a gradient of -0 lands as +0, as PyTorch's


def fusable_pool(module: nn.Module) -> bool:
    """Whether `module` is a plain nn.MaxPool2d of a 2×2 window and stride 2, no padding, dilation or ceil mode, that
    returns no indices, with no hook."""
    if type(module) is not nn.MaxPool2d or intercepted(module):
        return False
    stride = module.kernel_size if module.stride is None or module.stride in ([], ()) else module.stride  # 0 stays 0
    return (as_pair(module.kernel_size) == (2, 2) and as_pair(stride) == (2, 2)
            and as_pair(module.padding) == (0, 0) and as_pair(module.dilation) == (1, 1) and not module.ceil_mode
            and not module.return_indices)


def as_pair(setting: int | tuple[int, ...]) -> tuple[int, ...]:
    """A pooling setting as (height, width): an int stands for both."""
    return tuple(setting) if isinstance(setting, (tuple, list)) else (setting, setting)


def kernel_applies(relu: nn.Module, pool: nn.Module, x: torch.Tensor) -> bool:
    """Whether pool(relu(x)) goes through the kernel (see the module doc)."""
    return (type(relu) is nn.ReLU and not intercepted(relu) and fusable_pool(pool) and not recording_graph()
            and pool_kernel.kernel_supports(x))


def run_pool(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """pool(x), through the kernel (without a ReLU) where pool is a plain 2×2 max-pool (see `fusable_pool`) and the
    kernel takes x (channels-last bf16 or fp32 on the CPU, no graph being recorded)."""
    if fusable_pool(pool) and not recording_graph() and pool_kernel.kernel_supports(x):
        return KernelMaxPool.apply(x)
    return pool(x)


def run_layers(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """layers(x), with each BatchNorm (and a ReLU right after it) through `run_batch_norm`'s kernel where it applies,
    each ReLU that a 2×2 max-pool follows fused with it where the pool kernel applies, each other max-pool through
    `run_pool`, and each convolution through `run_conv` (as matmuls where that pays)."""
    if intercepted(layers):
        return layers(x)
    modules = list(layers)
    index = 0
    while index < len(modules):
        module, following = modules[index], modules[index + 1] if index + 1 < len(modules) else None
        if batch_norm_kernel_applies(module, x):
            relu = following if plain_relu(following) else None
            x = run_batch_norm(module, x, relu)
            index += 1 if relu is None else 2
        elif following is not None and kernel_applies(module, following, x):
            x = KernelReLUMaxPool.apply(x)
            index += 2
        else:
            x = run_pool(module, x) if type(module) is nn.MaxPool2d else run_conv(module, x)
            index += 1
    return x
