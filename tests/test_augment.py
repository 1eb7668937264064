"""Batch augmentations: each TrivialAugment operation against PIL's own, random erasing's boxes, and
determinism (the same generator state gives the same batch, so resumed runs augment alike)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from vitlab.augment import apply_operation, draw_random_erasing, random_erasing, trivial_augment


def random_images(count: int = 6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(40, 200, (count, 3, 1, 1), generator=generator)
    return (base + torch.randint(-40, 40, (count, 3, 32, 32), generator=generator)).clamp(0, 255).to(torch.uint8)


def with_pil(images: torch.Tensor, function) -> torch.Tensor:
    result = [np.asarray(function(Image.fromarray(image.permute(1, 2, 0).numpy()))) for image in images]
    return torch.from_numpy(np.stack(result)).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize(("operation", "pil"), [
    ("brightness", lambda image, f: ImageEnhance.Brightness(image).enhance(f)),
    ("color", lambda image, f: ImageEnhance.Color(image).enhance(f)),
    ("contrast", lambda image, f: ImageEnhance.Contrast(image).enhance(f)),
    ("sharpness", lambda image, f: ImageEnhance.Sharpness(image).enhance(f)),
])
def test_enhancements_match_pil(operation, pil):
    images = random_images()
    level, sign = torch.full((6,), 0.5), torch.tensor([1.0, -1.0] * 3)
    ours = apply_operation(operation, images.float(), level, sign).round()
    factors = 1.0 + sign * level * 0.99
    theirs = torch.cat([with_pil(images[i:i + 1], lambda image, f=float(factors[i]): pil(image, f)) for i in range(6)])
    # PIL truncates to uint8 after each step where vitlab rounds once at the end: they may differ by a level or two.
    difference = (ours - theirs).abs()
    assert difference.max() <= 2 and (difference <= 1).float().mean() > 0.99


def test_posterize_solarize_autocontrast_and_equalize_match_pil():
    images = random_images()
    level = torch.full((6,), 0.5)  # posterize: 8 - 3 = 5 bits; solarize: threshold 127.5
    ones = torch.ones(6)
    assert torch.equal(apply_operation("posterize", images.float(), level, ones), with_pil(images, lambda i: ImageOps.posterize(i, 5)))
    assert torch.equal(apply_operation("solarize", images.float(), level, ones), with_pil(images, lambda i: ImageOps.solarize(i, 128)))
    assert (apply_operation("autocontrast", images.float(), level, ones).round() - with_pil(images, ImageOps.autocontrast)).abs().max() <= 1
    assert torch.equal(apply_operation("equalize", images.float(), level, ones), with_pil(images, ImageOps.equalize))


def test_geometric_operations_move_the_image():
    images = random_images().float()
    zero, one = torch.zeros(6), torch.ones(6)
    for operation in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate"):
        assert torch.equal(apply_operation(operation, images, zero, one), images)  # magnitude 0: unchanged
    shifted = apply_operation("translate_x", images, one, one)  # 32 pixels: the whole image leaves the frame
    assert shifted.abs().sum() == 0
    half = apply_operation("translate_x", images, torch.full((6,), 0.25), one)  # 8 pixels
    assert torch.equal(half[..., 8:], images[..., :-8]) or torch.equal(half[..., :-8], images[..., 8:])


def test_trivial_augment_is_deterministic_given_the_generator_and_keeps_uint8():
    images = random_images(64)
    first = trivial_augment(images, torch.Generator().manual_seed(3))
    second = trivial_augment(images, torch.Generator().manual_seed(3))
    assert first.dtype == torch.uint8 and torch.equal(first, second)
    assert not torch.equal(first, trivial_augment(images, torch.Generator().manual_seed(4)))
    assert (first != images).flatten(1).any(1).float().mean() > 0.5  # most images were changed


def test_random_erasing_boxes_respect_the_area_and_aspect_ranges():
    generator = torch.Generator().manual_seed(0)
    erase, top, left, height, width = draw_random_erasing(4000, 32, 32, 0.5, generator)
    assert 0.45 < erase.float().mean() < 0.55
    assert torch.all(top + height <= 32) and torch.all(left + width <= 32)
    fraction = (height * width).float() / 1024
    assert fraction.min() >= 0.015 and fraction.max() <= 0.40
    images = torch.zeros(8, 3, 32, 32)
    erased = random_erasing(images, 1.0, torch.Generator().manual_seed(1))
    changed = (erased != 0).any(dim=1)  # (8, 32, 32)
    assert torch.all(changed.flatten(1).any(1))
