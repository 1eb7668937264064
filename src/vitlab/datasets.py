"""Datasets beyond CIFAR-10: CIFAR-100 and folders of images (torchvision's ImageFolder layout).

    --dataset cifar10            the default (vitlab.data)
    --dataset cifar100           CIFAR-100's python files, checked against their published MD5s, 100 fine classes
    --dataset folder:PATH        PATH/train/<class>/*.png|jpg|...; optional PATH/val/<class>/..., PATH/test/<class>/...

A folder dataset's images are decoded and resized once (to --image_size, default 32) into one uint8
tensor that lives on the device like CIFAR-10's. Class names are the train/ subfolder names, sorted.
Without val/, a fixed-seed 20% of train/ (--val_fraction, --split_seed) validates; without test/, a
fixed-seed 20% of train/ is held out as the test set first (said in the log and in results.json).
Every split's normalisation uses the per-channel statistics of its training images, saved with the run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vitlab.config import DataConfig
from vitlab.data import CIFAR10, candidate_dirs, load_cifar10, md5_of, read_batch, split_indices
from vitlab.errors import VitlabError

CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                "meta": "7973b15100ade9c7d40fb424638fde48"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def channel_statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images (N, 3, H, W), in [0, 1] units."""
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1).double() / 255.0
    std = pixels.std(dim=1).clamp_min(1e-3)  # a constant channel must not divide by zero
    return tuple(round(v, 6) for v in pixels.mean(dim=1).tolist()), tuple(round(v, 6) for v in std.tolist())


def finish_splits(images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor, test_labels: torch.Tensor,
                  config: DataConfig, classes: tuple[str, ...], name: str, source: str,
                  val: tuple[torch.Tensor, torch.Tensor] | None = None) -> CIFAR10:
    """Subset, train/validation split (unless `val` is given), train_size and test_subset, as for CIFAR-10."""
    if config.subset is not None:
        if not 10 <= config.subset <= len(images):
            raise VitlabError(f"subset must be between 10 and {len(images)}, got {config.subset}")
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.split_seed + 1))[:config.subset]
        images, labels = images[keep], labels[keep]
    if val is None:
        train_index, val_index = split_indices(len(images), config.val_fraction, config.split_seed)
        if len(val_index) == 0 or len(train_index) == 0:
            raise VitlabError(f"splitting {len(images)} images with val_fraction {config.val_fraction} leaves an empty split; "
                              "raise --subset or change --val_fraction")
        val_images, val_labels = images[val_index], labels[val_index]
        images, labels = images[train_index], labels[train_index]
    else:
        val_images, val_labels = val
    if config.train_size is not None:
        if not 1 <= config.train_size <= len(images):
            raise VitlabError(f"train_size must be between 1 and the {len(images)} images of the training split, got {config.train_size}")
        images, labels = images[:config.train_size], labels[:config.train_size]
    if len(test_images) == 0:
        raise VitlabError(f"the {name} dataset has no test images; give it a test/ folder with images, or more images "
                          "in train/ so that the held-out test share is not empty")
    if config.test_subset is not None:
        if not 1 <= config.test_subset <= len(test_images):
            raise VitlabError(f"test_subset must be between 1 and {len(test_images)}, got {config.test_subset}")
        test_images, test_labels = test_images[:config.test_subset], test_labels[:config.test_subset]
    mean, std = channel_statistics(images)
    return CIFAR10(images, labels, val_images, val_labels, test_images, test_labels, classes=classes, source=source,
                   mean=mean, std=std, name=name)


# ---------------------------------------------------------------- CIFAR-100

def cifar100_folder(data_dir: str | None, download: bool) -> Path:
    candidates = candidate_dirs(data_dir)
    for root in candidates:
        for folder in (root / CIFAR100_FOLDER, root):
            if all((folder / name).is_file() for name in CIFAR100_MD5):
                return folder
    if not download:
        raise VitlabError(f"CIFAR-100 not found in {', '.join(map(str, candidates))}; pass --data-dir or set VITLAB_DATA "
                          f"to the folder holding '{CIFAR100_FOLDER}'")
    from torchvision.datasets import CIFAR100

    try:
        CIFAR100(root=str(candidates[0]), train=True, download=True)
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise VitlabError(f"CIFAR-100 is not in {candidates[0]} and downloading it failed ({reason}); copy the "
                          f"'{CIFAR100_FOLDER}' folder there, or point --data-dir or VITLAB_DATA at it") from None
    return candidates[0] / CIFAR100_FOLDER


def read_cifar100(folder: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch = read_batch(folder / name)
    try:
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"fine_labels"], dtype=np.int64)
    except (KeyError, ValueError) as error:
        raise VitlabError(f"{folder / name} is not a CIFAR-100 file ({error}); delete the folder and download it again") from None
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def load_cifar100(config: DataConfig) -> CIFAR10:
    folder = cifar100_folder(config.data_dir, config.download)
    for name, expected in CIFAR100_MD5.items():
        actual = md5_of(folder / name)
        if actual != expected:
            raise VitlabError(f"CIFAR-100 file {folder / name} fails its checksum (md5 {actual}, expected {expected}); "
                              f"delete {folder} and download it again")
    classes = tuple(name.decode() for name in read_batch(folder / "meta")[b"fine_label_names"])
    images, labels = read_cifar100(folder, "train")
    test_images, test_labels = read_cifar100(folder, "test")
    return finish_splits(images, labels, test_images, test_labels, config, classes, "cifar100", str(folder))


# ---------------------------------------------------------------- a folder of images

# PIL's modes for 16-bit (and 32-bit integer) grey images, whose values run to 65535: convert("RGB") clips them at 255.
WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def decode_image(path: Path, size: int) -> np.ndarray:
    """An image file → (3, size, size) uint8 RGB, the whole image resized (antialiased). 16-bit grey images are scaled
    to 8 bits (not clipped to white); PIL's warning about very large images is not printed (the image is only read
    and shrunk). Raises ValueError naming the reason for anything that is not a readable image."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.mode in WIDE_INTEGER_MODES:
                    wide = np.asarray(image, dtype=np.float64)
                    image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
                rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError, SyntaxError) as error:
        raise ValueError(f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else 'unreadable'}") from None
    return np.asarray(rgb).transpose(2, 0, 1).copy()  # (3, size, size)


def read_image(path: Path, size: int) -> np.ndarray:
    try:
        return decode_image(path, size)
    except ValueError as error:
        raise VitlabError(f"{path} is not a readable image ({error}); remove it or replace it") from None


def class_folders(split: Path) -> dict[str, list[Path]]:
    """{class name: its image files} for one split folder; empty classes are an error."""
    classes = {entry.name: entry for entry in sorted(split.iterdir()) if entry.is_dir() and not entry.name.startswith(".")}
    files = {}
    for name, folder in classes.items():
        images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise VitlabError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add some or remove it")
        files[name] = images
    return files


def read_split_folder(split: Path, classes: tuple[str, ...], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    files = class_folders(split)
    if set(files) != set(classes):
        missing, extra = sorted(set(classes) - set(files)), sorted(set(files) - set(classes))
        raise VitlabError(f"{split} has other classes than train/ (missing: {', '.join(missing) or 'none'}; extra: "
                          f"{', '.join(extra) or 'none'}); every split needs the same class folders")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in files[name]:
            images.append(read_image(path, size))
            labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long)


def load_image_folder(root: Path, config: DataConfig) -> CIFAR10:
    if not root.is_dir():
        raise VitlabError(f"--dataset folder:{root}: no such folder; give a folder holding train/<class>/ image folders")
    train = root / "train"
    if not train.is_dir():
        raise VitlabError(f"{root} has no train/ folder; arrange the images as {root}/train/<class>/*.png (and optionally val/, test/)")
    classes = tuple(class_folders(train))
    if len(classes) < 2:
        raise VitlabError(f"{train} holds {len(classes)} class folder(s); a classifier needs at least two classes")
    size = config.image_size or 32
    images, labels = read_split_folder(train, classes, size)
    if (root / "test").is_dir():
        test_images, test_labels = read_split_folder(root / "test", classes, size)
    else:  # documented split: a fixed-seed 20% of train/ becomes the test set
        rest, held_out = split_indices(len(images), 0.2, config.split_seed + 7)
        test_images, test_labels = images[held_out], labels[held_out]
        images, labels = images[rest], labels[rest]
    val = read_split_folder(root / "val", classes, size) if (root / "val").is_dir() else None
    source = f"folder:{root}" + ("" if (root / "test").is_dir() else " (test: a fixed 20% of train/)")
    return finish_splits(images, labels, test_images, test_labels, config, classes, f"folder:{root.name}", source, val=val)


def load_dataset(config: DataConfig) -> CIFAR10:
    """The dataset a run's DataConfig names, split as it says."""
    if config.dataset == "cifar10":
        return load_cifar10(config.data_dir, val_fraction=config.val_fraction, split_seed=config.split_seed, subset=config.subset,
                            train_size=config.train_size, test_subset=config.test_subset, download_if_missing=config.download)
    if config.dataset == "cifar100":
        return load_cifar100(config)
    return load_image_folder(Path(config.dataset.removeprefix("folder:")).expanduser(), config)


__all__ = ["CIFAR100_MD5", "channel_statistics", "load_cifar100", "load_dataset", "load_image_folder"]
