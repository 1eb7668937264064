"""An uploaded file → a 32×32 RGB image, or a one-line refusal the page shows as it is.

The size limit is checked here as well as by the server (`launch(max_file_size=...)`), and the pixel
count is read from the header before decoding: a small PNG can still hold a huge, mostly empty image.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from vitlab.errors import VitlabError
from vitlab.inspect.images import load_image_file
from vitlab.serve.runs import IMAGE_SIZE

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000  # e.g. 8000 × 5000; decoding more would take seconds and gigabytes


def size_text(count: int) -> str:
    return f"{count / 2**20:.1f} MB" if count >= 2**20 // 10 else f"{count / 2**10:.1f} kB"


def read_upload(path: str | Path, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS) -> torch.Tensor:
    """The uploaded image as (3, 32, 32) uint8, resized whole; a `VitlabError` for anything else."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
    except OSError:
        raise VitlabError(f"{name} could not be read back after the upload; upload it again") from None
    if size > max_bytes:
        raise VitlabError(f"{name} is {size_text(size)}, over the {size_text(max_bytes)} upload limit; upload a smaller image")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise VitlabError(f"{name} is not an image; upload a PNG, JPEG, GIF, BMP or WebP file") from None
    if width * height > max_pixels:
        raise VitlabError(f"{name} is {width}×{height} pixels, over the {max_pixels / 1e6:g} million pixel limit; upload a smaller image")
    try:
        return load_image_file(path, size=IMAGE_SIZE)
    except ValueError:  # a valid header over damaged pixel data
        raise VitlabError(f"{name} is a damaged image (its pixels cannot be decoded); upload another file") from None
