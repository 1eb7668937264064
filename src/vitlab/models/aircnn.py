"""A fast CIFAR-10 CNN in the style of airbench (Keller Jordan, 2024) and hlb-CIFAR10 (Balsam, 2023).

Ideas taken from those write-ups (the code is ours):
- The first layer is a frozen 2×2 "patch-whitening" convolution (Page 2018): its filters are the
  eigenvectors of the covariance of 2×2 training patches, scaled by 1/sqrt(eigenvalue), in ± pairs.
  It is set from data by `init_from_data` before training starts.
- Three groups of conv → max-pool → BN → GELU → conv → BN → GELU, widths 64/256/256.
- Convolutions start as identities (dirac init) on their first in-channels: an implicit residual.
- BatchNorm without a learned scale, and a 1/9-scaled bias-free linear head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vitlab.config import check_finite_numbers
from vitlab.errors import VitlabError
from vitlab.models.base import FROM_DATA, VitlabModel
from vitlab.models.batch_norm import run_batch_norm
from vitlab.models.conv import run_conv
from vitlab.models.pooling import run_pool


@dataclass
class AirCNNConfig:
    """Args:
        widths: channels of the three conv groups.
        whitening_kernel: side of the patches the frozen first layer whitens.
        batchnorm_momentum: PyTorch BN momentum (share of the new batch in the running statistics).
        logit_scale: multiplier on the output logits.
        image_size: side of the square input image.
        num_classes: number of output logits.
    """

    widths: tuple[int, ...] = (64, 256, 256)
    whitening_kernel: int = 2
    batchnorm_momentum: float = 0.4
    logit_scale: float = 1 / 9
    image_size: int = field(default=32, metadata=FROM_DATA)
    num_classes: int = field(default=10, metadata=FROM_DATA)

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise VitlabError(f"aircnn needs three positive widths, got widths={self.widths}")
        if not 1 <= self.whitening_kernel <= 4:
            raise VitlabError(f"whitening_kernel must be between 1 and 4, got {self.whitening_kernel}")


def batch_norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=momentum)
    norm.weight.requires_grad_(False)  # scale fixed at 1: only the shift is learned
    return norm


def dirac_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding="same", bias=False)
    dirac_init(conv)
    return conv


@torch.no_grad()
def dirac_init(conv: nn.Conv2d) -> None:
    """The filter of each of the first min(in, out) out-channels passes its own in-channel through (the rest keep theirs)."""
    nn.init.dirac_(conv.weight[: min(conv.in_channels, conv.out_channels)])


class ConvGroup(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, momentum: float) -> None:
        super().__init__()
        self.conv1 = dirac_conv(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = batch_norm(out_channels, momentum)
        self.conv2 = dirac_conv(out_channels, out_channels)
        self.norm2 = batch_norm(out_channels, momentum)
        self.activation = nn.GELU()

    def filters(self) -> list[nn.Parameter]:
        """Both convolutions' filters: BatchNorm follows each (max-pooling between keeps the scale out)."""
        return [self.conv1.weight, self.conv2.weight]

    def reset_filters(self) -> None:
        dirac_init(self.conv1)
        dirac_init(self.conv2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.activation(run_batch_norm(self.norm1, run_pool(self.pool, run_conv(self.conv1, features))))  # (B, C, H/2, W/2)
        return self.activation(run_batch_norm(self.norm2, run_conv(self.conv2, features)))


class AirCNN(VitlabModel):
    """~1.97M parameters at default widths; see the module docstring."""

    name = "aircnn"
    config_class = AirCNNConfig
    has_stages = True

    def __init__(self, config: AirCNNConfig | None = None) -> None:
        super().__init__(config or AirCNNConfig())
        cfg = self.config
        whitening_channels = 2 * 3 * cfg.whitening_kernel**2
        self.whiten = nn.Conv2d(3, whitening_channels, kernel_size=cfg.whitening_kernel, bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        widths = (whitening_channels, *cfg.widths)
        self.groups = nn.Sequential(*(ConvGroup(widths[i], widths[i + 1], cfg.batchnorm_momentum) for i in range(3)))
        self.head = nn.Linear(cfg.widths[-1], cfg.num_classes, bias=False)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the frozen whitening filters from normalised training images (B, 3, H, W)."""
        kernel = self.config.whitening_kernel
        patches = images.float().unfold(2, kernel, 1).unfold(3, kernel, 1)  # (B, 3, H', W', k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * kernel * kernel)  # (B*H'*W', 3k²)
        covariance = patches.T @ patches / len(patches)  # (3k², 3k²)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, 3, kernel, kernel)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def scale_invariant_filters(self) -> list[nn.Parameter]:
        """Both convolutions of each group: BatchNorm follows each (max-pooling between keeps the scale out)."""
        return [weight for group in self.groups for weight in group.filters()]

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The whitening layer and each conv group (for figures and Grad-CAM)."""
        return [("whitening", self.whiten)] + [(f"group {i + 1}", group) for i, group in enumerate(self.groups)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = nn.functional.gelu(self.whiten(images))  # (B, 24, 31, 31) for 2×2 whitening
        features = self.groups(features)  # (B, widths[-1], 3, 3)
        pooled = features.amax(dim=(2, 3))  # (B, widths[-1]): global max-pool (exports to ONNX everywhere)
        return self.head(pooled) * self.config.logit_scale  # (B, num_classes)
