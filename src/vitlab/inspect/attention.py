"""What a ViT attends to: raw attention per layer and head, attention rollout (plain and gradient-weighted),
attention distance. Works for any model that returns attention (vitlab's ViT, timm ViTs) through its
`TokenLayout`: prefix tokens (CLS, registers) first, then the patches in row-major order.

A CLS-read model's "attention to patch j" is the CLS row's entry j. A mean-pooled model has no CLS row;
its output is the mean of the patch tokens, so "attention to patch j" is the mean over the patch rows.

Rollout (Abnar & Zuidema 2020): fuse the heads, add the identity for the residual path, renormalise the
rows, and multiply the layers' matrices from the first to the last. Head fusion mean, max or min and a
discard ratio (drop the weakest attention entries of each layer before the product) follow jacobgil's
vit-explain. Gradient-weighted rollout (Chefer et al. 2021, "Generic Attention-model Explainability"):
each head's attention is weighted by the gradient of the explained class's logit with respect to it,
negative contributions are clipped, then the heads are fused and rolled out as above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import VitlabError
from vitlab.models.base import TokenLayout, eval_mode

HEAD_FUSIONS = ("mean", "max", "min")


def require_attention(model: nn.Module) -> TokenLayout:
    """The model's token layout; a clear error for models without attention."""
    if not getattr(model, "returns_attention", False):
        raise VitlabError(f"model '{getattr(model, 'name', type(model).__name__)}' returns no attention; attention maps and rollout "
                          "are for ViT runs (vit, or a timm ViT such as timm:vit_tiny_patch16_224)")
    return model.token_layout()


@torch.inference_mode()
def attention_stack(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, classes) and attention (L, B, heads, T, T) of normalised `images` (B, 3, H, W), in fp32."""
    require_attention(model)
    with eval_mode(model):
        logits, maps = model(images.float(), return_attention=True)
    return logits.float(), torch.stack([m.float() for m in maps])


def attention_with_gradients(model: nn.Module, images: torch.Tensor, class_index: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (B, classes), attention (L, B, heads, T, T) and d(logit of the explained class)/d(attention),
    same shape. The explained class is `class_index` (B,) or the predicted one."""
    require_attention(model)
    with eval_mode(model), torch.enable_grad():
        logits, maps = model(images.float(), return_attention=True)
        for weights in maps:
            weights.retain_grad()
        chosen = logits.argmax(dim=1) if class_index is None else class_index.to(logits.device)
        logits.float().gather(1, chosen[:, None]).sum().backward()  # each image's logit depends only on that image
    gradients = torch.stack([weights.grad.float() for weights in maps])
    model.zero_grad(set_to_none=True)
    return logits.detach().float(), torch.stack([weights.detach().float() for weights in maps]), gradients


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(..., heads, T, T) → (..., T, T) by the mean, maximum or minimum over the heads."""
    if head_fusion == "mean":
        return attention.mean(dim=-3)
    if head_fusion == "max":
        return attention.amax(dim=-3)
    if head_fusion == "min":
        return attention.amin(dim=-3)
    raise VitlabError(f"head fusion must be one of {', '.join(HEAD_FUSIONS)}, got '{head_fusion}'")


def discard_lowest(fused: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """Zero the `discard_ratio` share of weakest entries of each (T, T) matrix of `fused` (..., T, T),
    keeping the diagonal (a token's path to itself carries the residual stream)."""
    if not 0.0 <= discard_ratio < 1.0:
        raise VitlabError(f"discard ratio must be in [0, 1), got {discard_ratio}")
    count = int(fused.shape[-1] ** 2 * discard_ratio)
    if count == 0:
        return fused
    flat = fused.flatten(-2)  # (..., T*T)
    lowest = flat.topk(count, dim=-1, largest=False).indices
    kept = torch.ones_like(flat).scatter(-1, lowest, 0.0).view_as(fused)
    diagonal = torch.eye(fused.shape[-1], dtype=torch.bool, device=fused.device)
    return torch.where(diagonal | kept.bool(), fused, torch.zeros_like(fused))


def rollout(attention: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0,
            gradients: torch.Tensor | None = None) -> torch.Tensor:
    """Attention rollout through the layers: (L, B, heads, T, T) → (B, T, T).

    Row i of the result says how much each input token contributes to token i after the last layer.
    With `gradients` (same shape as `attention`), each head's attention is first weighted by its gradient
    and clipped at zero (gradient-weighted rollout, Chefer et al. 2021).
    """
    if gradients is not None:
        attention = (attention * gradients).clamp_min(0)
    fused = discard_lowest(fuse_heads(attention, head_fusion), discard_ratio)  # (L, B, T, T)
    identity = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    result = identity.expand_as(fused[0]).clone()  # (B, T, T)
    for layer in fused:
        with_residual = layer + identity
        with_residual = with_residual / with_residual.sum(dim=-1, keepdim=True)
        result = with_residual @ result  # later layers on the left
    return result


def patch_scores(matrix: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """How much the output attends to each patch: (B, T, T) or (B, heads, T, T) → (B, [heads,] N).

    CLS-read models: the CLS row over the patch columns. Mean-pooled models: the mean over the patch rows.
    """
    patches = matrix[..., layout.patch_tokens]  # (..., T, N): register tokens (before or after the patches) left out
    if layout.readout == "cls":
        return patches[..., 0, :]
    return patches[..., layout.patch_tokens, :].mean(dim=-2)


def to_image_grid(scores: torch.Tensor, layout: TokenLayout, image_size: int) -> torch.Tensor:
    """Patch scores (..., N) → maps (..., H, W) over the original image: upsampled (bilinear) to the patch
    grid's pixels, then shifted by the grid's padding and cropped (or zero-padded where the grid does not
    reach) to the image, so patch sizes that do not divide the image line up."""
    grid = layout.grid_size
    leading = scores.shape[:-1]
    maps = scores.reshape(-1, 1, grid, grid)
    covered = grid * layout.patch_size
    maps = F.interpolate(maps, size=(covered, covered), mode="bilinear", align_corners=False)  # (B', 1, G*P, G*P)
    after = image_size - (covered - layout.padding)  # negative: crop the padding; positive: pixels the grid misses
    maps = F.pad(maps, (-layout.padding, after, -layout.padding, after))  # (B', 1, H, W)
    return maps.reshape(*leading, image_size, image_size)


def mean_attention_distance(attention: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Mean attention distance in pixels (ViT paper, fig. 7): for each layer and head, the distance
    between query and key patch centres weighted by the attention, averaged over query patches and
    images. (L, B, heads, T, T) → (L, heads). Prefix tokens (CLS, registers) are left out."""
    grid, patches = layout.grid_size, layout.patch_tokens
    if layout.num_tokens != layout.num_patches:
        attention = attention[..., patches, patches]
        attention = attention / attention.sum(dim=-1, keepdim=True)  # renormalise over patches
    positions = torch.arange(grid, device=attention.device)
    coords = torch.stack(torch.meshgrid(positions, positions, indexing="ij"), dim=-1).reshape(-1, 2)
    distances = torch.cdist(coords.double(), coords.double()).to(attention.dtype) * layout.patch_size  # (N, N) pixels
    return (attention * distances).sum(dim=-1).mean(dim=(1, 3))  # (L, heads)


def rollout_maps(model: nn.Module, attention: torch.Tensor, image_size: int, head_fusion: str = "mean", discard_ratio: float = 0.0,
                 gradients: torch.Tensor | None = None) -> torch.Tensor:
    """The (gradient-weighted, with `gradients`) rollout of `attention` (L, B, heads, T, T) as one map per
    image over its pixels (B, H, W)."""
    layout = model.token_layout()
    flow = rollout(attention, head_fusion, discard_ratio, gradients)  # (B, T, T)
    return to_image_grid(patch_scores(flow, layout), layout, image_size)
