"""CNN feature maps of each declared stage."""

import pytest
import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.inspect.features import feature_maps, model_stages
from vitlab.models import build_model


def test_feature_maps_of_each_stage():
    model = build_model("cnn-small")
    logits, stages = feature_maps(model, torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert [maps.shape for _, maps in stages] == [(2, 16, 16, 16), (2, 32, 8, 8)]
    _, stages = feature_maps(build_model("cnn", widths=(8, 16)), torch.randn(1, 3, 32, 32))
    assert [maps.shape[1:] for _, maps in stages] == [(8, 16, 16), (16, 8, 8)]


def test_models_without_stages_are_a_clear_error():
    with pytest.raises(VitlabError, match="no convolutional stages"):
        model_stages(build_model("mlp"))
    with pytest.raises(VitlabError):
        model_stages(nn.Linear(2, 2))
