"""Uploads: any image becomes 32×32 RGB; text, damaged, too large and too many pixels are refused in one line."""

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.errors import VitlabError
from vitlab.inspect.images import load_image_file
from vitlab.serve.uploads import read_upload


def test_any_image_is_resized_whole_to_32_by_32(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)).save(path)
    image = read_upload(path)
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert torch.equal(image, load_image_file(path))  # the same resize as `vitlab predict`


def test_a_grey_image_with_alpha_becomes_rgb_of_its_colour(tmp_path):
    path = tmp_path / "flat.png"
    Image.new("LA", (64, 48), (200, 255)).save(path)
    assert torch.equal(read_upload(path), torch.full((3, 32, 32), 200, dtype=torch.uint8))


def test_a_text_file_is_refused_by_name(tmp_path):
    path = tmp_path / "notes.png"  # the extension does not decide
    path.write_text("not an image")
    with pytest.raises(VitlabError, match=r"^notes.png is not an image; upload a PNG, JPEG"):
        read_upload(path)


def test_a_file_over_the_size_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)  # about 12 kB
    with pytest.raises(VitlabError, match=r"^big.png is 12.\d kB, over the 2.0 kB upload limit; upload a smaller image$"):
        read_upload(path, max_bytes=2048)
    assert read_upload(path, max_bytes=path.stat().st_size).shape == (3, 32, 32)  # at the limit is fine


def test_an_image_with_too_many_pixels_is_refused(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("RGB", (400, 300)).save(path)  # compresses to almost nothing
    with pytest.raises(VitlabError, match=r"is 400×300 pixels, over the 0.1 million pixel limit"):
        read_upload(path, max_pixels=100_000)


def test_a_truncated_image_is_refused_as_damaged(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:2000])  # the header survives, the pixels do not
    with pytest.raises(VitlabError, match="cut.png is a damaged image"):
        read_upload(path)
