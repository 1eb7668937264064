"""Class activation maps on CNNs and ViTs, computed by the field's library: pytorch-grad-cam (Gildenblat
and contributors; PyPI `grad-cam`). Methods: Grad-CAM (Selvaraju et al. 2017), Grad-CAM++ (Chattopadhay
et al. 2018), Score-CAM (Wang et al. 2020), EigenCAM (Muhammad & Yeasin 2020), LayerCAM (Jiang et al. 2021).

The explained layer:
- CNN: the last declared stage whose output has at least 2×2 positions. A 1×1 map says nothing about
  where (timm's resnet18 on 32×32 images ends at 1×1, so its layer3, 2×2, is explained).
- ViT: the token layer (`token_layer()`, the last block's input norm), its patch tokens reshaped to the
  patch grid (B, D, G, G) with the prefix tokens (CLS, registers) dropped: the library's ViT recipe.

The library makes each map at that layer's own resolution (ReLU, then scaled to [0, 1]); vitlab then
upsamples it to the image, bilinearly, and for ViTs through the token layout, so a padded patch grid
lines up with the pixels. Every map is in [0, 1].
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import VitlabError
from vitlab.inspect.attention import to_image_grid
from vitlab.inspect.features import feature_maps
from vitlab.models.base import eval_mode

INSTALL_HINT = "pip install 'vitlab[explain]'"
# vitlab's method name → the pytorch-grad-cam class that computes it.
CAM_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "scorecam": "ScoreCAM", "eigencam": "EigenCAM", "layercam": "LayerCAM"}
SCORE_CAM_BATCH = 128  # masked images per forward pass in Score-CAM (the library's default is 16)


def import_grad_cam():
    """The pytorch_grad_cam package, or a one-line error saying how to install it."""
    try:
        import pytorch_grad_cam
    except ImportError:
        raise VitlabError(f"CAMs need the grad-cam package (pytorch-grad-cam); {INSTALL_HINT}") from None
    return pytorch_grad_cam


@dataclass
class CamLayer:
    """The layer a CAM explains and how its output and maps are shaped."""

    module: nn.Module
    description: str
    reshape: Callable[[torch.Tensor], torch.Tensor] | None  # the layer's output → (B, C, h, w), for token layers
    to_image: Callable[[torch.Tensor], torch.Tensor]  # maps (B, h, w) → (B, H, W)


def cam_layer(model: nn.Module, images: torch.Tensor) -> CamLayer:
    """The layer CAMs explain for `model` on normalised `images` (B, 3, H, W) (see the module doc)."""
    image_size = images.shape[-1]
    if getattr(model, "returns_attention", False):
        layout = model.token_layout()

        def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
            patches = tokens[:, layout.prefix_tokens:]  # (B, N, D)
            grid = patches.reshape(patches.shape[0], layout.grid_size, layout.grid_size, patches.shape[-1])  # (B, G, G, D)
            return grid.permute(0, 3, 1, 2)  # (B, D, G, G)

        return CamLayer(model.token_layer(), "patch tokens before the last block", tokens_to_grid,
                        lambda maps: to_image_grid(maps.flatten(1), layout, image_size))
    if getattr(model, "has_stages", False):
        _, stages = feature_maps(model, images[:1])
        spatial = [index for index, (_, maps) in enumerate(stages) if maps.shape[-1] * maps.shape[-2] >= 4]
        index = spatial[-1] if spatial else len(stages) - 1
        return CamLayer(model.stages()[index][1], stages[index][0], None,
                        lambda maps: F.interpolate(maps[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0])
    raise VitlabError(f"model '{getattr(model, 'name', type(model).__name__)}' has neither convolutional stages nor attention; "
                      "CAMs are for CNN and ViT runs")


def cam_maps(model: nn.Module, images: torch.Tensor, method: str, class_index: torch.Tensor | None = None,
             layer: CamLayer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM maps (B, H, W) in [0, 1] of normalised `images` (B, 3, H, W) and the logits (B, classes).

    Args:
        method: one of CAM_METHODS (gradcam, gradcam++, scorecam, eigencam, layercam).
        class_index: (B,) classes to explain (default: the predicted ones).
        layer: the layer to explain (default: `cam_layer(model, images)`).
    """
    if method not in CAM_METHODS:
        raise VitlabError(f"unknown CAM method '{method}'; choose from {', '.join(CAM_METHODS)}")
    library = import_grad_cam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    device = next(model.parameters()).device
    images = images.to(device).float()
    with eval_mode(model):
        layer = layer or cam_layer(model, images)
        if class_index is None:
            with torch.no_grad():
                class_index = model(images).argmax(dim=1)
        targets = [ClassifierOutputTarget(int(index)) for index in class_index]
        cam = getattr(library, CAM_METHODS[method])(model=model, target_layers=[layer.module], reshape_transform=layer.reshape)
        cam.batch_size = SCORE_CAM_BATCH
        # The library would resize each map to the input with OpenCV; asking for the layer's own size (w, h)
        # leaves upsampling to `layer.to_image`, which knows how patch grids sit on the image.
        cam.get_target_width_height = lambda _inputs: tuple(cam.activations_and_grads.activations[-1].shape[:-3:-1])
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # Score-CAM's per-image progress bars
                grayscale = cam(input_tensor=images, targets=targets)  # (B, h, w) numpy, each map scaled to [0, 1]
            logits = cam.outputs.detach().float()
        finally:
            cam.activations_and_grads.release()  # removes the library's hooks from the model
    model.zero_grad(set_to_none=True)
    maps = layer.to_image(torch.from_numpy(grayscale).float())  # (B, H, W)
    return maps.clamp(0, 1).cpu(), logits.cpu()
