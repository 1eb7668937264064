"""ctypes bindings of patches.c: images cut into patches in one pass (the plain patch embedding's, in bf16, and shifted
patch tokenization's)."""

from __future__ import annotations

import torch

from vitlab.kernels.build import compiled_library, loaded_library, recording_graph


def kernel_supports(images: torch.Tensor, patch: int) -> bool:
    """Whether `shifted_patches` takes these with the kernels switched on: (B, C, H, W) fp32 CPU images, H and W
    multiples of the patch size, no gradient wanted for them (the cut has no backward of its own) and no graph
    being recorded. `patches_bf16` takes them too if its rows fit (`plain_cut_supports`)."""
    return (not recording_graph() and compiled_library() is not None and images.device.type == "cpu"
            and images.dtype == torch.float32 and images.dim() == 4 and patch > 0
            and images.shape[2] % patch == 0 and images.shape[3] % patch == 0
            and not (images.requires_grad and torch.is_grad_enabled()))


def shifted_patches(images: torch.Tensor, patch: int, shift: int) -> torch.Tensor:
    """(B, (H/P)·(W/P), 5·C·P·P) fp32: each patch of the image and of its four copies moved by (±shift, ±shift),
    in the order (-s,-s), (-s,+s), (+s,-s), (+s,+s) after the image itself, each as (channel, row, column); zeros
    where a moved copy leaves the image. What ShiftedPatchTokenizer's PyTorch route gives, bit for bit."""
    if not kernel_supports(images, patch):
        raise ValueError(f"the patch kernel cannot take {images.dtype} images of shape {tuple(images.shape)} on "
                         f"{images.device} with patch {patch}")
    if shift < 0:
        raise ValueError(f"shift must be at least 0, got {shift}")
    images = images.detach().contiguous()
    count, channels, height, width = images.shape
    patches = torch.empty(count, (height // patch) * (width // patch), 5 * channels * patch * patch)
    with torch.profiler.record_function("vitlab::shifted_patches"):  # an operator of its own in a profile (benchmarks)
        loaded_library().vitlab_shifted_patches(images.data_ptr(), patches.data_ptr(), count, channels, height, width, patch,
                                                shift, torch.get_num_threads())
    return patches


def plain_cut_supports(images: torch.Tensor, patch: int) -> bool:
    """Whether `patches_bf16` takes these with the kernels switched on: as `kernel_supports`, and rows no wider than
    the kernel's buffer (patches.c rounds an image row at a time into it)."""
    return kernel_supports(images, patch) and images.shape[3] <= loaded_library().vitlab_patches_max_width()


def patches_bf16(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, (H/P)·(W/P), C·P·P) bf16: each patch as (channel, row, column), rounded as `.to(torch.bfloat16)` rounds.
    What `images.to(torch.bfloat16)` cut by reshape and permute gives, bit for bit (a NaN stays a NaN)."""
    if not kernel_supports(images, patch):
        raise ValueError(f"the patch kernel cannot take {images.dtype} images of shape {tuple(images.shape)} on "
                         f"{images.device} with patch {patch}")
    count, channels, height, width = images.shape
    widest = loaded_library().vitlab_patches_max_width()
    if width > widest:
        raise ValueError(f"the patch kernel takes images at most {widest} pixels wide, got {width}")
    images = images.detach().contiguous()
    patches = torch.empty(count, (height // patch) * (width // patch), channels * patch * patch, dtype=torch.bfloat16)
    with torch.profiler.record_function("vitlab::patches"):  # an operator of its own in a profile (benchmarks)
        failed = loaded_library().vitlab_patches_bf16(images.data_ptr(), patches.data_ptr(), count, channels, height,
                                                      width, patch, torch.get_num_threads())
    if failed:  # the width was checked above
        raise RuntimeError(f"patches.c refused rows of {width} pixels")
    return patches
