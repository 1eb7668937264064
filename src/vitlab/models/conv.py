"""Convolutions on small feature maps as matmuls over the unfolded input, on CPUs with AMX.

Under CPU bf16 autocast a convolution is oneDNN's (`brg_conv_fwd` and `brgconv_bwd_w` on the AMX tiles). On feature
maps of 4×4 pixels and fewer, the BN CNN's last stage and cnn-fast's last convolution, its weight gradient ran several
times slower than the convolution's own forward pass, and the forward itself slower than the same sums written as one
matmul of the input's patches laid out as rows (im2col) with the filters (docs/performance.md, "Small convolutions as
matmuls on the AMX machine"); so did the input gradient, as the convolution of the output gradient with the turned
filters. `run_conv(layer, x)` runs such a layer through `UnfoldedConv2d`: the forward, the input gradient and the weight
gradient are each one matmul over patches (the input's unfolded once, in forward), each output the bf16 rounding of
fp32 sums as autocast's, added in another order; a bias's gradient is summed in fp32.

It applies to a plain nn.Conv2d (no forward replaced, on the class or the instance; no hook) with stride 1, dilation 1, one group and zero padding of
at most the kernel's side - 1 (with padding="same", an odd kernel), on CPU input under bf16 autocast, no graph being
recorded, an output of at most MAX_OUTPUT_PIXELS pixels, on a CPU with AMX, and with vitlab's CPU kernels switched on (`--cpu_kernels`,
`VITLAB_C_KERNELS`). Everywhere else the layer runs itself. The CPUs without AMX were not measured, so they keep oneDNN's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.kernels import recording_graph
from vitlab.kernels.build import compiled_library, library_capabilities
from vitlab.models.base import cpu_autocast_dtype, intercepted

# Feature maps of at most this many output pixels (4×4) are unfolded; at 8×8 the forward and the input gradient ran
# slower as matmuls and the weight gradient as often slower as faster.
MAX_OUTPUT_PIXELS = 16


class UnfoldedConv2d(torch.autograd.Function):
    """conv2d(x, weight, bias, padding) for bf16 CPU x and fp32 weights, stride 1, as CPU bf16 autocast computes it
    (every operand rounded to bf16, fp32 sums rounded to bf16, the output in the memory layout oneDNN picks), but as
    matmuls: the forward and the weight gradient over x's patches (`unfolded_patches`, kept from forward for backward),
    the input gradient over the output gradient's (`unfolded_input_gradient`); the bias gradient as fp32 sums.

    Under backward(create_graph=True) (a gradient penalty) the patches are unfolded again from the saved input, in
    differentiable operators, so the result can be differentiated again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int]) -> torch.Tensor:
        batch, _, height, width = x.shape
        out_channels, in_channels, kernel_height, kernel_width = weight.shape
        out_height, out_width = height + 2 * padding[0] - kernel_height + 1, width + 2 * padding[1] - kernel_width + 1
        patches = unfolded_patches(x, (kernel_height, kernel_width), padding)  # (B·H'·W', kh·kw·C)
        filters = weight.to(torch.bfloat16).permute(0, 2, 3, 1).reshape(out_channels, -1)  # (O, kh·kw·C)
        if bias is None:
            out = patches @ filters.t()  # (B·H'·W', O)
        else:
            out = torch.addmm(bias.to(torch.bfloat16), patches, filters.t())
        ctx.save_for_backward(x, weight, bias, patches if ctx.needs_input_grad[1] else None)
        ctx.padding = padding
        out = out.view(batch, out_height, out_width, out_channels).permute(0, 3, 1, 2)  # (B, O, H', W') channels-last
        return out.contiguous(memory_format=convolution_layout(x, weight))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, patches = ctx.saved_tensors
        weight_bf16 = weight.to(torch.bfloat16)
        grad_out = grad_out.to(torch.bfloat16)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # (B, C, H, W) bf16
            grad_x = unfolded_input_gradient(grad_out, weight_bf16, ctx.padding)
            grad_x = grad_x.contiguous(memory_format=convolution_layout(x, weight))
        if ctx.needs_input_grad[1]:  # (O, C, kh, kw) fp32, in the convolution's layout as oneDNN's
            if torch.is_grad_enabled():  # create_graph: patches with a history
                patches = unfolded_patches(x, tuple(weight.shape[2:]), ctx.padding)
            grad_weight = patch_weight_gradient(grad_out, patches, tuple(weight.shape[2:])).to(weight.dtype)
            grad_weight = grad_weight.contiguous(memory_format=convolution_layout(x, weight))
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=(0, 2, 3), dtype=torch.float32).to(bias.dtype)  # (O,)
        return grad_x, grad_weight, grad_bias, None


def convolution_layout(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The memory layout of a CPU convolution's output and input gradient, as oneDNN's picks it: channels-last when
    the input or the weight is laid out so."""
    return torch.channels_last if channels_last_strides(x) or channels_last_strides(weight) else torch.contiguous_format


def channels_last_strides(tensor: torch.Tensor) -> bool:
    """Whether a 4-D tensor's strides order its dimensions as channels-last memory does (channels fastest, then width,
    height, batch), as PyTorch's own test for the layout a convolution suggests; a (B, 1, H, W) tensor, whose order is
    ambiguous, counts as not."""
    sizes, strides = tensor.shape, tensor.stride()
    if strides[1] == 0:
        return False
    smallest = 0
    for dim in (1, 3, 2, 0):
        if sizes[dim] == 0 or strides[dim] < smallest or (dim == 0 and smallest == strides[1]):
            return False
        smallest = strides[dim] * (sizes[dim] if sizes[dim] > 1 else 1)
    return True


def unfolded_patches(x: torch.Tensor, kernel_size: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """x (B, C, H, W) in any memory layout → (B·H'·W', kh·kw·C): for each output pixel of a stride-1 convolution with
    zero padding, the input patch under the kernel as one row (im2col), rows in (image, row, column) order."""
    kernel_height, kernel_width = kernel_size
    pad_height, pad_width = padding
    batch, in_channels, height, width = x.shape
    out_height, out_width = height + 2 * pad_height - kernel_height + 1, width + 2 * pad_width - kernel_width + 1
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, pad_width, pad_width, pad_height, pad_height))  # (B, H+2p, W+2p, C)
    image, row, column, channel = padded.stride()
    patches = padded.as_strided((batch, out_height, out_width, kernel_height, kernel_width, in_channels),
                                (image, row, column, row, column, channel))  # (B, H', W', kh, kw, C): a view
    return patches.reshape(batch * out_height * out_width, kernel_height * kernel_width * in_channels)  # the copy


def patch_weight_gradient(grad_out: torch.Tensor, patches: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """The weight gradient (O, C, kh, kw) from the output gradient (B, O, H', W') and the forward's patches
    (B·H'·W', kh·kw·C): Σ over images and output pixels of the gradient times the patch, one matmul
    (O × B·H'·W') @ (B·H'·W' × kh·kw·C) in grad_out's dtype (no copy of a channels-last grad_out)."""
    out_channels = grad_out.shape[1]
    grads = grad_out.permute(0, 2, 3, 1).reshape(-1, out_channels)  # (B·H'·W', O)
    sums = grads.t() @ patches  # (O, kh·kw·C)
    return sums.view(out_channels, *kernel_size, -1).permute(0, 3, 1, 2)  # (O, C, kh, kw)


def unfolded_input_gradient(grad_out: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """The input gradient (B, C, H, W), channels-last, of a stride-1 convolution with weight (O, C, kh, kw) and zero
    padding p (at most k - 1 on each side), from its output gradient (B, O, H', W'): the convolution of the output
    gradient with the filters turned by 180° and their channels swapped, padded by k - 1 - p, as one matmul of its
    patches (B·H·W × kh·kw·O) with those filters (kh·kw·O × C)."""
    out_channels, in_channels, kernel_height, kernel_width = weight.shape
    batch, _, out_height, out_width = grad_out.shape
    turned = weight.flip(2, 3).permute(2, 3, 0, 1).reshape(kernel_height * kernel_width * out_channels, in_channels)
    full_padding = (kernel_height - 1 - padding[0], kernel_width - 1 - padding[1])
    height, width = out_height + kernel_height - 1 - 2 * padding[0], out_width + kernel_width - 1 - 2 * padding[1]
    sums = unfolded_patches(grad_out, (kernel_height, kernel_width), full_padding) @ turned  # (B·H·W, C)
    return sums.view(batch, height, width, in_channels).permute(0, 3, 1, 2)


def unfolded_weight_gradient(grad_out: torch.Tensor, x: torch.Tensor, kernel_size: tuple[int, int],
                             padding: tuple[int, int]) -> torch.Tensor:
    """The weight gradient (O, C, kh, kw) of a stride-1, zero-padded convolution of x (B, C, H, W) with output gradient
    grad_out (B, O, H', W'), by `unfolded_patches` and `patch_weight_gradient`."""
    return patch_weight_gradient(grad_out, unfolded_patches(x, kernel_size, padding), kernel_size)


def zero_padding(layer: nn.Conv2d) -> tuple[int, int] | None:
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
    """Whether `run_conv` sends layer(x) through UnfoldedConv2d (see the module doc)."""
    if type(layer) is not nn.Conv2d or intercepted(layer) or recording_graph():
        return False
    weight, bias = layer.weight, layer.bias
    padding = zero_padding(layer)
    if (padding is None or not (0 <= padding[0] < layer.kernel_size[0] and 0 <= padding[1] < layer.kernel_size[1])
            or layer.groups != 1
            or tuple(layer.stride) != (1, 1) or tuple(layer.dilation) != (1, 1) or weight.dtype != torch.float32
            or weight.device.type != "cpu"
            or (bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"))):
        return False
    if (cpu_autocast_dtype() != torch.bfloat16 or type(x) is not torch.Tensor or x.device.type != "cpu" or x.dim() != 4
            or x.dtype not in (torch.bfloat16, torch.float32) or x.shape[0] == 0 or x.shape[1] != weight.shape[1]):
        return False
    if not 0 < output_pixels(x, layer, padding) <= MAX_OUTPUT_PIXELS:
        return False
    library = compiled_library()
    return library is not None and library_capabilities(library).small_convolutions_as_matmuls


def run_conv(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x), through UnfoldedConv2d where `unfolding_pays`. x is cast to bf16 outside the function, as autocast
    casts it: the cast is what backward keeps (an input made under inference_mode included), and under
    create_graph=True its own backward carries the second-order terms to x."""
    if unfolding_pays(layer, x):
        return UnfoldedConv2d.apply(x.to(torch.bfloat16), layer.weight, layer.bias, zero_padding(layer))
    return layer(x)
