"""Deletion and insertion AUC (Petsiuk et al. 2018) behave as defined: against a hand computation, on a
model that ignores the image, and on a model that only looks at one region."""

import numpy as np
import torch
from torch import nn

from vitlab.inspect.faithfulness import deletion_insertion, pixel_ranks

CHECKER = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0  # (8, 8) of ±1


class RegionModel(nn.Module):
    """Class 0's logit is `gain` × the match of channel 0's top-left 8×8 pixels with a ±1 checkerboard; the
    other classes' are 0. A checkerboard there makes class 0 certain (a blur erases it); the rest of the
    image is ignored."""

    def __init__(self, gain: float = 4.0) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(gain))  # a parameter, so the model has a device

    def forward(self, images):
        region = images[:, 0, :8, :8]
        evidence = self.gain * (region * CHECKER[: region.shape[-2], : region.shape[-1]]).mean(dim=(1, 2))  # (B,)
        return torch.cat([evidence[:, None], torch.zeros(len(images), 9)], dim=1)  # (B, 10)


class Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([2.0, 0.5, -1.0]))

    def forward(self, images):
        return self.logits.expand(len(images), 3)


def bright_region_images(count: int) -> torch.Tensor:
    images = torch.randn(count, 3, 32, 32) * 0.3
    images[:, 0, :8, :8] += 2.0 * CHECKER  # strong evidence for class 0, only where the model looks
    return images


def test_the_map_pointing_at_the_region_scores_better_than_a_random_map():
    torch.manual_seed(0)
    model, images = RegionModel(), bright_region_images(6)
    classes = torch.zeros(6, dtype=torch.long)
    focused = torch.zeros(6, 32, 32)
    focused[:, :8, :8] = 1.0
    good = deletion_insertion(model, images, focused, classes, steps=16)
    random = deletion_insertion(model, images, torch.rand(6, 32, 32), classes, steps=16)
    assert good.deletion < random.deletion - 0.2  # the class's probability collapses after 1/16 of the pixels
    assert good.insertion > random.insertion + 0.2
    assert good.score > random.score
    assert all(g < r for g, r in zip(good.deletion_per_image, random.deletion_per_image, strict=True))


def test_a_model_that_ignores_the_image_scores_its_constant_probability():
    model = Constant()
    probability = float(model.logits.detach().softmax(dim=0)[1])
    result = deletion_insertion(model, torch.randn(3, 3, 32, 32), torch.rand(3, 32, 32), torch.ones(3, dtype=torch.long), steps=8)
    np.testing.assert_allclose(result.deletion_per_image + result.insertion_per_image, probability, rtol=1e-6)
    assert abs(result.score) < 1e-6


def test_deletion_auc_equals_a_hand_computation():
    # 4×4 image, 4 steps: each step deletes 4 more pixels (set to 0, the baseline), most salient first.
    torch.manual_seed(1)
    model = RegionModel(gain=3.0)
    image = torch.rand(1, 3, 4, 4) + CHECKER[:4, :4]
    saliency = torch.rand(1, 4, 4)
    order = np.argsort(-saliency.flatten().numpy(), kind="stable")
    curve = []
    for step in range(5):
        current = image.clone().numpy()
        for pixel in order[: step * 4]:
            current[0, :, pixel // 4, pixel % 4] = 0.0
        logit = 3.0 * (current[0, 0] * CHECKER[:4, :4].numpy()).mean()
        curve.append(np.exp(logit) / (np.exp(logit) + 9.0))  # softmax of (logit, 0 × 9)
    expected = sum((curve[k] + curve[k + 1]) / 2 for k in range(4)) / 4
    result = deletion_insertion(model, image, saliency, torch.zeros(1, dtype=torch.long), steps=4)
    assert abs(result.deletion_per_image[0] - expected) < 1e-6


def test_pixel_ranks_put_the_most_salient_first_and_break_ties_in_raster_order():
    maps = torch.tensor([[[0.1, 0.9], [0.5, 0.5]]])
    assert pixel_ranks(maps).tolist() == [[3, 0, 1, 2]]
    assert pixel_ranks(torch.zeros(1, 2, 2)).tolist() == [[0, 1, 2, 3]]
