"""ctypes bindings of augment.c: a training batch's random crop, flip and normalisation in one pass."""

from __future__ import annotations

import torch

from vitlab.kernels.build import compiled_library, loaded_library


def kernel_supports(images: torch.Tensor, index: torch.Tensor) -> bool:
    """Whether `crop_flip_normalize` will take these with the kernels switched on: contiguous (N, C, H, W) uint8 images
    on the CPU at most the kernel's width, and an int64 CPU index."""
    library = compiled_library()
    return (library is not None and images.device.type == "cpu" and images.dtype == torch.uint8 and images.dim() == 4
            and images.is_contiguous() and 0 < images.shape[-1] <= library.vitlab_crop_flip_max_width()
            and index.device.type == "cpu" and index.dtype == torch.int64 and index.dim() == 1)


def crop_flip_normalize(images: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int,
                        scale: torch.Tensor, shift: torch.Tensor,
                        memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """images[index] cropped from a zero-padded copy at `offsets` (2, B) (rows, then columns, in [0, 2·padding]),
    mirrored where `flips` (B,), and normalised as u · scale + shift per channel (scale, shift: (1, C, 1, 1) fp32) →
    (B, C, H, W) fp32 in `memory_format`: what `apply_crop_flip` then `normalize` give, bit for bit."""
    if not kernel_supports(images, index):
        raise ValueError(f"the crop kernel cannot take {images.dtype} images of shape {tuple(images.shape)} on {images.device}")
    count = len(index)
    _, channels, height, width = images.shape
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(images)):
        raise ValueError(f"image index out of range for {len(images)} images")
    offsets = offsets.to(torch.int64).contiguous()
    if offsets.shape != (2, count) or (count and (int(offsets.min()) < 0 or int(offsets.max()) > 2 * padding)):
        raise ValueError(f"offsets must be (2, {count}) in [0, {2 * padding}], got shape {tuple(offsets.shape)}")
    flips = flips.to(torch.uint8).contiguous()
    scale, shift = (t.to(torch.float32).reshape(-1).contiguous() for t in (scale, shift))
    if flips.shape != (count,) or scale.shape != (channels,) or shift.shape != (channels,):
        raise ValueError(f"flips must be ({count},) and scale and shift one value per channel ({channels})")
    out = torch.empty((count, channels, height, width), dtype=torch.float32, memory_format=memory_format)
    strides = torch.tensor(out.stride(), dtype=torch.int64)
    index = index.contiguous()
    loaded_library().vitlab_crop_flip_normalize(images.data_ptr(), index.data_ptr(), offsets.data_ptr(), flips.data_ptr(), count,
                                                channels, height, width, padding, scale.data_ptr(), shift.data_ptr(), out.data_ptr(),
                                                strides.data_ptr(), torch.get_num_threads())
    return out
