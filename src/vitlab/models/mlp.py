"""The seeds' FeedForward network: flatten the image, hidden ReLU layers, linear output."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vitlab.config import check_finite_numbers
from vitlab.errors import VitlabError
from vitlab.models.base import FROM_DATA, VitlabModel
from vitlab.models.dropout import Dropout


@dataclass
class MLPConfig:
    """A multi-layer perceptron on raw pixels.

    Args:
        hidden_size: width of every hidden layer.
        num_hidden_layers: how many hidden layers (0 gives a linear classifier).
        dropout: dropout after every hidden layer.
        image_size: side of the square input image.
        num_classes: number of output logits.
    """

    hidden_size: int = 512
    num_hidden_layers: int = 2
    dropout: float = 0.0
    image_size: int = field(default=32, metadata=FROM_DATA)
    num_classes: int = field(default=10, metadata=FROM_DATA)

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        if self.hidden_size < 1 or self.num_hidden_layers < 0:
            raise VitlabError(f"mlp needs hidden_size >= 1 and num_hidden_layers >= 0, got {self.hidden_size} and {self.num_hidden_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise VitlabError(f"dropout must be in [0, 1), got {self.dropout}")


class MLP(VitlabModel):
    name = "mlp"
    config_class = MLPConfig

    def __init__(self, config: MLPConfig | None = None) -> None:
        super().__init__(config or MLPConfig())
        cfg = self.config
        layers: list[nn.Module] = []
        in_features = 3 * cfg.image_size * cfg.image_size
        for _ in range(cfg.num_hidden_layers):
            layers += [nn.Linear(in_features, cfg.hidden_size), nn.ReLU(), Dropout(cfg.dropout)]
            in_features = cfg.hidden_size
        layers.append(nn.Linear(in_features, cfg.num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images.flatten(1))  # (B, 3*H*W) -> (B, num_classes)
