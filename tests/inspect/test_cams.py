"""CAMs from pytorch-grad-cam: the library's Grad-CAM equals the textbook one, every method gives maps
of the image's shape in [0, 1] on CNNs and ViTs, and the maps point where the model looks."""

import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import VitlabError
from vitlab.inspect.cams import CAM_METHODS, cam_layer, cam_maps
from vitlab.models import build_model
from vitlab.models.base import eval_mode

pytest.importorskip("pytorch_grad_cam", reason="CAMs need pip install 'vitlab[explain]'")


def textbook_grad_cam(model: nn.Module, images: torch.Tensor, layer: nn.Module, class_index: torch.Tensor) -> torch.Tensor:
    """Grad-CAM as Selvaraju et al. 2017 define it, written out: with activations A (B, C, h, w) of `layer`,
    weight each channel by the spatial mean of d logit_c / dA, sum the channels, keep the positive part.
    Returns the maps at the layer's resolution (B, h, w), not yet scaled."""
    stored = {}

    def keep(module, inputs, output):
        output.retain_grad()
        stored["activations"] = output

    handle = layer.register_forward_hook(keep)
    try:
        with eval_mode(model), torch.enable_grad():
            logits = model(images.clone().requires_grad_(True))  # (B, classes)
            logits.gather(1, class_index[:, None]).sum().backward()
    finally:
        handle.remove()
    activations = stored["activations"]  # (B, C, h, w)
    weights = activations.grad.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1): alpha_c
    model.zero_grad(set_to_none=True)
    return F.relu((weights * activations.detach()).sum(dim=1))  # (B, h, w)


@pytest.mark.parametrize("name, settings", [("cnn-small", {}), ("cnn", {"widths": (8, 16, 32)})])
def test_library_grad_cam_equals_the_textbook_grad_cam(name, settings):
    torch.manual_seed(0)
    model = build_model(name, **settings)
    with torch.no_grad():  # a non-zero head: each class has its own evidence
        model.classifier.weight.normal_()
    images = torch.randn(4, 3, 32, 32)
    classes = model.eval()(images).argmax(dim=1)  # the predicted classes, as `vitlab explain` explains
    layer = cam_layer(model, images)
    reference = textbook_grad_cam(model, images, layer.module, classes)  # (B, h, w)
    assert (reference.flatten(1).amax(dim=1) > 0).all() and reference.shape[-1] >= 2  # the comparison has something to compare
    low, high = reference.flatten(1).amin(dim=1)[:, None, None], reference.flatten(1).amax(dim=1)[:, None, None]
    expected = layer.to_image((reference - low) / (high - low))  # scaled to [0, 1], upsampled to the image
    maps, logits = cam_maps(model, images, "gradcam", classes)
    assert maps.shape == (4, 32, 32) and logits.shape == (4, 10)
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-5)


class LooksTopLeft(nn.Module):
    """A CNN whose output depends only on the top-left 8×8 pixels: the input is masked to that region,
    then conv (no bias) + ReLU (the explained stage, at full resolution), global average pool and a
    positive linear head."""

    has_stages = True

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, 32, 32)
        mask[..., :8, :8] = 1
        self.register_buffer("mask", mask)
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.head = nn.Linear(6, 10)
        with torch.no_grad():
            self.head.weight.abs_()

    def stages(self):
        return [("conv", self.relu)]

    def forward(self, images):
        return self.head(self.relu(self.conv(images * self.mask)).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_gradient_cams_light_up_only_the_region_the_output_depends_on(method):
    torch.manual_seed(0)
    maps, _ = cam_maps(LooksTopLeft(), torch.randn(4, 3, 32, 32), method, class_index=torch.zeros(4, dtype=torch.long))
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[:9, :9] = True  # the masked region plus the 1-pixel reach of the 3×3 conv
    assert (maps[:, region].amax(dim=1) > 0.99).all() and maps[:, ~region].max() == 0


def tiny_timm_vit():
    return build_model("timm", architecture="vit_tiny_patch16_224", timm_kwargs={"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2})


MODELS = {
    "cnn-small": lambda: build_model("cnn-small"),
    "vit-padded": lambda: build_model("vit", patch_size=6, hidden_size=16, num_heads=2, num_blocks=2),
    "timm-resnet": lambda: build_model("timm", architecture="test_resnet"),  # timm's small ResNet for tests
    "timm-vit": tiny_timm_vit,
}


@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_cam_method_gives_image_sized_maps_in_the_unit_interval(model_name):
    pytest.importorskip("timm") if model_name.startswith("timm") else None
    torch.manual_seed(0)
    model = MODELS[model_name]()
    for parameter in model.parameters():  # vitlab's ViT starts with a zero head: give every class a gradient
        if parameter.dim() == 2 and parameter.shape[0] == 10:
            nn.init.normal_(parameter, std=0.5)
    images = torch.randn(2, 3, 32, 32)
    for method in CAM_METHODS:
        maps, logits = cam_maps(model, images, method)
        assert maps.shape == (2, 32, 32) and logits.shape == (2, 10), method
        assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1, method
        assert (maps.flatten(1).amax(dim=1) > 0.5).all(), f"{method}: an all-dark map"  # scaled per image: the peak is near 1
    assert model.training  # the model's mode is restored


def test_token_layers_are_reshaped_to_the_patch_grid_in_row_major_order():
    model = build_model("vit", patch_size=8, hidden_size=16, num_heads=2, num_blocks=1)  # CLS + a 4×4 grid
    layer = cam_layer(model, torch.randn(1, 3, 32, 32))
    tokens = torch.arange(17.0)[None, :, None].expand(1, 17, 16)  # token t carries the value t
    grid = layer.reshape(tokens)  # (1, 16, 4, 4)
    assert grid.shape == (1, 16, 4, 4)
    assert grid[0, 0].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]  # the CLS token is dropped


def test_timm_resnet18_explains_its_last_stage_with_a_spatial_map():
    pytest.importorskip("timm")
    model = build_model("timm", architecture="resnet18")
    layer = cam_layer(model, torch.randn(1, 3, 32, 32))  # layer4 is 1×1 on 32×32 images: layer3 (2×2) is explained
    assert layer.module is model.network.layer3 and layer.description.startswith("layer3")


def test_missing_library_and_unknown_method_are_clear_errors(monkeypatch):
    with pytest.raises(VitlabError, match=re.escape("unknown CAM method 'gradcam+++'")):
        cam_maps(build_model("cnn-small"), torch.randn(1, 3, 32, 32), "gradcam+++")
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # as if not installed
    with pytest.raises(VitlabError, match=r"pip install 'vitlab\[explain\]'"):
        cam_maps(build_model("cnn-small"), torch.randn(1, 3, 32, 32), "gradcam")
    with pytest.raises(VitlabError, match="neither convolutional stages nor attention"):
        cam_layer(build_model("mlp"), torch.randn(1, 3, 32, 32))
