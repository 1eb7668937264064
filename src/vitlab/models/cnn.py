"""The seeds' two CNNs: the small 2-conv net (seeds 000/001) and the BN net (seed 002)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vitlab.config import check_finite_numbers
from vitlab.errors import VitlabError
from vitlab.models.base import FROM_DATA, VitlabModel
from vitlab.models.pooling import run_layers


@dataclass
class SmallCNNConfig:
    """Seeds 000/001: conv 3→16, pool, conv 16→32, pool, linear 2048→10.

    Args:
        channels: output channels of the two convolutions.
        image_size: side of the square input image (32 for CIFAR-10).
        num_classes: number of output logits.
    """

    channels: tuple[int, int] = (16, 32)
    image_size: int = field(default=32, metadata=FROM_DATA)
    num_classes: int = field(default=10, metadata=FROM_DATA)

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) != 2 or min(self.channels) < 1:
            raise VitlabError(f"cnn-small needs two positive channel counts, got channels={self.channels}")
        if self.image_size % 4 or self.image_size < 4:
            raise VitlabError(f"cnn-small pools twice, so image_size must be a multiple of 4, got {self.image_size}")


class SmallCNN(VitlabModel):
    """Two 3×3 conv + ReLU + max-pool stages and one linear layer (~20k parameters)."""

    name = "cnn-small"
    config_class = SmallCNNConfig
    has_stages = True

    def __init__(self, config: SmallCNNConfig | None = None) -> None:
        super().__init__(config or SmallCNNConfig())
        c1, c2 = self.config.channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = self.config.image_size // 4
        self.classifier = nn.Linear(c2 * side * side, self.config.num_classes)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The modules whose outputs are the feature maps of each stage (for figures and Grad-CAM)."""
        return [("stage 1 (conv-relu-pool)", self.features[2]), ("stage 2 (conv-relu-pool)", self.features[5])]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = run_layers(self.features, images)  # (B, c2, H/4, W/4)
        return self.classifier(features.flatten(1))  # (B, num_classes)


@dataclass
class CNNConfig:
    """Seed 002's CNN: four stages of two 3×3 conv + BN + ReLU, each followed by a 2×2 max-pool.

    Args:
        widths: output channels of the stages.
        image_size: side of the square input image.
        num_classes: number of output logits.
    """

    widths: tuple[int, ...] = (64, 128, 256, 512)
    image_size: int = field(default=32, metadata=FROM_DATA)
    num_classes: int = field(default=10, metadata=FROM_DATA)

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        self.widths = tuple(int(w) for w in self.widths)
        if not self.widths or min(self.widths) < 1:
            raise VitlabError(f"cnn needs at least one positive width, got widths={self.widths}")
        if len(self.widths) > 5:
            raise VitlabError(f"cnn halves a 32×32 image per stage, so at most 5 stages fit, got {len(self.widths)}")


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class CNN(VitlabModel):
    """A VGG-style BN network with global average pooling (~4.7M parameters at default widths)."""

    name = "cnn"
    config_class = CNNConfig
    has_stages = True

    def __init__(self, config: CNNConfig | None = None) -> None:
        super().__init__(config or CNNConfig())
        layers: list[nn.Module] = []
        in_channels = 3
        for width in self.config.widths:
            layers += conv_bn_relu(in_channels, width) + conv_bn_relu(width, width) + [nn.MaxPool2d(2)]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, self.config.num_classes)

    def scale_invariant_filters(self) -> list[nn.Parameter]:
        """Every convolution: each is followed by its BatchNorm."""
        return [m.weight for m in self.features if isinstance(m, nn.Conv2d)]

    def stages(self) -> list[tuple[str, nn.Module]]:
        """Each stage's max-pool output (for figures and Grad-CAM)."""
        pools = [m for m in self.features if isinstance(m, nn.MaxPool2d)]
        return [(f"stage {i + 1} ({width} ch)", pool) for i, (width, pool) in enumerate(zip(self.config.widths, pools, strict=True))]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = run_layers(self.features, images)  # (B, widths[-1], 32 / 2**stages, same)
        pooled = features.mean(dim=(2, 3))  # (B, widths[-1]): global average pool
        return self.classifier(pooled)  # (B, num_classes)
