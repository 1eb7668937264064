"""How faithful a saliency map is to the model: deletion and insertion AUC (Petsiuk, Das & Saenko 2018,
"RISE: Randomized Input Sampling for Explanation of Black-box Models", section 4.1).

For each image, its pixels are ranked by the map, most salient first (ties: raster order), and the
probability the model gives the explained class is recorded while the image changes in `steps` equal
steps of pixels:

- deletion: starting from the image, the ranked pixels are replaced by the baseline, 0 in normalised
  space (the dataset's mean colour; RISE's zero image). A faithful map makes the probability fall
  fast: a LOW area under the curve is better.
- insertion: starting from a blurred copy of the image (Gaussian, kernel 11, sigma 5, RISE's
  substrate), the ranked pixels are put back. A faithful map makes the probability rise fast: a HIGH
  area is better.

Each area is the trapezoid rule over the fraction of pixels changed (0 to 1), so it is a probability
in [0, 1]; a batch's value is the mean over its images. `insertion - deletion` ranks methods and models
with one number (higher is better). A model whose output ignores the image scores its constant
probability on both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vitlab.models.base import eval_mode

BLUR_KERNEL, BLUR_SIGMA = 11, 5.0  # RISE's insertion substrate


@dataclass
class Faithfulness:
    """Deletion and insertion AUC of one explanation method on a batch of images."""

    deletion_per_image: list[float]
    insertion_per_image: list[float]

    @property
    def deletion(self) -> float:
        """Mean deletion AUC (lower is better)."""
        return sum(self.deletion_per_image) / len(self.deletion_per_image)

    @property
    def insertion(self) -> float:
        """Mean insertion AUC (higher is better)."""
        return sum(self.insertion_per_image) / len(self.insertion_per_image)

    @property
    def score(self) -> float:
        """insertion - deletion: one number to rank by (higher is better)."""
        return self.insertion - self.deletion

    def as_dict(self) -> dict:
        differences = [i - d for i, d in zip(self.insertion_per_image, self.deletion_per_image, strict=True)]
        return {"images": len(self.deletion_per_image), "deletion_auc": self.deletion, "insertion_auc": self.insertion, "score": self.score,
                "deletion_auc_se": standard_error(self.deletion_per_image), "insertion_auc_se": standard_error(self.insertion_per_image),
                "score_se": standard_error(differences),
                "deletion_auc_per_image": self.deletion_per_image, "insertion_auc_per_image": self.insertion_per_image}


def standard_error(values: list[float]) -> float:
    """Standard error of the mean of per-image values (0 for a single image)."""
    count = len(values)
    if count < 2:
        return 0.0
    mean = sum(values) / count
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1) / count)


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Each pixel's rank in its map, 0 = most salient: (B, H, W) → (B, H*W); ties keep raster order."""
    order = torch.argsort(-maps.flatten(1).float(), dim=1, stable=True)  # (B, N): pixel indices, most salient first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


@torch.no_grad()
def probability_curve(model: nn.Module, start: torch.Tensor, end: torch.Tensor, ranks: torch.Tensor, class_index: torch.Tensor,
                      steps: int) -> torch.Tensor:
    """Probability of `class_index` (B,) as images go from `start` to `end` (B, 3, H, W), the pixels of rank
    below k·N/steps taken from `end` at step k: (B, steps + 1)."""
    pixels = ranks.shape[1]
    curve = []
    for step in range(steps + 1):
        changed = (ranks < round(step * pixels / steps)).view(-1, 1, *start.shape[-2:])  # (B, 1, H, W)
        images = torch.where(changed, end, start)
        probabilities = model(images).float().softmax(dim=1)  # (B, classes)
        curve.append(probabilities.gather(1, class_index[:, None])[:, 0])
    return torch.stack(curve, dim=1)


def area_under_curve(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid rule over equal steps from 0 to 1: (B, steps + 1) → (B,)."""
    steps = curve.shape[1] - 1
    return (curve[:, :-1] + curve[:, 1:]).sum(dim=1) / (2 * steps)


def deletion_insertion(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, class_index: torch.Tensor, steps: int = 32) -> Faithfulness:
    """Deletion and insertion AUC of saliency `maps` (B, H, W) for normalised `images` (B, 3, H, W) and the
    explained classes `class_index` (B,) (see the module doc for the definitions)."""
    from torchvision.transforms.functional import gaussian_blur  # torchvision takes seconds to import: only when needed

    device = next(model.parameters()).device
    images, class_index = images.to(device).float(), class_index.to(device)
    ranks = pixel_ranks(maps.to(device))
    baseline = torch.zeros_like(images)
    kernel = min(BLUR_KERNEL, 2 * min(images.shape[-2:]) - 1)  # reflect padding needs kernel // 2 < side (tiny test images)
    blurred = gaussian_blur(images, kernel_size=[kernel, kernel], sigma=[BLUR_SIGMA, BLUR_SIGMA])
    with eval_mode(model):
        deletion = area_under_curve(probability_curve(model, images, baseline, ranks, class_index, steps))
        insertion = area_under_curve(probability_curve(model, blurred, images, ranks, class_index, steps))
    return Faithfulness(deletion_per_image=deletion.cpu().tolist(), insertion_per_image=insertion.cpu().tolist())
