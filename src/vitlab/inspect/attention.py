"""What a ViT attends to: raw attention per layer and head, attention rollout, attention distance.

Token layout (see `VisionTransformer`): `[CLS] + patches + registers` for pool='cls', `patches +
registers` otherwise, patches in row-major order over the padded grid (`config.patch_tokens`). For a
model without a CLS token the pooled output (mean or learned weighting of the patch tokens) plays its
role, so "attention to patch j" is the mean over the patch queries of their attention to j (for
sequence pooling an approximation: its weights depend on the image). Register tokens are left out.

Rollout (Abnar & Zuidema 2020): average the heads, add the identity for the residual path,
renormalise the rows, and multiply the layers' matrices from the first to the last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitlab.models.base import eval_mode
from vitlab.models.vit import VisionTransformer


@torch.inference_mode()
def attention_stack(model: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, classes) and attention (L, B, heads, T, T) of normalised `images` (B, 3, H, W), in fp32."""
    with eval_mode(model):
        logits, maps = model(images.float(), return_attention=True)
    return logits.float(), torch.stack([m.float() for m in maps])


def rollout(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout through the layers: (L, B, heads, T, T) → (B, T, T).

    Row i of the result says how much each input token contributes to token i after the last layer.
    """
    if head_fusion == "mean":
        fused = attention.mean(dim=2)  # (L, B, T, T)
    elif head_fusion == "max":
        fused = attention.amax(dim=2)
    elif head_fusion == "min":
        fused = attention.amin(dim=2)
    else:
        raise ValueError(f"head_fusion must be mean, max or min, got {head_fusion}")
    identity = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    result = identity.expand_as(fused[0]).clone()  # (B, T, T)
    for layer in fused:
        with_residual = layer + identity
        with_residual = with_residual / with_residual.sum(dim=-1, keepdim=True)
        result = with_residual @ result  # later layers on the left
    return result


def patch_scores(matrix: torch.Tensor, config) -> torch.Tensor:
    """How much the output attends to each patch: (B, T, T) or (B, heads, T, T) → (B, [heads,] N).

    CLS models: the CLS row over the patch columns. Others: the mean of the patch rows over the patch columns.
    """
    patches = config.patch_tokens
    if config.pool == "cls":
        return matrix[..., 0, patches]
    return matrix[..., patches, patches].mean(dim=-2)


def to_image_grid(scores: torch.Tensor, model: VisionTransformer, image_size: int | None = None) -> torch.Tensor:
    """Patch scores (..., N) → maps (..., H, W) over the original image: upsampled (bilinear) to the padded
    image, then the padding cropped away, so patch sizes that do not divide the image line up."""
    config = model.config
    image_size = image_size or config.image_size
    grid = config.grid_size
    leading = scores.shape[:-1]
    maps = scores.reshape(-1, 1, grid, grid)
    padded = grid * config.patch_size
    maps = F.interpolate(maps, size=(padded, padded), mode="bilinear", align_corners=False)
    before = model.patch_embedding.padding[0]
    maps = maps[..., before:before + image_size, before:before + image_size]
    return maps.reshape(*leading, image_size, image_size)


def mean_attention_distance(attention: torch.Tensor, model: VisionTransformer) -> torch.Tensor:
    """Mean attention distance in pixels (ViT paper, fig. 7): for each layer and head, the distance
    between query and key patch centres weighted by the attention, averaged over query patches and
    images. (L, B, heads, T, T) → (L, heads). The CLS token is left out."""
    config = model.config
    grid = config.grid_size
    patches = config.patch_tokens
    if config.num_tokens != config.num_patches:  # leave out CLS and register tokens
        attention = attention[..., patches, patches]
        attention = attention / attention.sum(dim=-1, keepdim=True)  # renormalise over patches
    positions = torch.arange(grid, device=attention.device)
    coords = torch.stack(torch.meshgrid(positions, positions, indexing="ij"), dim=-1).reshape(-1, 2)
    distances = torch.cdist(coords.double(), coords.double()).to(attention.dtype) * config.patch_size  # (N, N) pixels
    return (attention * distances).sum(dim=-1).mean(dim=(1, 3))  # (L, heads)


def rollout_maps(model: VisionTransformer, attention: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
    """The attention rollout of `attention` (L, B, heads, T, T) as one map per image over its pixels (B, H, W)."""
    return to_image_grid(patch_scores(rollout(attention), model.config), model, image_size)
