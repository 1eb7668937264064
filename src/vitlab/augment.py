"""Batch augmentations on the device: TrivialAugment and random erasing.

Both run on whole batches where the data live (no per-image Python, no DataLoader) and draw every
random number from the batch generator, so a resumed run augments exactly as an uninterrupted one.

- **TrivialAugment** (Müller & Hutter 2021, the "wide" magnitudes of torchvision's TrivialAugmentWide):
  each image gets one operation, chosen uniformly from 14, at a magnitude chosen uniformly from 31 bins
  (and a random sign where the operation has one). Images that drew the same operation are
  transformed together.
- **Random erasing** (Zhong et al. 2020): with probability p, a rectangle covering 2-33% of the image
  with aspect ratio 0.3-3.3 is replaced by standard-normal noise (in normalised pixel space).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OPERATIONS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
              "sharpness", "posterize", "solarize", "autocontrast", "equalize")
BINS = 31  # magnitude bins, as TrivialAugmentWide


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 255] → (B, 1, H, W) ITU-R 601 luma, as PIL."""
    return (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)


def blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: other + factor · (images − other), factor (B,), clamped to [0, 255]."""
    return (other + factor.view(-1, 1, 1, 1) * (images - other)).clamp(0, 255)


def smoothed(images: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3×3, centre 5, others 1, /13) inside, borders unchanged: the sharpness reference."""
    kernel = torch.ones(3, 3, device=images.device, dtype=images.dtype)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(3, 1, 3, 3)
    inner = F.conv2d(images, kernel, groups=3)  # (B, 3, H-2, W-2)
    result = images.clone()
    result[:, :, 1:-1, 1:-1] = inner
    return result


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to the full range [0, 255]."""
    low = images.amin(dim=(2, 3), keepdim=True)
    high = images.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(high > low, 255.0 / (high - low).clamp_min(1e-6), torch.ones_like(high))
    return torch.where(high > low, (images - low) * scale, images).clamp(0, 255)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel of each image (PIL's ImageOps.equalize, batched)."""
    batch, channels, height, width = images.shape
    values = images.round().long().clamp(0, 255).reshape(batch * channels, -1)  # (BC, HW)
    histogram = torch.zeros(batch * channels, 256, device=images.device, dtype=torch.long)
    histogram.scatter_add_(1, values, torch.ones_like(values))
    last = torch.where(histogram > 0, torch.arange(256, device=images.device), -1).amax(dim=1, keepdim=True)  # last used level
    step = (height * width - histogram.gather(1, last)) // 255  # (BC, 1)
    cumulative = torch.cumsum(histogram, dim=1) - histogram  # counts below each level
    lut = ((cumulative + step // 2) // step.clamp_min(1)).clamp(0, 255)
    equalized = lut.gather(1, values).to(images.dtype).reshape(batch, channels, height, width)
    return torch.where((step > 0).view(batch, channels, 1, 1), equalized, images)


def affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample (B, 3, H, W) through per-image affine maps theta (B, 2, 3) in normalised coordinates; black outside."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def geometric_theta(operation: str, amount: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 2, 3) maps from output to input coordinates for a shear, translation or rotation by `amount` (B,)."""
    theta = torch.zeros(len(amount), 2, 3, device=amount.device, dtype=torch.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    if operation == "shear_x":
        theta[:, 0, 1] = amount
    elif operation == "shear_y":
        theta[:, 1, 0] = amount
    elif operation == "translate_x":
        theta[:, 0, 2] = 2.0 * amount / size
    elif operation == "translate_y":
        theta[:, 1, 2] = 2.0 * amount / size
    elif operation == "rotate":
        radians = amount * math.pi / 180.0
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(radians), -torch.sin(radians)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(radians), torch.cos(radians)
    return theta


def apply_operation(operation: str, images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """One operation on float images (B, 3, H, W) in [0, 255]; `level` (B,) in [0, 1], `sign` (B,) ±1."""
    if operation in ("shear_x", "shear_y"):
        return affine(images, geometric_theta(operation, sign * level * 0.99, images.shape[-1]))
    if operation in ("translate_x", "translate_y"):
        return affine(images, geometric_theta(operation, sign * level * 32.0, images.shape[-1]))
    if operation == "rotate":
        return affine(images, geometric_theta(operation, sign * level * 135.0, images.shape[-1]))
    factor = 1.0 + sign * level * 0.99
    if operation == "brightness":
        return blend(images, torch.zeros_like(images), factor)
    if operation == "color":
        return blend(images, grayscale(images).expand_as(images), factor)
    if operation == "contrast":
        return blend(images, grayscale(images).mean(dim=(1, 2, 3), keepdim=True).expand_as(images), factor)
    if operation == "sharpness":
        return blend(images, smoothed(images), factor)
    if operation == "posterize":
        bits = 8 - (level * 6).long()  # 8 … 2 bits kept
        mask = (255 - (2 ** (8 - bits) - 1)).view(-1, 1, 1, 1)
        return (images.long() & mask).to(images.dtype)
    if operation == "solarize":
        threshold = (255.0 * (1.0 - level)).view(-1, 1, 1, 1)
        return torch.where(images >= threshold, 255.0 - images, images)
    if operation == "autocontrast":
        return autocontrast(images)
    if operation == "equalize":
        return equalize(images)
    return images


def draw_trivial_augment(count: int, generator: torch.Generator) -> torch.Tensor:
    """Per image: operation index, magnitude level in [0, 1] and sign, as a (3, count) float tensor."""
    device = generator.device
    operations = torch.randint(0, len(OPERATIONS), (count,), generator=generator, device=device).float()
    levels = torch.randint(0, BINS, (count,), generator=generator, device=device).float() / (BINS - 1)
    signs = torch.where(torch.rand(count, generator=generator, device=device) < 0.5, -1.0, 1.0)
    return torch.stack([operations, levels, signs])


def apply_trivial_augment(images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """TrivialAugment on uint8 images (B, 3, H, W) with the draws (3, B) of `draw_trivial_augment`."""
    operations, levels, signs = draws[0].long(), draws[1], draws[2]
    result = images.float()
    for index, operation in enumerate(OPERATIONS[1:], start=1):
        chosen = (operations == index).nonzero().flatten()
        if len(chosen):
            result[chosen] = apply_operation(operation, result[chosen], levels[chosen], signs[chosen])
    return result.round().clamp(0, 255).to(torch.uint8)


def trivial_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """TrivialAugment on uint8 images (B, 3, H, W): one random operation at one random magnitude per image."""
    return apply_trivial_augment(images, draw_trivial_augment(len(images), generator))


def draw_random_erasing(count: int, height: int, width: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Per image: whether to erase, and the box (top, left, box height, box width), as a (5, count) long tensor."""
    device = generator.device
    erase = torch.rand(count, generator=generator, device=device) < probability
    area = (0.02 + 0.31 * torch.rand(count, generator=generator, device=device)) * height * width
    log_ratio = math.log(0.3) + (math.log(3.3) - math.log(0.3)) * torch.rand(count, generator=generator, device=device)
    box_height = (area * log_ratio.exp()).sqrt().round().clamp(1, height).long()
    box_width = (area / log_ratio.exp()).sqrt().round().clamp(1, width).long()
    top = (torch.rand(count, generator=generator, device=device) * (height - box_height + 1)).long()
    left = (torch.rand(count, generator=generator, device=device) * (width - box_width + 1)).long()
    return torch.stack([erase.long(), top, left, box_height, box_width])


def apply_random_erasing(images: torch.Tensor, boxes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Replace each chosen box of normalised images (B, C, H, W) by the matching pixels of `noise` (B, C, H, W)."""
    _, _, height, width = images.shape
    erase, top, left, box_height, box_width = (row.view(-1, 1, 1) for row in boxes)
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    inside = (rows >= top) & (rows < top + box_height) & (cols >= left) & (cols < left + box_width) & erase.bool()  # (B, H, W)
    return torch.where(inside.unsqueeze(1), noise.to(images.dtype), images)


def random_erasing(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing on normalised images (B, C, H, W): each image, with `probability`, gets one rectangle
    of standard-normal noise covering 2-33% of it with aspect ratio 0.3-3.3."""
    boxes = draw_random_erasing(len(images), images.shape[-2], images.shape[-1], probability, generator)
    noise = torch.randn(images.shape, generator=generator, device=generator.device)
    return apply_random_erasing(images, boxes, noise)
