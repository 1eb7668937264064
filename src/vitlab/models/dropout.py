"""Dropout that is cheap on the CPU.

`nn.Dropout` on the CPU draws one Bernoulli sample per element, and that dominated the training step
of seed 002's ViT (dropout 0.1; the profile is in docs/performance.md). Drawing the random numbers is
the cost, so `Dropout` here draws 64 random bits per int64 and uses them as four 15-bit uniform
numbers, one per element: a quarter of the generator calls. The drop probability is rounded to a
multiple of 1/32768 (0.1 becomes 0.100006) and the kept elements are scaled to match. On other
devices (CUDA's generator is fast) it is `F.dropout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RESOLUTION = 1 << 15  # 15 uniform bits per element


def drop_threshold(p: float) -> int:
    """Elements whose 15-bit number is below this are dropped: probability threshold / 32768 ≈ p."""
    return min(round(p * RESOLUTION), RESOLUTION - 1)


def keep_scale(p: float) -> float:
    """What kept elements are multiplied by, so the expectation is unchanged: 1 / (1 - rounded p)."""
    return RESOLUTION / (RESOLUTION - drop_threshold(p))


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool tensor of `shape`, False with probability drop_threshold(p) / 32768."""
    count = shape.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_()  # 63 uniform bits each
    uniform = words.view(torch.int16)[:count] & (RESOLUTION - 1)  # (count,) in [0, 32768): bit 15 of the top lane is always 0
    return (uniform >= drop_threshold(p)).view(shape)


def fast_dropout(inputs: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each element with probability ≈ p and scale the rest so the expectation is unchanged."""
    return torch.where(keep_mask(inputs.shape, p, inputs.device), inputs * keep_scale(p), 0.0)


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
    kept = torch.where(keep_mask(probabilities.shape, p, probabilities.device), probabilities, 0.0)
    return (kept @ values) * keep_scale(p)
