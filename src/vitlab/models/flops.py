"""FLOPs per image, counted by `torch.utils.flop_counter` (a multiply-add counts as 2 FLOPs).

A ViT (vitlab's or timm's) is counted through its explicit attention path, so the attention matmuls are counted the same
whether or not the fused kernel would run. vitlab's ViT is counted along the path it trains on: under CLS pooling its
last block computes the CLS token alone (models/vit.py), so the work it skips is not counted as done.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitlab.models.base import eval_mode
from vitlab.models.layers import written_out_attention


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "reads_only_the_cls_token"):  # vitlab's ViT: the path it runs, every attention written out
        with written_out_attention():
            return model(images)
    if getattr(model, "returns_attention", False):
        return model(images, return_attention=True)[0]
    return model(images)


def forward_flops_per_image(model: nn.Module, image_size: int = 32, batch: int = 4) -> float:
    """FLOPs of one inference forward pass per image."""
    device = next(model.parameters()).device
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        _logits(model, torch.randn(batch, 3, image_size, image_size, device=device))
    return counter.get_total_flops() / batch


def train_flops_per_image(model: nn.Module, image_size: int = 32, batch: int = 16) -> float:
    """FLOPs of one training forward + backward pass per image."""
    device = next(model.parameters()).device
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(_logits(model, images), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch
