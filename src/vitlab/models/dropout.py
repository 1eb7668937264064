"""Dropout that is cheap on the CPU.

`nn.Dropout` on the CPU draws one Bernoulli sample per element, and that dominated the training step
of seed 002's ViT (dropout 0.1; the profile is in docs/performance.md). On the CPU, `Dropout` here
gives each element a 15-bit uniform number and drops it when the number is below a threshold: the drop
probability is rounded to a multiple of 1/32768 (0.1 becomes 0.100006) and the kept elements are
scaled to match. On other devices (CUDA's generator is fast) it is `F.dropout`.

Two ways to the numbers, the same distribution:
- **C kernel** (vitlab.kernels, where a C compiler is present; bf16 and fp32): one pass that draws
  counter-based numbers (SplitMix64 under a key drawn from PyTorch's generator) and scales or zeroes
  each element; backward regenerates the mask from the key, so no mask is stored. A dropped element
  is 0 whatever its value (as `where` gives).
- **PyTorch operators** (otherwise, and while torch.compile, tracing or ONNX export records the graph): 64 random bits per int64 from PyTorch's
  generator, used as four 15-bit numbers, one per element (a quarter of the generator calls).

In the operator path the mask is applied as a multiplication by 0 or 1 in the inputs' own dtype, built with integer
arithmetic on the random numbers and reinterpreted as floats: PyTorch's CPU kernels that mix a bool
mask with floats (`where`, a bool → float cast) ran 3-5× slower than float-only ones
(docs/performance.md). For finite inputs and gradients the result is `where(mask, inputs * scale, 0)`
bit for bit up to the sign of zero; a dropped inf or NaN gives NaN (0 × inf) where `where` gave 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.kernels import recording_graph
from vitlab.kernels.dropout import kernel_supports, masked_scale, random_key

RESOLUTION = 1 << 15  # 15 uniform bits per element
# Floating dtypes whose 0/1 multiplier is built as integers: (integer type of the same width, bit pattern of 1.0).
ONE_BITS = {torch.bfloat16: (torch.int16, 0x3F80), torch.float16: (torch.int16, 0x3C00), torch.float32: (torch.int32, 0x3F800000)}


def drop_threshold(p: float) -> int:
    """Elements whose 15-bit number is below this are dropped: probability threshold / 32768 ≈ p."""
    return min(round(p * RESOLUTION), RESOLUTION - 1)


def keep_scale(p: float) -> float:
    """What kept elements are multiplied by, so the expectation is unchanged: 1 / (1 - rounded p)."""
    return RESOLUTION / (RESOLUTION - drop_threshold(p))


def uniform_numbers(count: int, device: torch.device) -> torch.Tensor:
    """(count,) int16, uniform in [0, 32768): four per random int64."""
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_()  # 63 uniform bits each
    return words.view(torch.int16)[:count] & (RESOLUTION - 1)  # bit 15 of the top lane is always 0


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool tensor of `shape`, False with probability drop_threshold(p) / 32768."""
    return (uniform_numbers(shape.numel(), device) >= drop_threshold(p)).view(shape)


def keep_multiplier(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The mask of `keep_mask` (same random numbers) as 1.0 / 0.0 in `dtype` (one of ONE_BITS)."""
    integer, one = ONE_BITS[dtype]
    uniform = uniform_numbers(shape.numel(), device).to(integer)
    sign_bit = 8 * uniform.element_size() - 1
    # uniform - threshold is negative exactly for a dropped element; the arithmetic shift makes that -1, else 0
    bits = uniform.sub_(drop_threshold(p)).bitwise_right_shift_(sign_bit).add_(1).mul_(one)  # 0 or the bits of 1.0
    return bits.view(dtype).view(shape)


class KernelDropout(torch.autograd.Function):
    """inputs × scale where kept, 0 where dropped, by the C kernel; backward applies the same mask to the gradient."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, p: float, scale: float) -> torch.Tensor:
        ctx.mask = (random_key(inputs.device), drop_threshold(p), scale)
        return masked_scale(inputs, *ctx.mask)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return masked_scale(grad, *ctx.mask), None, None


def use_kernel(inputs: torch.Tensor) -> bool:
    return not recording_graph() and kernel_supports(inputs)


def apply_mask(inputs: torch.Tensor, p: float) -> torch.Tensor:
    """`inputs` with each element zeroed with probability ≈ p (not rescaled)."""
    if use_kernel(inputs):
        return KernelDropout.apply(inputs, p, 1.0)
    if inputs.dtype in ONE_BITS:
        return inputs * keep_multiplier(inputs.shape, p, inputs.dtype, inputs.device)
    return torch.where(keep_mask(inputs.shape, p, inputs.device), inputs, 0.0)


def fast_dropout(inputs: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each element with probability ≈ p and scale the rest so the expectation is unchanged."""
    if use_kernel(inputs):
        return KernelDropout.apply(inputs, p, keep_scale(p))
    return apply_mask(inputs, p).mul_(keep_scale(p))


class Dropout(nn.Dropout):
    """`nn.Dropout` with a fast mask on the CPU; same `p`, same train/eval behaviour."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return inputs
        if inputs.device.type != "cpu":
            return F.dropout(inputs, self.p, True, self.inplace)
        return fast_dropout(inputs, self.p)


def dropout_matmul(probabilities: torch.Tensor, values: torch.Tensor, p: float) -> torch.Tensor:
    """`dropout(probabilities) @ values` with the rescaling applied to the (smaller) product.

    probabilities (..., T, T), values (..., T, Dh) → (..., T, Dh). Scaling after the matmul saves a
    pass over the T × T tensor forward and backward (attention dropout, e.g. seed 002's ViT).
    """
    return (apply_mask(probabilities, p) @ values) * keep_scale(p)
