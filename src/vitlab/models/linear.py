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

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.kernels import matmul as matmul_kernel
from vitlab.kernels import recording_graph
from vitlab.kernels import weight_gradient as weight_gradient_kernel
from vitlab.kernels.build import fp32_cpu_vector
from vitlab.models.base import cpu_autocast_dtype, plain_linear

# oneDNN's fused linear (PyTorch builds with oneDNN have it; a private op, so looked up, not assumed)
MKLDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None

# At most this many multiply-adds, PyTorch computes a bf16 product itself instead of calling oneDNN, and keeps bf16
# subnormal numbers there (oneDNN and the kernel count them as 0); so products this small stay with PyTorch.
SMALL_PRODUCT = 16 ** 3


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for bf16 CPU tensors, bit for bit. With a bias and a contiguous x it is oneDNN's
    linear with the bias in its output stage (the op inductor's CPU fusions call): F.linear's addmm first fills the
    output with copies of the bias, a pass over memory of its own. On a strided x oneDNN's rounding differs from
    F.linear's, so that goes to F.linear, as do products of at most SMALL_PRODUCT multiply-adds (PyTorch computes
    those itself)."""
    if bias is not None and x.is_contiguous() and MKLDNN_LINEAR is not None and x.numel() * weight.shape[0] > SMALL_PRODUCT:
        return MKLDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class KernelLinear(torch.autograd.Function):
    """x @ weightᵀ (+ bias) in bf16 for bf16 CPU x and fp32 weights, by vitlab's matmul kernel where `products_in_kernel`
    (else oneDNN's; the same bits either way); weight and bias gradients by vitlab's weight-gradient kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight_bf16 = weight.detach().to(torch.bfloat16)
        bias_bf16 = None if bias is None else bias.detach().to(torch.bfloat16)
        ctx.has_bias = bias is not None
        if products_in_kernel(x, weight):
            packed = matmul_kernel.pack_weight(weight_bf16, backward=ctx.needs_input_grad[0])
            out = matmul_kernel.matmul(x, packed.forward, bias_bf16)  # (..., out) bf16, the bits of bf16_linear
            ctx.save_for_backward(x, packed.backward)
            ctx.packed = True
            return out
        out = bf16_linear(x, weight_bf16, bias_bf16)  # (..., out) bf16
        ctx.save_for_backward(x, weight_bf16)
        ctx.packed = False
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if torch.is_grad_enabled():  # backward(create_graph=True): the kernel's gradients have no derivative of their own
            raise RuntimeError("vitlab's linear-layer kernels cannot be differentiated twice (a backward with "
                               "create_graph=True); switch vitlab's C kernels off: --cpu_kernels false, or "
                               "vitlab.kernels.switch_kernels(False)")
        x, weight_or_pairs = ctx.saved_tensors
        grad_out = grad_out.to(torch.bfloat16)
        grad_x = None
        if ctx.needs_input_grad[0]:  # (..., in) bf16, as autocast's backward
            grad_x = matmul_kernel.matmul(grad_out, weight_or_pairs) if ctx.packed else grad_out @ weight_or_pairs
        grad_weight = grad_bias = None
        bias_gradient = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:
            grad_weight, grad_bias = weight_gradient_kernel.weight_gradient(grad_out, x, bias_gradient)
        elif bias_gradient:  # a frozen weight: the bias's sums alone
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0, dtype=torch.float32)
        return grad_x, grad_weight, grad_bias


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
    return (not recording_graph() and torch.is_grad_enabled() and cpu_autocast_dtype() == torch.bfloat16
            and x.dtype == torch.bfloat16 and x.device.type == "cpu" and weight.dtype == torch.float32
            and weight.device.type == "cpu" and weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1]
            and (bias is None or fp32_cpu_vector(bias, weight.shape[0]))
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
