import pytest
import torch
import torch.nn.functional as F

from vitlab.kernels import patches as patches_kernel
from vitlab.kernels import switch_kernels
from vitlab.models.vit import PatchEmbedding, ShiftedPatchTokenizer, ViTConfig

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
    with pytest.raises(ValueError, match="the patch kernel cannot take"):
        patches_kernel.patches_bf16(images, patch)


def reference_plain_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Pixel by pixel: patches[b, gy·GW + gx, c, r, q] = bf16(images[b, c, gy·P + r, gx·P + q])."""
    count, channels, height, width = images.shape
    out = torch.zeros(count, height // patch, width // patch, channels, patch, patch, dtype=torch.bfloat16)
    for gy in range(height // patch):
        for gx in range(width // patch):
            out[:, gy, gx] = images[:, :, gy * patch:(gy + 1) * patch, gx * patch:(gx + 1) * patch].to(torch.bfloat16)
    return out.reshape(count, (height // patch) * (width // patch), -1)


@pytest.mark.parametrize("patch", [1, 2, 4, 5, 8, 16])
@pytest.mark.parametrize("channels,height,width", [(3, 32, 32), (1, 8, 40), (2, 48, 16)])
def test_the_bf16_cut_is_each_patch_rounded_as_pytorch_rounds_bit_for_bit(patch, channels, height, width):
    height, width = max(patch, height // patch * patch), max(patch, width // patch * patch)
    images = torch.randn(3, channels, height, width, generator=torch.Generator().manual_seed(patch)) * 100
    images[0, 0, 0, :3] = torch.tensor([1e-40, -3e38, 1.00390625])[:width]  # a subnormal, near the top, a tie to even
    got = patches_kernel.patches_bf16(images, patch)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), reference_plain_patches(images, patch).view(torch.int16))


def test_the_bf16_cut_keeps_nan_and_infinities():
    images = torch.randn(1, 3, 8, 8)
    images[0, 1, 2, 3], images[0, 2, 7, 7], images[0, 0, 0, 0] = float("nan"), float("inf"), float("-inf")
    got, expected = patches_kernel.patches_bf16(images, 4).float(), reference_plain_patches(images, 4).float()
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("patch_size", [2, 4, 6])
def test_the_patch_embedding_under_autocast_gives_the_same_bits_with_and_without_the_kernel_cut(patch_size):
    torch.manual_seed(0)
    embedding = PatchEmbedding(ViTConfig(patch_size=patch_size, hidden_size=32, num_heads=4, num_blocks=1))
    images = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", torch.bfloat16):
        assert embedding.cuts_in_kernel(F.pad(images, (*embedding.padding, *embedding.padding)))  # 6: padded to 36
        with_kernel = embedding(images)
        with_kernel.float().square().sum().backward()
        grads = [p.grad.clone() for p in embedding.parameters()]
        embedding.zero_grad()
        embedding.cuts_in_kernel = lambda images: False
        without = embedding(images)
        without.float().square().sum().backward()
    assert torch.equal(with_kernel, without)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, embedding.parameters(), strict=True))


def test_rows_wider_than_the_kernel_takes_are_refused_with_a_message():
    images = torch.zeros(1, 1, 4, 4096 + 4)  # patches.c's buffer holds 4096 numbers
    assert patches_kernel.kernel_supports(images, 4) and not patches_kernel.plain_cut_supports(images, 4)
    with pytest.raises(ValueError, match="at most 4096 pixels wide"):
        patches_kernel.patches_bf16(images, 4)
    with torch.autocast("cpu", torch.bfloat16):
        assert not PatchEmbedding(ViTConfig(patch_size=4, hidden_size=32, num_heads=4, num_blocks=1)).cuts_in_kernel(images)
