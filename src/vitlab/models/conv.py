"""Convolutions whose weight gradient is one matmul over the unfolded input, for small images on CPUs with AMX.

Under CPU bf16 autocast a convolution's weight gradient is oneDNN's (`brgconv_bwd_w` on the AMX tiles). On feature maps
of 4×4 pixels and fewer, the BN CNN's last stage and cnn-fast's last convolution, that primitive ran several times
slower than the convolution's own forward pass, while the same sums written as one matmul, the output gradient's
transpose times the input's patches laid out as rows (im2col), ran near oneDNN's matmul rate (docs/performance.md,
"Convolution weight gradients as one matmul on the AMX machine"). `run_conv(layer, x)` runs such a layer through
`UnfoldedWeightGradientConv2d`: the forward and the input gradient are still oneDNN's convolution, bit for bit as
autocast computes them; only the weight gradient (and a bias's, summed in fp32) comes from the matmul, with the same
bf16 rounding of its fp32 sums, added in another order.

It applies to a plain nn.Conv2d (no replaced forward, no hook) with stride 1, dilation 1, one group and zero padding
that keeps the kernel centred, on CPU input under bf16 autocast with gradients on, no graph being recorded, an output of
at most MAX_OUTPUT_PIXELS pixels, on a CPU with AMX, and with vitlab's CPU kernels switched on (`--cpu_kernels`,
`VITLAB_C_KERNELS`). Everywhere else the layer runs itself. The CPUs without AMX were not measured, so they keep oneDNN's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.kernels import recording_graph
from vitlab.kernels.build import compiled_library, library_capabilities
from vitlab.models.base import cpu_autocast_dtype, has_hooks

# Feature maps of at most this many output pixels (4×4) take the unfolded weight gradient; at 8×8 it was as often
# slower as faster than oneDNN's, and larger maps ran slower.
MAX_OUTPUT_PIXELS = 16


class UnfoldedWeightGradientConv2d(torch.autograd.Function):
    """conv2d(x, weight, bias, padding) in bf16 for CPU x and fp32 weights (as autocast runs it), stride 1; backward:
    the input gradient by oneDNN, the weight gradient by `unfolded_weight_gradient`, the bias gradient as fp32 sums.

    Backward is written in differentiable operators on the saved inputs, so a backward with create_graph=True
    (a gradient penalty) can be differentiated again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.padding = padding
        return bf16_conv(x, weight, bias, padding)  # (B, O, H', W') bf16

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        x_bf16, weight_bf16 = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        grad_out = grad_out.to(torch.bfloat16)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # (B, C, H, W) in x's dtype, as autocast's cast passes it back
            grad_x = torch.ops.aten.convolution_backward(grad_out, x_bf16, weight_bf16, None, [1, 1], list(ctx.padding),
                                                         [1, 1], False, [0, 0], 1, [True, False, False])[0].to(x.dtype)
        if ctx.needs_input_grad[1]:  # (O, C, kh, kw) fp32
            grad_weight = unfolded_weight_gradient(grad_out, x_bf16, tuple(weight.shape[2:]), ctx.padding).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=(0, 2, 3), dtype=torch.float32).to(bias.dtype)  # (O,)
        return grad_x, grad_weight, grad_bias, None


def bf16_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int]) -> torch.Tensor:
    """F.conv2d with every operand cast to bf16 first: what CPU bf16 autocast runs for a convolution."""
    bias_bf16 = None if bias is None else bias.to(torch.bfloat16)
    return F.conv2d(x.to(torch.bfloat16), weight.to(torch.bfloat16), bias_bf16, padding=padding)


def unfolded_weight_gradient(grad_out: torch.Tensor, x: torch.Tensor, kernel_size: tuple[int, int],
                             padding: tuple[int, int]) -> torch.Tensor:
    """The weight gradient (O, C, kh, kw) of a stride-1 convolution of x (B, C, H, W) with zero padding, from its
    output gradient (B, O, H', W'): Σ over images and output pixels of grad_out times the input patch under the
    kernel, as one matmul (O × B·H'·W') @ (B·H'·W' × kh·kw·C) in grad_out's dtype. Any memory layout; channels-last
    operands are read without a copy of grad_out."""
    kernel_height, kernel_width = kernel_size
    pad_height, pad_width = padding
    batch, out_channels, out_height, out_width = grad_out.shape
    in_channels = x.shape[1]
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, pad_width, pad_width, pad_height, pad_height))  # (B, H+2p, W+2p, C)
    image, row, column, channel = padded.stride()
    patches = padded.as_strided((batch, out_height, out_width, kernel_height, kernel_width, in_channels),
                                (image, row, column, row, column, channel))  # (B, H', W', kh, kw, C): a view
    patches = patches.reshape(batch * out_height * out_width, kernel_height * kernel_width * in_channels)  # the copy
    grads = grad_out.permute(0, 2, 3, 1).reshape(batch * out_height * out_width, out_channels)  # (B·H'·W', O)
    sums = grads.t() @ patches  # (O, kh·kw·C)
    return sums.view(out_channels, kernel_height, kernel_width, in_channels).permute(0, 3, 1, 2)  # (O, C, kh, kw)


def centred_padding(layer: nn.Conv2d) -> tuple[int, int] | None:
    """The layer's zero padding as (rows, columns), or None where it is not zero padding or, for padding="same", the
    kernel has an even side (PyTorch then pads one side more)."""
    if layer.padding_mode != "zeros":
        return None
    if layer.padding == "same":
        if any(side % 2 == 0 for side in layer.kernel_size):
            return None
        return layer.kernel_size[0] // 2, layer.kernel_size[1] // 2
    if isinstance(layer.padding, str):  # "valid"
        return 0, 0
    return int(layer.padding[0]), int(layer.padding[1])


def output_pixels(x: torch.Tensor, layer: nn.Conv2d, padding: tuple[int, int]) -> int:
    """Pixels of one output feature map of a stride-1 convolution of x (B, C, H, W)."""
    height = x.shape[2] + 2 * padding[0] - layer.kernel_size[0] + 1
    width = x.shape[3] + 2 * padding[1] - layer.kernel_size[1] + 1
    return max(height, 0) * max(width, 0)


def unfolding_pays(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `run_conv` sends layer(x) through UnfoldedWeightGradientConv2d (see the module doc)."""
    if type(layer) is not nn.Conv2d or has_hooks(layer) or recording_graph() or not torch.is_grad_enabled():
        return False
    weight, bias = layer.weight, layer.bias
    padding = centred_padding(layer)
    if (padding is None or layer.groups != 1 or tuple(layer.stride) != (1, 1) or tuple(layer.dilation) != (1, 1)
            or not weight.requires_grad or weight.dtype != torch.float32 or weight.device.type != "cpu"
            or (bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"))):
        return False
    if (cpu_autocast_dtype() != torch.bfloat16 or type(x) is not torch.Tensor or x.device.type != "cpu" or x.dim() != 4
            or x.dtype not in (torch.bfloat16, torch.float32) or x.shape[0] == 0 or x.shape[1] != weight.shape[1]):
        return False
    if not 0 < output_pixels(x, layer, padding) <= MAX_OUTPUT_PIXELS:
        return False
    library = compiled_library()
    return library is not None and library_capabilities(library).conv_weight_gradient_by_matmul


def run_conv(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x), with the weight gradient as one matmul where `unfolding_pays`."""
    if unfolding_pays(layer, x):
        return UnfoldedWeightGradientConv2d.apply(x, layer.weight, layer.bias, centred_padding(layer))
    return layer(x)
