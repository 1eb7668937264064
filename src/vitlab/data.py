"""CIFAR-10 as tensors: find or download, verify, split, and serve augmented batches on the device.

The data path follows airbench: the whole split lives on the training device as one uint8 tensor
(50,000 × 3 × 32 × 32 = 150 MB), and random crop + flip run on whole batches there. No DataLoader,
no per-sample Python, the same code on CPU and CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitlab.errors import VitlabError
from vitlab.kernels import augment as augment_kernel

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
META_FILE = "batches.meta"
# The published MD5s of the official files (the ones torchvision checks).
MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
# CIFAR-10's class names and the per-channel statistics of its 50,000 training images (pixels / 255).
from vitlab.models.base import CIFAR10_CLASSES as CLASSES  # noqa: E402
from vitlab.models.base import CIFAR10_MEAN as MEAN  # noqa: E402
from vitlab.models.base import CIFAR10_STD as STD  # noqa: E402


@dataclass
class CIFAR10:
    """A dataset's three splits as uint8 tensors (N, 3, H, W) with int64 labels (N,), on the CPU, its class
    names and the per-channel statistics its images are normalised with (any dataset, despite the name)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...] = CLASSES
    source: str = ""
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD
    name: str = "cifar10"

    def input_spec(self):
        """What a model trained on these data expects (class names, normalisation)."""
        from vitlab.models.base import InputSpec

        return InputSpec(classes=tuple(self.classes), mean=tuple(self.mean), std=tuple(self.std), dataset=self.name)


Dataset = CIFAR10  # the general name


def candidate_dirs(data_dir: str | Path | None) -> list[Path]:
    """Where to look, in order: --data-dir, then $VITLAB_DATA, then ./data."""
    dirs = [data_dir, os.environ.get("VITLAB_DATA") or None, "data"]
    return [Path(d).expanduser() for d in dirs if d]


def batches_folder(root: Path) -> Path | None:
    """Accept either the folder that holds `cifar-10-batches-py` or that folder itself."""
    for folder in (root / FOLDER, root):
        if all((folder / name).is_file() for name in MD5):
            return folder
    return None


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksums(folder: Path, names: list[str] | None = None) -> None:
    """Compare every file (or just `names`) with its published MD5 before anything is unpickled."""
    for name in names or list(MD5):
        expected = MD5[name]
        actual = md5_of(folder / name)
        if actual != expected:
            raise VitlabError(
                f"CIFAR-10 file {folder / name} fails its checksum (md5 {actual}, expected {expected}); "
                f"it is corrupt or incomplete: delete {folder} and download it again"
            )


class PlainDataUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10's pickles contain (numpy arrays, dicts, lists, bytes); nothing can run."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes into a protocol-2 pickle; it only encodes text
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR-10 files hold plain data only")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return PlainDataUnpickler(handle, encoding="bytes").load()
    except Exception as error:  # a file that passed its checksum but still fails is not CIFAR-10
        raise VitlabError(f"cannot read CIFAR-10 file {path} ({error}); delete the folder and download it again") from None


def read_split(folder: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in names:
        batch = read_batch(folder / name)
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # planar RGB
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def download(root: Path) -> Path:
    """Fetch the official archive with torchvision (which checks its MD5) into `root`."""
    import socket

    from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    made = [folder for folder in (root, *root.parents) if not folder.exists()]  # the folders the download would create
    try:
        TorchvisionCIFAR10(root=str(root), train=True, download=True)
    except Exception as error:
        archive = root / "cifar-10-python.tar.gz"
        if archive.exists() and batches_folder(root) is None:
            archive.unlink()  # leave no half-downloaded archive behind
        for folder in made:  # nor the folders made for it, innermost first, if they are empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise VitlabError(
            f"CIFAR-10 is not in {root} and downloading it failed ({reason}); "
            f"with no network, copy the 'cifar-10-batches-py' folder there, or point --data-dir or VITLAB_DATA at it"
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return root / FOLDER


def locate_cifar10(data_dir: str | Path | None = None, download_if_missing: bool = True) -> Path:
    """Return the folder holding the batch files, downloading into the first candidate if allowed."""
    candidates = candidate_dirs(data_dir)
    for root in candidates:
        folder = batches_folder(root)
        if folder is not None:
            return folder
    searched = ", ".join(str(c) for c in candidates)
    if not download_if_missing:
        raise VitlabError(f"CIFAR-10 not found in {searched}; pass --data-dir or set VITLAB_DATA to the folder holding '{FOLDER}'")
    return download(candidates[0])


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation cut into (train, validation) indices."""
    permutation = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    val_count = int(round(count * val_fraction))
    return permutation[val_count:], permutation[:val_count]


def load_cifar10(
    data_dir: str | Path | None = None,
    *,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    subset: int | None = None,
    train_size: int | None = None,
    test_subset: int | None = None,
    download_if_missing: bool = True,
) -> CIFAR10:
    """Load CIFAR-10, verified against its published checksums, split 80/20 into train/validation.

    Args:
        data_dir: where to look first (then $VITLAB_DATA, then ./data); a download goes there.
        val_fraction: share of the 50,000 training images held out for validation.
        split_seed: seeds the split; fixed by default so every run validates on the same images.
        subset: use only this many training images (before the split), for quick runs.
        train_size: keep only this many images of the training split (the validation split is unchanged);
            a smaller train_size is always a subset of a larger one.
        test_subset: use only the first this-many test images.
        download_if_missing: try to download when no copy is found.
    """
    if not 0.0 < val_fraction < 1.0:
        raise VitlabError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    folder = locate_cifar10(data_dir, download_if_missing)
    verify_checksums(folder)
    images, labels = read_split(folder, TRAIN_FILES)
    test_images, test_labels = read_split(folder, TEST_FILES)
    if subset is not None:
        if not 10 <= subset <= len(images):
            raise VitlabError(f"subset must be between 10 and {len(images)}, got {subset}")
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed + 1))[:subset]
        images, labels = images[keep], labels[keep]
    if test_subset is not None:
        if not 1 <= test_subset <= len(test_images):
            raise VitlabError(f"test_subset must be between 1 and {len(test_images)}, got {test_subset}")
        test_images, test_labels = test_images[:test_subset], test_labels[:test_subset]
    train_index, val_index = split_indices(len(images), val_fraction, split_seed)
    if len(val_index) == 0 or len(train_index) == 0:
        raise VitlabError(f"splitting {len(images)} images with val_fraction {val_fraction} leaves an empty "
                          f"{'validation' if len(val_index) == 0 else 'training'} split; raise --subset or change --val_fraction")
    if train_size is not None:
        if not 1 <= train_size <= len(train_index):
            raise VitlabError(f"train_size must be between 1 and the {len(train_index)} images of the training split, got {train_size}")
        train_index = train_index[:train_size]
    return CIFAR10(
        train_images=images[train_index], train_labels=labels[train_index],
        val_images=images[val_index], val_labels=labels[val_index],
        test_images=test_images, test_labels=test_labels, source=str(folder),
    )


def load_cifar10_test(data_dir: str | Path | None = None, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the test set, (N, 3, 32, 32) uint8 and (N,) labels, its first `count` images (fewer if the set
    is smaller): for looking at or checking models without reading and checksumming the training batches."""
    folder = locate_cifar10(data_dir, download_if_missing=False)
    verify_checksums(folder, TEST_FILES)
    images, labels = read_split(folder, TEST_FILES)
    return images[:count], labels[:count]


@functools.lru_cache(maxsize=16)
def normalization_affine(device: torch.device, dtype: torch.dtype, mean: tuple = MEAN, std: tuple = STD) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) as (1, 3, 1, 1) tensors with (x / 255 - mean) / std = x * scale + shift."""
    mean, std = (torch.tensor(values, dtype=torch.float64).view(1, 3, 1, 1) for values in (mean, std))
    return (1.0 / (255.0 * std)).to(device, dtype), (-mean / std).to(device, dtype)


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32, mean: tuple = MEAN, std: tuple = STD) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float, scaled to [0, 1] and standardised with the dataset's statistics (CIFAR-10's by default).

    One multiply and one add in place after the conversion, instead of three new tensors for
    `(x / 255 - mean) / std` (timings in docs/performance.md).
    """
    scale, shift = normalization_affine(images.device, dtype, tuple(mean), tuple(std))
    return images.to(dtype).mul_(scale).add_(shift)


def draw_crop_flip(count: int, padding: int, generator: torch.Generator, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop offsets (2, count) in [0, 2·padding] and flip flags (count,) for `count` images."""
    device = generator.device
    offsets = torch.randint(0, 2 * padding + 1, (2, count), generator=generator, device=device)
    flips = (torch.rand(count, generator=generator, device=device) < 0.5) & flip
    return offsets, flips


def reflect_pad(images: torch.Tensor, padding: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H+2p, W+2p), the border mirrored without repeating the edge pixel (like
    F.pad's 'reflect', which has no uint8 kernel): two index_selects."""
    height, width = images.shape[-2:]
    if padding >= min(height, width):
        raise VitlabError(f"reflect padding of {padding} pixels needs images larger than {padding} pixels; use a smaller crop_padding")

    def mirrored(size: int) -> torch.Tensor:
        index = torch.arange(-padding, size + padding, device=images.device).abs()
        return torch.where(index > size - 1, 2 * (size - 1) - index, index)

    return images.index_select(2, mirrored(height)).index_select(3, mirrored(width))


def apply_crop_flip(images: torch.Tensor, padding: int, offsets: torch.Tensor, flips: torch.Tensor, pad_mode: str = "zeros") -> torch.Tensor:
    """Crop each image from a zero-padded (or with `pad_mode` 'reflect', mirror-padded) copy at `offsets` (2, B)
    and mirror those with `flips` (B,).

    The padded batch is viewed as every 32×32 window of every image (unfold: no copy), and one index
    picks each image's window, whole pixels (3 bytes) at a time, into channels-last order (about 3× faster than
    a gather with per-pixel row and column indices; docs/performance.md).
    """
    batch, _, height, width = images.shape  # (B, C, H, W) uint8
    if padding > 0 and pad_mode == "reflect":
        images = reflect_pad(images, padding)  # (B, C, H+2p, W+2p)
    elif padding > 0:
        images = torch.nn.functional.pad(images, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    windows = images.permute(0, 2, 3, 1).unfold(1, height, 1).unfold(2, width, 1)  # (B, 2p+1, 2p+1, C, H, W), a view
    picked = windows.permute(0, 1, 2, 4, 5, 3)[torch.arange(batch, device=images.device), offsets[0], offsets[1]]  # (B, H, W, C)
    picked = torch.where(flips[:, None, None, None], picked.flip(2), picked)  # flipping = reading columns backwards
    return picked.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last in memory


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Per-image random crop from a zero-padded copy and random horizontal flip, for a whole batch.

    Same distribution as torchvision's RandomCrop(32, padding) + RandomHorizontalFlip, but one
    gather for the batch instead of a Python call per image.
    """
    offsets, flips = draw_crop_flip(len(images), padding, generator, flip)
    return apply_crop_flip(images, padding, offsets, flips)


class DeviceBatches:
    """Iterates (images, labels) batches from tensors that already live on the device.

    Training batches are shuffled each epoch and augmented; evaluation batches are in order.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        device: torch.device,
        seed: int = 0,
        crop_padding: int = 4,
        flip: bool = True,
        drop_last: bool | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
        shard: tuple[int, int] = (0, 1),
        trivial_augment: bool = False,
        random_erasing: float = 0.0,
        mean: tuple = MEAN,
        std: tuple = STD,
        alternating_flip: bool = False,
        pad_mode: str = "zeros",
    ) -> None:
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.train = train
        self.device = device
        self.crop_padding = crop_padding if train else 0
        self.pad_mode = pad_mode
        self.flip = flip and train
        # Dropping the ragged last batch in training keeps every step the same shape (and speed).
        self.drop_last = train and len(images) > batch_size if drop_last is None else drop_last
        self.memory_format = memory_format
        self.mean, self.std = tuple(mean), tuple(std)
        self.trivial_augment = trivial_augment and train
        self.random_erasing = random_erasing if train else 0.0
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # Alternating flip: a fixed random first orientation per image, flipped every other epoch (seeded separately so
        # the other draws stay as they were).
        self.alternating_flip = alternating_flip and self.flip
        self.first_flip = (torch.rand(len(self.images), generator=torch.Generator().manual_seed(seed + 1)) < 0.5).to(device)
        self.epoch = 0
        # Scalar draws (MixUp/CutMix ratios and boxes) are read on the host; from a GPU generator each
        # read would wait for the GPU, so off the CPU they come from a host generator of their own.
        self.host_generator = self.generator if self.generator.device.type == "cpu" else torch.Generator().manual_seed(seed)
        # Data parallel: every rank draws the same order and augmentation for the whole global batch
        # (same seed) and keeps its own contiguous slice of it, so N ranks see exactly one rank's batches.
        self.rank, self.world_size = shard
        if batch_size % self.world_size:
            raise VitlabError(f"batch_size {batch_size} does not split evenly over {self.world_size} processes; "
                              f"use a multiple of {self.world_size}")

    def __len__(self) -> int:
        count = len(self.images)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def new_order(self) -> torch.Tensor:
        """The shuffled image order of a new training epoch (draws from the generator)."""
        return torch.randperm(len(self.images), generator=self.generator, device=self.device)

    def alternating_flips(self, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """Which of the images at `index` are mirrored in `epoch` (1-based) under alternating flip."""
        return self.first_flip[index] ^ bool(epoch % 2 == 0)

    def batch(self, step: int, order: torch.Tensor | None = None, epoch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `step` of an epoch: augmented (drawing from the generator) when training.

        Every random draw is made for the whole (global) batch, in a fixed order, and each process keeps
        its slice: N processes augment exactly as one."""
        from vitlab.augment import apply_random_erasing, apply_trivial_augment, draw_random_erasing, draw_trivial_augment

        start = step * self.batch_size
        index = order[start:start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
        keep = slice(None)
        if self.world_size > 1 and order is not None:  # this rank's slice of the global batch
            share = len(index) // self.world_size
            keep = slice(self.rank * share, (self.rank + 1) * share)
        if self.train:
            count = len(index)
            offsets, flips = draw_crop_flip(count, self.crop_padding, self.generator, self.flip)
            if self.alternating_flip and isinstance(index, torch.Tensor):
                flips = self.alternating_flips(index, epoch)
            augment_draws = draw_trivial_augment(count, self.generator)[:, keep] if self.trivial_augment else None
            height, width = self.images.shape[-2:]
            erase_boxes = erase_noise = None
            if self.random_erasing > 0:
                erase_boxes = draw_random_erasing(count, height, width, self.random_erasing, self.generator)[:, keep]
                erase_noise = torch.randn((count, self.images.shape[1], height, width), generator=self.generator, device=self.device)[keep]
            offsets, flips = offsets[:, keep], flips[keep]
        index = index[keep] if isinstance(index, torch.Tensor) else index
        if self.train and augment_draws is None and self.pad_mode == "zeros" and isinstance(index, torch.Tensor) \
                and augment_kernel.kernel_supports(self.images, index):
            # crop, flip and normalise in one pass of vitlab's C kernel (the same numbers as the operators below)
            scale, shift = normalization_affine(self.device, torch.float32, self.mean, self.std)
            images = augment_kernel.crop_flip_normalize(self.images, index, offsets, flips, self.crop_padding, scale, shift,
                                                        self.memory_format)
        else:
            # index_select copies whole images; indexing with a tensor copies byte by byte (20× slower for a CPU batch)
            images = self.images.index_select(0, index) if isinstance(index, torch.Tensor) else self.images[index]
            if self.train:
                images = apply_crop_flip(images, self.crop_padding, offsets, flips, self.pad_mode)
                if augment_draws is not None:
                    images = apply_trivial_augment(images, augment_draws)
            # The layout change happens on uint8 (a quarter of the bytes); normalize keeps it.
            images = normalize(images.contiguous(memory_format=self.memory_format), mean=self.mean, std=self.std)
        if self.train and erase_boxes is not None:
            images = apply_random_erasing(images, erase_boxes, erase_noise)
        return images, self.labels.index_select(0, index) if isinstance(index, torch.Tensor) else self.labels[index]

    def __iter__(self):
        order = self.new_order() if self.train else None
        for step in range(len(self)):
            yield self.batch(step, order)
