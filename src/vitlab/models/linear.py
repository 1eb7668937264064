"""Linear layers under CPU bf16 autocast that run on vitlab's kernels: the products in bf16, the weight and bias
gradients in fp32.

Under autocast a linear layer is oneDNN's bf16 matmul, which ran the ViTs' narrow layers well below the machine's
peak and pays a fixed cost per call; its weight gradient is a bf16 matmul of the output gradient's transpose with the
input (oneDNN first copies both into its own layouts), rounded to bf16 and cast to the fp32 weight's dtype in another
pass; the bias gradient is a separate sum. `linear` computes the forward and the input gradient with
`kernels/matmul.c` (the weight packed once per forward, for both), bit for bit as autocast does, and the weight and
bias gradients in one pass of `kernels/weight_gradient.c`, in fp32 without the rounding to bf16. On a CPU with AMX
the forward and input-gradient products stay with oneDNN (on the tiles, faster than the vector kernel), and the weight
and bias gradients run on the tiles in weight_gradient.c. Everywhere else (no autocast, fp32 or GPU inputs, no
gradient, a graph being recorded, widths the kernels do not take, no compiler or no AVX-512 BF16) it is F.linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.kernels import matmul as matmul_kernel
from vitlab.kernels import recording_graph
from vitlab.kernels import weight_gradient as weight_gradient_kernel
from vitlab.kernels.build import fp32_cpu_vector
from vitlab.kernels.matmul import SMALL_PRODUCT
from vitlab.models.base import cpu_autocast_dtype, plain_linear

# oneDNN's fused linear (PyTorch builds with oneDNN have it; a private op, so looked up, not assumed)
MKLDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for bf16 CPU tensors, bit for bit. With a bias and a contiguous x it is oneDNN's
    linear with the bias in its output stage (the op inductor's CPU fusions call): F.linear's addmm first fills the
    output with copies of the bias, a pass over memory of its own. On a strided x oneDNN's rounding differs from
    F.linear's, so that goes to F.linear, as do products of at most SMALL_PRODUCT multiply-adds (PyTorch computes
    those itself)."""
    if bias is not None and x.is_contiguous() and MKLDNN_LINEAR is not None and x.numel() * weight.shape[0] > SMALL_PRODUCT:
        return MKLDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class SavedLinear:
    """What `linear_backward` needs of a `linear_forward`: its input and, for the input gradient, the weight as the
    matmul kernel's pairs (`packed`) or as a bf16 matrix for oneDNN."""

    x: torch.Tensor  # (..., in) bf16
    weight: torch.Tensor | None  # packed pairs (out / 2, in) int32, a bf16 matrix (out, in), or None: no input gradient
    packed: bool
    has_bias: bool


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   input_gradient: bool) -> tuple[torch.Tensor, SavedLinear]:
    """(x @ weightᵀ (+ bias) in bf16 for bf16 CPU x and fp32 weights, by vitlab's matmul kernel where
    `products_in_kernel` (else oneDNN's; the same bits either way), what backward needs). No autograd: KernelLinear's
    forward, and a fused block's (models/fused_block.py)."""
    weight_bf16 = weight.detach().to(torch.bfloat16)
    bias_bf16 = None if bias is None else bias.detach().to(torch.bfloat16)
    if products_in_kernel(x, weight):
        packed = matmul_kernel.pack_weight(weight_bf16, backward=input_gradient)
        out = matmul_kernel.matmul(x, packed.forward, bias_bf16)  # (..., out) bf16, the bits of bf16_linear
        return out, SavedLinear(x, packed.backward, True, bias is not None)
    out = bf16_linear(x, weight_bf16, bias_bf16)  # (..., out) bf16
    return out, SavedLinear(x, weight_bf16, False, bias is not None)


def linear_backward(saved: SavedLinear, grad_out: torch.Tensor, input_gradient: bool, weight_gradient: bool,
                    bias_gradient: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_x bf16, grad_weight fp32, grad_bias fp32) of `linear_forward`, each None where not asked for (or where
    the layer has no bias); the weight and bias gradients by vitlab's weight-gradient kernel."""
    grad_out = grad_out.to(torch.bfloat16)
    grad_x = None
    if input_gradient:  # (..., in) bf16, as autocast's backward
        grad_x = matmul_kernel.matmul(grad_out, saved.weight) if saved.packed else grad_out @ saved.weight
    grad_weight = grad_bias = None
    bias_gradient = saved.has_bias and bias_gradient
    if weight_gradient:
        grad_weight, grad_bias = weight_gradient_kernel.weight_gradient(grad_out, saved.x, bias_gradient)
    elif bias_gradient:  # a frozen weight: the bias's sums alone
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0, dtype=torch.float32)
    return grad_x, grad_weight, grad_bias


def refuse_double_backward() -> None:
    """The kernels' gradients have no derivative of their own: a backward with create_graph=True stops here."""
    if torch.is_grad_enabled():
        raise RuntimeError("vitlab's linear-layer kernels cannot be differentiated twice (a backward with "
                           "create_graph=True); switch vitlab's C kernels off: --cpu_kernels false, or "
                           "vitlab.kernels.switch_kernels(False)")


class KernelLinear(torch.autograd.Function):
    """x @ weightᵀ (+ bias) in bf16 for bf16 CPU x and fp32 weights (`linear_forward`); weight and bias gradients by
    vitlab's weight-gradient kernel (`linear_backward`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out, saved = linear_forward(x, weight, bias, input_gradient=ctx.needs_input_grad[0])
        ctx.save_for_backward(saved.x, saved.weight)
        ctx.packed, ctx.has_bias = saved.packed, saved.has_bias
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        refuse_double_backward()
        x, weight = ctx.saved_tensors
        return linear_backward(SavedLinear(x, weight, ctx.packed, ctx.has_bias), grad_out, *ctx.needs_input_grad)


def products_in_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether KernelLinear's forward and input-gradient products go to vitlab's matmul kernel (the same bits as
    bf16_linear): widths it takes, a contiguous x (PyTorch rounds a strided x's product before adding the bias, a second
    rounding), and more than SMALL_PRODUCT multiply-adds."""
    out_features, in_features = weight.shape
    return (x.is_contiguous() and x.numel() * out_features > SMALL_PRODUCT
            and matmul_kernel.kernel_supports(in_features, out_features))


def kernel_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear` runs x through KernelLinear: bf16 CPU x under CPU bf16 autocast with gradients on, fp32
    weight (and bias) on the CPU, no graph being recorded, widths the kernel takes."""
    # the graph test first: a tracer would warn about the shape tests
    return (not recording_graph() and x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() >= 1
            and weights_take_kernel(weight, bias) and x.shape[-1] == weight.shape[1])


def weights_take_kernel(weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """kernel_applies but for x, which a fused path knows to be bf16 on the CPU: gradients on, CPU bf16 autocast, an fp32
    CPU weight (and bias), widths the kernel takes. (The graph test is the caller's.)"""
    return (torch.is_grad_enabled() and cpu_autocast_dtype() == torch.bfloat16 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and weight.dim() == 2 and (bias is None or fp32_cpu_vector(bias, weight.shape[0]))
            and weight_gradient_kernel.kernel_supports(weight.shape[1], weight.shape[0], bias is not None))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), with the weight and bias gradients from vitlab's kernel where it applies."""
    if kernel_applies(x, weight, bias):
        return KernelLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def run_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x), through `linear` when the layer is a plain nn.Linear (no replaced forward, no hooks)."""
    if plain_linear(layer):
        return linear(x, layer.weight, layer.bias)
    return layer(x)
