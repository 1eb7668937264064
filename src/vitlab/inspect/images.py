"""Images to look at: image files from disk (any size, resized to 32×32) or test images of CIFAR-10."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vitlab.data import CLASSES, load_cifar10_test
from vitlab.datasets import decode_image


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64; -1 where the true class is unknown (image files)
    names: list[str]
    classes: tuple[str, ...] = CLASSES

    def true_name(self, index: int) -> str:
        label = int(self.labels[index])
        return self.classes[label] if 0 <= label < len(self.classes) else "?"


def load_image_file(path: str | Path, size: int = 32) -> torch.Tensor:
    """One image file → (3, size, size) uint8 RGB, the whole image resized (antialiased). Raises ValueError
    with a one-line reason for anything that is not a readable image."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give image files (e.g. {path}/*.png)")
    if not path.is_file():
        reason = ("a broken or looping symbolic link" if path.is_symlink() else
                  "not a regular file" if os.path.lexists(path) else "no such file")
        raise ValueError(f"{path}: {reason}; give image files")
    try:
        return torch.from_numpy(decode_image(path, size))
    except ValueError as error:
        raise ValueError(f"{path}: not a readable image ({error}); give a PNG, JPEG or other image file") from None


def load_image_files(paths: list[str], size: int = 32) -> tuple[ImageSet, list[str]]:
    """The readable images among `paths` (resized to size × size), and one error line for each that is not."""
    images, names, errors = [], [], []
    for path in paths:
        try:
            images.append(load_image_file(path, size=size))
            names.append(str(path))
        except ValueError as error:
            errors.append(str(error))
    stacked = torch.stack(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return ImageSet(stacked, torch.full((len(images),), -1, dtype=torch.long), names), errors


def test_images(count: int, data_dir: str | None = None, start: int = 0, data_config=None) -> ImageSet:
    """Test images start..start+count of a run's dataset (`data_config`, CIFAR-10 by default; the same for every run,
    so figures compare); fewer if the test set is smaller."""
    if data_config is not None and data_config.dataset != "cifar10":
        import dataclasses

        from vitlab.datasets import load_dataset

        data = load_dataset(dataclasses.replace(data_config, data_dir=data_dir or data_config.data_dir, subset=None, train_size=None))
        images, labels, classes = data.test_images[start:start + count], data.test_labels[start:start + count], tuple(data.classes)
    else:
        images, labels = load_cifar10_test(data_dir, start + count)
        images, labels, classes = images[start:], labels[start:], CLASSES
    return ImageSet(images, labels, [f"test image {start + i}" for i in range(len(images))], classes)
