"""The seed configurations written the seeds' way, for the benchmark's reference side.

These follow the one seed that shows its code (seed 002's `vit_cnn_comparison.py`) layer for layer:
plain `nn.Dropout`, attention through an explicit softmax with dropout on the probabilities, the
per-block attention weights averaged over heads and returned, conv biases before BatchNorm. They
share nothing with vitlab's own models, so an optimisation inside vitlab cannot speed up the
reference. The small CNN is seeds 000/001's (conv 3→16, pool, conv 16→32, pool, linear).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SeedSmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(32 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))  # (B, 16, 16, 16)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 32, 8, 8)
        return self.fc(torch.flatten(x, 1))  # (B, classes)


class SeedCNN(nn.Module):
    """Seed 002's SimpleCNN: four blocks of 2 × (conv + BN + ReLU) + max-pool, average pool, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        widths, blocks, in_channels = (64, 128, 256, 512), [], 3
        for width in widths:
            blocks += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2, 2)]
            in_channels = width
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


class SeedAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.projection = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, T, Dh)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, T)
        weights = self.dropout(torch.softmax(scores, dim=-1))
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, tokens, dim)  # (B, T, D)
        return self.projection(out), weights.mean(dim=1)


class SeedBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SeedAttention(dim, heads, dropout)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, weights = self.attn(self.norm1(x))
        x = x + attended
        return x + self.mlp(self.norm2(x)), weights


class SeedViT(nn.Module):
    """Seed 002's VisionTransformer: conv patch embedding, CLS token, learned positions, pre-norm blocks."""

    def __init__(self, patch_size: int = 4, hidden_size: int = 64, num_heads: int = 4, num_blocks: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, num_classes: int = 10) -> None:
        super().__init__()
        patches = (32 // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, hidden_size))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SeedBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1+N, D)
        x = self.dropout(x)
        attention = []
        for block in self.blocks:
            x, weights = block(x)
            attention.append(weights)
        return self.head(self.norm(x)[:, 0]), attention


def build_reference(model_name: str, model_config: dict) -> nn.Module:
    """The seeds' version of a vitlab config (the keys vitlab's presets use)."""
    if model_name == "cnn-small":
        return SeedSmallCNN()
    if model_name == "cnn":
        return SeedCNN()
    if model_name == "vit":
        keys = ("patch_size", "hidden_size", "num_heads", "num_blocks", "mlp_ratio", "dropout")
        return SeedViT(**{key: model_config[key] for key in keys if key in model_config})
    raise ValueError(f"no reference for model '{model_name}'")
