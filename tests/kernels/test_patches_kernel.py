import pytest
import torch
import torch.nn.functional as F

from vitlab.kernels import patches as patches_kernel
from vitlab.kernels import switch_kernels
from vitlab.models.vit import ShiftedPatchTokenizer, ViTConfig

SUPPORTED = patches_kernel.kernel_supports(torch.zeros(1, 3, 4, 4), 4)
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="no C compiler for vitlab's kernels")


def reference_patches(images: torch.Tensor, patch: int, shift: int) -> torch.Tensor:
    """Pixel by pixel: patches[b, gy·GW + gx, k, c, r, q] = images[b, c, gy·P + r + dy_k, gx·P + q + dx_k], else 0."""
    count, channels, height, width = images.shape
    moves = [(0, 0), (-shift, -shift), (-shift, shift), (shift, -shift), (shift, shift)]
    padded = F.pad(images, (shift, shift, shift, shift))
    out = torch.zeros(count, height // patch, width // patch, 5, channels, patch, patch)
    for gy in range(height // patch):
        for gx in range(width // patch):
            for k, (dy, dx) in enumerate(moves):
                top, left = shift + gy * patch + dy, shift + gx * patch + dx
                out[:, gy, gx, k] = padded[:, :, top:top + patch, left:left + patch]
    return out.reshape(count, (height // patch) * (width // patch), -1)


@pytest.mark.parametrize("patch,shift", [(1, 1), (2, 1), (4, 2), (4, 0), (5, 3), (8, 4), (4, 9)])
@pytest.mark.parametrize("channels,height,width", [(3, 32, 32), (1, 8, 24)])
def test_the_cut_is_the_padded_views_patches_bit_for_bit(patch, shift, channels, height, width):
    if height % patch or width % patch:
        height, width = height // patch * patch, width // patch * patch
    images = torch.randn(3, channels, height, width, generator=torch.Generator().manual_seed(patch + shift))
    assert torch.equal(patches_kernel.shifted_patches(images, patch, shift), reference_patches(images, patch, shift))


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_the_tokenizer_cuts_the_same_patches_with_and_without_the_kernel(patch_size):
    tokenizer = ShiftedPatchTokenizer(ViTConfig(patch_size=patch_size, hidden_size=32, num_heads=4, num_blocks=1, stem="spt"))
    images = torch.randn(2, 3, 32, 32)
    with_kernel = tokenizer.patches(images)
    switch_kernels(False)
    try:
        without = tokenizer.patches(images)
    finally:
        switch_kernels(True)
    assert torch.equal(with_kernel, without)


def test_images_that_want_a_gradient_go_through_the_operators_so_it_reaches_them():
    tokenizer = ShiftedPatchTokenizer(ViTConfig(patch_size=4, hidden_size=32, num_heads=4, num_blocks=1, stem="spt"))
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    assert not patches_kernel.kernel_supports(images, 4)
    tokenizer(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize("images,patch", [(torch.zeros(2, 3, 30, 32), 4), (torch.zeros(2, 3, 32, 32, dtype=torch.bfloat16), 4),
                                          (torch.zeros(3, 32, 32), 4), (torch.zeros(2, 3, 32, 32), 0)])
def test_shapes_and_dtypes_it_does_not_take_are_refused_with_a_message(images, patch):
    assert not patches_kernel.kernel_supports(images, patch)
    with pytest.raises(ValueError, match="the patch kernel cannot take"):
        patches_kernel.shifted_patches(images, patch, 1)
