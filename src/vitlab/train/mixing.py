"""MixUp (Zhang et al. 2018) and CutMix (Yun et al. 2019) on whole batches.

Each training batch is blended with itself rolled by one image: MixUp takes `w·x + (1-w)·partner`,
CutMix pastes a random box of the partner into every image. The loss is then
`w·CE(logits, labels) + (1-w)·CE(logits, partner labels)`, with `w` the share of the first image
(for CutMix the box's exact area after clipping). The ratio comes from Beta(alpha, alpha); with both
switched on, each batch uses one of the two with probability 1/2 (as timm does).

All draws come from the batch generator, so a resumed run mixes exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MixedBatch:
    images: torch.Tensor  # (B, C, H, W)
    labels: torch.Tensor  # (B,) the first image's class
    partner_labels: torch.Tensor  # (B,) the pasted or blended image's class
    weight: float  # share of the first image, in [0, 1]

    @property
    def dominant_labels(self) -> torch.Tensor:
        """The class that makes up most of each image (what training accuracy is counted against)."""
        return self.labels if self.weight >= 0.5 else self.partner_labels


def draw_beta(alpha: float, generator: torch.Generator) -> float:
    """One Beta(alpha, alpha) sample, seeded from `generator` (torch's Beta takes no generator)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def draw_uniform(generator: torch.Generator) -> float:
    return float(torch.rand(1, generator=generator, device=generator.device).item())


def cutmix_box(height: int, width: int, weight: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A box (top, bottom, left, right) covering about 1 - weight of the image, its centre uniform, clipped."""
    side = math.sqrt(1.0 - weight)
    box_height, box_width = round(height * side), round(width * side)
    centre_row, centre_col = int(draw_uniform(generator) * height), int(draw_uniform(generator) * width)
    top, bottom = max(centre_row - box_height // 2, 0), min(centre_row + box_height - box_height // 2, height)
    left, right = max(centre_col - box_width // 2, 0), min(centre_col + box_width - box_width // 2, width)
    return top, bottom, left, right


def mix_batch(images: torch.Tensor, labels: torch.Tensor, mixup_alpha: float, cutmix_alpha: float,
              generator: torch.Generator) -> MixedBatch:
    """Blend (MixUp) or paste (CutMix) each image with its neighbour in the batch; alphas of 0 switch one off."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return MixedBatch(images, labels, labels, 1.0)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or draw_uniform(generator) < 0.5)
    weight = draw_beta(cutmix_alpha if use_cutmix else mixup_alpha, generator)
    partner_images, partner_labels = images.roll(1, dims=0), labels.roll(1, dims=0)
    if use_cutmix:
        height, width = images.shape[-2:]
        top, bottom, left, right = cutmix_box(height, width, weight, generator)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = partner_images[..., top:bottom, left:right]
        weight = 1.0 - (bottom - top) * (right - left) / (height * width)  # the area actually pasted
    else:
        mixed = images * weight + partner_images * (1.0 - weight)
    return MixedBatch(mixed, labels, partner_labels, weight)
