"""What a CNN looks at: feature maps of each stage and Grad-CAM (Selvaraju et al. 2017).

Grad-CAM for class c at a layer with activations A (B, C, h, w): weight each channel by the mean over
space of dy_c/dA, sum the weighted channels, keep the positive part, upsample to the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import VitlabError
from vitlab.models.base import eval_mode


def model_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's declared convolutional stages (VitlabModel.stages); an error for models without them."""
    if not getattr(model, "has_stages", False):
        raise VitlabError(f"model '{getattr(model, 'name', type(model).__name__)}' has no convolutional stages; "
                          "feature maps and Grad-CAM are for cnn-small, cnn and aircnn")
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


def grad_cam(model: nn.Module, images: torch.Tensor, layer: nn.Module | None = None,
             class_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps (B, H, W) in [0, 1] (each map scaled by its maximum) and the logits (B, classes).

    Args:
        layer: the module whose output is explained (default: the model's last stage).
        class_index: (B,) classes to explain (default: the predicted ones).
    """
    layer = layer or model_stages(model)[-1][1]
    stored: dict[str, torch.Tensor] = {}

    def keep(module, inputs, output):
        output.retain_grad()
        stored["activations"] = output

    handle = layer.register_forward_hook(keep)
    try:
        with eval_mode(model), torch.enable_grad():
            inputs = images.float().clone().requires_grad_(True)  # so a frozen first layer still has a graph
            logits = model(inputs).float()  # (B, classes)
            chosen = logits.argmax(dim=1) if class_index is None else class_index.to(logits.device)
            logits.gather(1, chosen[:, None]).sum().backward()
    finally:
        handle.remove()
    activations = stored["activations"]  # (B, C, h, w)
    weights = activations.grad.float().mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    cam = F.relu((weights * activations.detach().float()).sum(dim=1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    cam = cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    model.zero_grad(set_to_none=True)
    return cam, logits.detach()
