import pytest
import torch

from vitlab.data import MEAN, STD, DeviceBatches, apply_crop_flip, draw_crop_flip, normalization_affine, normalize
from vitlab.kernels import augment as augment_kernel
from vitlab.kernels import switch_kernels

IMAGES = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
SUPPORTED = augment_kernel.kernel_supports(IMAGES, torch.zeros(1, dtype=torch.int64))
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="no C compiler for vitlab's kernels")


@pytest.mark.parametrize("padding", [0, 1, 4, 40])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_it_gives_the_operators_crop_flip_and_normalisation_bit_for_bit(padding, memory_format):
    generator = torch.Generator().manual_seed(padding)
    index = torch.randint(0, len(IMAGES), (37,), generator=generator)
    offsets, flips = draw_crop_flip(37, padding, generator)
    expected = normalize(apply_crop_flip(IMAGES[index], padding, offsets, flips).contiguous(memory_format=memory_format))
    scale, shift = normalization_affine(torch.device("cpu"), torch.float32, tuple(MEAN), tuple(STD))
    got = augment_kernel.crop_flip_normalize(IMAGES, index, offsets, flips, padding, scale, shift, memory_format)
    assert torch.equal(got, expected) and got.stride() == expected.stride()


def test_other_image_sizes_and_channels():
    images = torch.randint(0, 256, (5, 1, 7, 13), dtype=torch.uint8)
    index, offsets, flips = torch.tensor([4, 0, 4]), torch.tensor([[0, 3, 6], [6, 0, 2]]), torch.tensor([True, False, True])
    scale, shift = torch.tensor([0.5]).view(1, 1, 1, 1), torch.tensor([-1.0]).view(1, 1, 1, 1)
    expected = apply_crop_flip(images[index], 3, offsets, flips).contiguous().float() * 0.5 - 1.0
    assert torch.equal(augment_kernel.crop_flip_normalize(images, index, offsets, flips, 3, scale, shift), expected)


def test_bad_indices_offsets_or_shapes_are_refused_before_anything_is_read():
    scale, shift = normalization_affine(torch.device("cpu"), torch.float32, tuple(MEAN), tuple(STD))
    good_offsets, flips = torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, dtype=torch.bool)
    for index, offsets, message in ((torch.tensor([0, 300]), good_offsets, "index out of range"),
                                    (torch.tensor([-1, 0]), good_offsets, "index out of range"),
                                    (torch.tensor([0, 1]), torch.full((2, 2), 9), "offsets"),
                                    (torch.tensor([0, 1]), torch.zeros(2, 3, dtype=torch.int64), "offsets")):
        with pytest.raises(ValueError, match=message):
            augment_kernel.crop_flip_normalize(IMAGES, index, offsets, flips, 4, scale, shift)
    assert not augment_kernel.kernel_supports(IMAGES.float(), torch.zeros(1, dtype=torch.int64))
    assert not augment_kernel.kernel_supports(IMAGES[:, :, :, :16], torch.zeros(1, dtype=torch.int64))  # not contiguous


@pytest.mark.parametrize("options", [{}, {"memory_format": torch.channels_last}, {"random_erasing": 0.5}, {"flip": False},
                                     {"crop_padding": 0}])
def test_training_batches_are_the_same_with_the_kernel_and_without(monkeypatch, options):
    calls = []
    kernel = augment_kernel.crop_flip_normalize
    monkeypatch.setattr(augment_kernel, "crop_flip_normalize", lambda *args: calls.append(1) or kernel(*args))
    labels = torch.arange(len(IMAGES)) % 10
    batches = []
    for on in (True, False):
        switch_kernels(on)
        try:
            loader = DeviceBatches(IMAGES, labels, 64, train=True, device=torch.device("cpu"), seed=3, **options)
            order = loader.new_order()
            batches.append([loader.batch(step, order) for step in range(3)])
        finally:
            switch_kernels(True)
    assert len(calls) == 3  # the kernel made every batch of the first pass, none of the second
    for (kernel_images, kernel_labels), (images, labels_) in zip(*batches, strict=True):
        assert torch.equal(kernel_images, images) and kernel_images.stride() == images.stride() and torch.equal(kernel_labels, labels_)
