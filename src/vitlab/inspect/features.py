"""What a CNN computes: the feature maps of each declared stage (the layers CAMs explain, see cams.py)."""

from __future__ import annotations

import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.models.base import eval_mode


def model_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's declared convolutional stages (VitlabModel.stages); an error for models without them."""
    if not getattr(model, "has_stages", False):
        raise VitlabError(f"model '{getattr(model, 'name', type(model).__name__)}' has no convolutional stages; "
                          "feature maps and CAMs are for cnn-small, cnn, aircnn and timm CNNs such as timm:resnet18")
    return model.stages()


@torch.inference_mode()
def feature_maps(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """Logits (B, classes) and each stage's output (B, C, h, w) for normalised `images`."""
    captured: list[torch.Tensor] = []
    handles = [module.register_forward_hook(lambda m, i, o: captured.append(o.detach().float())) for _, module in model_stages(model)]
    try:
        with eval_mode(model):
            logits = model(images).float()
    finally:
        for handle in handles:
            handle.remove()
    return logits, [(name, maps) for (name, _), maps in zip(model_stages(model), captured, strict=True)]
