"""CNN feature maps and Grad-CAM."""

import pytest
import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.inspect.gradcam import feature_maps, grad_cam, model_stages
from vitlab.models import build_model


def test_feature_maps_of_each_stage():
    model = build_model("cnn-small")
    logits, stages = feature_maps(model, torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert [maps.shape for _, maps in stages] == [(2, 16, 16, 16), (2, 32, 8, 8)]
    _, stages = feature_maps(build_model("cnn", widths=(8, 16)), torch.randn(1, 3, 32, 32))
    assert [maps.shape[1:] for _, maps in stages] == [(8, 16, 16), (16, 8, 8)]


class LooksTopLeft(nn.Module):
    """A CNN whose output depends only on the top-left 8×8 pixels: the input is masked to that region,
    then conv (no bias) + ReLU (the explained stage), global average pool and a positive linear head."""

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


def test_grad_cam_highlights_the_one_region_the_output_depends_on():
    torch.manual_seed(0)
    model = LooksTopLeft()
    images = torch.randn(4, 3, 32, 32)
    cam, logits = grad_cam(model, images, class_index=torch.zeros(4, dtype=torch.long))
    assert cam.shape == (4, 32, 32) and logits.shape == (4, 10)
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[:9, :9] = True  # the masked region plus the 1-pixel reach of the 3×3 conv
    assert (cam[:, region].sum(dim=1) > 0).all() and cam[:, ~region].max() == 0
    peaks = cam.flatten(1).argmax(dim=1)
    assert ((peaks // 32 < 9) & (peaks % 32 < 9)).all()


def test_grad_cam_works_through_a_frozen_first_layer():
    model = build_model("aircnn")
    cam, _ = grad_cam(model, torch.randn(2, 3, 32, 32))
    assert cam.shape == (2, 32, 32) and torch.isfinite(cam).all()


def test_models_without_stages_are_a_clear_error():
    with pytest.raises(VitlabError, match="no convolutional stages"):
        model_stages(build_model("mlp"))
    with pytest.raises(VitlabError):
        model_stages(nn.Linear(2, 2))
