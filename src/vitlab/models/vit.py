"""A Vision Transformer built from scratch (Dosovitskiy et al. 2020), small enough to read at once.

Pipeline: pad the image to a multiple of the patch size → non-overlapping patches → linear patch
embedding → optional CLS token → position embedding (learned or fixed 2-D sin-cos) → pre-norm
transformer blocks (multi-head self-attention + GELU MLP) → final LayerNorm → CLS or mean pool →
linear head.

Patch sizes that do not divide the image (the seeds' study uses 6 on 32×32): the image is
zero-padded symmetrically (in normalised space, i.e. with the dataset's mean colour) up to the next
multiple of the patch size, so no pixel is dropped. For patch 6 a 32×32 image becomes 36×36 and
6×6 = 36 patches. (A stride-6 convolution, as in the seeds, would silently drop the last 2 rows and
columns.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.config import check_finite_numbers
from vitlab.errors import VitlabError
from vitlab.models.base import FROM_DATA, TokenLayout, VitlabModel, init_linear_weights
from vitlab.models.dropout import Dropout, dropout_matmul

POS_EMBEDS = ("learned", "sincos")
POOLS = ("cls", "mean")
STEMS = ("patch", "conv", "conv-pool")


@dataclass
class ViTConfig:
    """Every size of the ViT is a field here (and so a `vitlab train` flag).

    Args:
        patch_size: side of a square patch, 1..image_size; need not divide image_size (see module doc).
        hidden_size: token width D; must be divisible by num_heads (and by 4 for sincos positions).
        num_heads: attention heads per block.
        num_blocks: transformer blocks (depth).
        mlp_ratio: MLP hidden width as a multiple of hidden_size.
        dropout: dropout on embeddings, attention output and MLP.
        attention_dropout: dropout on the attention probabilities.
        pos_embed: 'learned' (trained parameter) or 'sincos' (fixed 2-D sine-cosine, seed 003).
        pool: 'cls' (a learned CLS token is read out) or 'mean' (average of the patch tokens).
        stem: 'patch' (one linear map per patch: the pure ViT), 'conv' (stride-2 3×3 conv + BN + ReLU
            layers down to the patch grid, then a 1×1 projection: Xiao et al. 2021) or 'conv-pool'
            (stride-1 3×3 conv + BN + ReLU + 3×3 stride-2 max-pool per halving, the last conv already
            hidden_size wide: the convolutional tokenizer of Hassani et al. 2021's CCT). The conv stems
            need a power-of-2 patch_size.
        image_size: side of the square input image.
        num_classes: number of output logits.
    """

    patch_size: int = 4
    hidden_size: int = 64
    num_heads: int = 4
    num_blocks: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    pos_embed: str = "learned"
    pool: str = "cls"
    stem: str = "patch"
    image_size: int = field(default=32, metadata=FROM_DATA)
    num_classes: int = field(default=10, metadata=FROM_DATA)

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        if not 1 <= self.patch_size <= self.image_size:
            raise VitlabError(f"patch_size must be between 1 and the image size {self.image_size}, got {self.patch_size}")
        if self.hidden_size < 1 or self.num_heads < 1 or self.num_blocks < 0:
            raise VitlabError(f"hidden_size and num_heads must be >= 1 and num_blocks >= 0, got {self.hidden_size}, {self.num_heads}, {self.num_blocks}")
        if self.hidden_size % self.num_heads:
            divisors = [h for h in range(1, min(self.hidden_size, 16) + 1) if self.hidden_size % h == 0]
            raise VitlabError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                f"choose num_heads from {divisors} or change hidden_size"
            )
        if self.pos_embed not in POS_EMBEDS:
            raise VitlabError(f"pos_embed must be one of {', '.join(POS_EMBEDS)}, got '{self.pos_embed}'")
        if self.pos_embed == "sincos" and self.hidden_size % 4:
            raise VitlabError(f"pos_embed sincos needs hidden_size divisible by 4 (2-D sin and cos), got {self.hidden_size}")
        if self.pool not in POOLS:
            raise VitlabError(f"pool must be one of {', '.join(POOLS)}, got '{self.pool}'")
        if self.stem not in STEMS:
            raise VitlabError(f"stem must be one of {', '.join(STEMS)}, got '{self.stem}'")
        if self.stem != "patch" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise VitlabError(f"stem {self.stem} halves the image per layer, so patch_size must be a power of 2 (2, 4, 8, ...), got {self.patch_size}")
        if self.mlp_ratio <= 0:
            raise VitlabError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise VitlabError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def grid_size(self) -> int:
        """Patches per side after padding the image up to a multiple of patch_size."""
        return math.ceil(self.image_size / self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (1 if self.pool == "cls" else 0)


def conv_stem(config: ViTConfig) -> nn.Sequential:
    """3×3 stride-2 conv + BN + ReLU layers, widths doubling up to hidden_size/2, then a 1×1 projection."""
    layers: list[nn.Module] = []
    num_layers = config.patch_size.bit_length() - 1  # log2(patch_size) halvings
    in_channels = 3
    for index in range(num_layers):
        out_channels = max(16, config.hidden_size // 2 ** (num_layers - index))
        layers += [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        in_channels = out_channels
    return nn.Sequential(*layers, nn.Conv2d(in_channels, config.hidden_size, kernel_size=1))


def conv_pool_stem(config: ViTConfig) -> nn.Sequential:
    """Per halving: 3×3 conv (stride 1) + BN + ReLU + 3×3 stride-2 max-pool; widths double up to hidden_size.

    Overlapping windows see every pixel at full resolution, which a stride-2 stem does not: the
    convolutional tokenizer of CCT (Hassani et al. 2021), with BatchNorm added for short schedules.
    """
    layers: list[nn.Module] = []
    num_layers = config.patch_size.bit_length() - 1  # log2(patch_size) halvings
    in_channels = 3
    for index in range(num_layers):
        out_channels = max(16, config.hidden_size // 2 ** (num_layers - 1 - index))  # the last one is hidden_size
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                   nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
        in_channels = out_channels
    return nn.Sequential(*layers)


class PatchEmbedding(nn.Module):
    """Pad to a multiple of the patch size, cut into patches and project each to hidden_size."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        total_padding = config.grid_size * config.patch_size - config.image_size
        self.padding = (total_padding // 2, total_padding - total_padding // 2)  # (before, after)
        if config.stem == "conv":
            self.projection = conv_stem(config)
        elif config.stem == "conv-pool":
            self.projection = conv_pool_stem(config)
        else:
            # A conv with kernel = stride = patch size is exactly a linear map of each flattened patch.
            self.projection = nn.Conv2d(3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.padding != (0, 0):
            before, after = self.padding
            images = F.pad(images, (before, after, before, after))  # (B, 3, G*P, G*P)
        patches = self.projection(images)  # (B, D, G, G)
        return patches.flatten(2).transpose(1, 2)  # (B, G*G, D)


def sincos_position_embedding(grid_size: int, hidden_size: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (MAE, He et al. 2021): D/2 channels for rows, D/2 for columns."""
    quarter = hidden_size // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    row_angles = rows.reshape(-1, 1) * frequencies  # (G*G, D/4)
    col_angles = cols.reshape(-1, 1) * frequencies  # (G*G, D/4)
    table = torch.cat([row_angles.sin(), row_angles.cos(), col_angles.sin(), col_angles.cos()], dim=1)
    return table.float()  # (G*G, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused fast path and an explicit path that returns weights."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_size = config.hidden_size // config.num_heads
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.projection = nn.Linear(config.hidden_size, config.hidden_size)
        self.output_dropout = Dropout(config.dropout)

    def forward(self, tokens: torch.Tensor, return_attention: bool = False):
        batch, num_tokens, hidden = tokens.shape  # (B, T, D)
        qkv = self.qkv(tokens).reshape(batch, num_tokens, 3, self.num_heads, self.head_size)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, T, Dh)
        dropout = self.attention_dropout if self.training else 0.0
        cpu_dropout = dropout > 0 and query.device.type == "cpu"
        if return_attention or cpu_dropout:
            # Explicit softmax(Q K^T / sqrt(Dh)): it can return the probabilities, and it is the CPU's
            # attention-dropout path too (SDPA with dropout_p falls back there to its math kernel,
            # which samples with the slow bernoulli_; see models/dropout.py).
            # Scaling Q (T × Dh) instead of the scores (T × T), and a softmax in the scores' dtype (the
            # CPU kernel accumulates bf16 in fp32) save passes over the largest tensor: with dropout at
            # 257 tokens these passes and dtype copies took half of the step in torch.profiler.
            scores = (query * self.head_size**-0.5) @ key.transpose(-2, -1)  # (B, H, T, T)
            weights = scores.softmax(dim=-1)
            if cpu_dropout:
                mixed = dropout_matmul(weights, value, dropout)  # (B, H, T, Dh)
            else:
                mixed = F.dropout(weights, dropout, self.training) @ value  # (B, H, T, Dh)
            weights = weights if return_attention else None
        else:
            weights = None
            if query.device.type == "cpu" and query.dtype == torch.bfloat16:
                # PyTorch's CPU flash-attention backward is slow in bf16: measured on the 2-core
                # Sapphire Rapids at (128, 4, 65, 16) fwd+bwd took 107 ms in bf16 and 53 ms upcast
                # to fp32 (at 257 tokens 420 vs 339 ms). So on the CPU attention runs in fp32, with
                # autocast off for the call (CPU autocast would cast the inputs back to bf16).
                with torch.autocast("cpu", enabled=False):
                    mixed = F.scaled_dot_product_attention(query.float(), key.float(), value.float())
                mixed = mixed.to(value.dtype)
            else:
                mixed = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)  # (B, H, T, Dh)
        mixed = mixed.transpose(1, 2).reshape(batch, num_tokens, hidden)  # (B, T, D)
        return self.output_dropout(self.projection(mixed)), weights


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        mlp_size = int(config.hidden_size * config.mlp_ratio)
        self.attention_norm = nn.LayerNorm(config.hidden_size)
        self.attention = Attention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, mlp_size),
            nn.GELU(),
            Dropout(config.dropout),
            nn.Linear(mlp_size, config.hidden_size),
            Dropout(config.dropout),
        )

    def forward(self, tokens: torch.Tensor, return_attention: bool = False):
        mixed, weights = self.attention(self.attention_norm(tokens), return_attention)
        tokens = tokens + mixed  # (B, T, D)
        tokens = tokens + self.mlp(self.mlp_norm(tokens))  # (B, T, D)
        return tokens, weights


class VisionTransformer(VitlabModel):
    """ViT for small images. `forward(images)` gives logits (B, classes); with `return_attention=True`
    it gives `(logits, [attention (B, heads, tokens, tokens) for each block])`, where tokens are
    `[CLS] + patches` in row-major grid order for pool='cls', and just the patches for pool='mean'.
    """

    name = "vit"
    config_class = ViTConfig
    returns_attention = True

    def __init__(self, config: ViTConfig | None = None) -> None:
        super().__init__(config or ViTConfig())
        cfg = self.config
        self.patch_embedding = PatchEmbedding(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size)) if cfg.pool == "cls" else None
        if cfg.pos_embed == "learned":
            self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.hidden_size))
        else:
            self.register_buffer("position_embedding", sincos_position_embedding(cfg.grid_size, cfg.hidden_size)[None], persistent=False)
        self.embedding_dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, cfg.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_linear_weights)
        if isinstance(self.position_embedding, nn.Parameter):
            nn.init.trunc_normal_(self.position_embedding, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        # A zero head starts every class at equal probability (timm does the same for fine-tuning).
        nn.init.zeros_(self.head.weight)

    def token_layout(self) -> TokenLayout:
        cfg = self.config
        return TokenLayout(prefix_tokens=1 if cfg.pool == "cls" else 0, grid_size=cfg.grid_size, patch_size=cfg.patch_size,
                           padding=self.patch_embedding.padding[0], readout=cfg.pool, num_layers=cfg.num_blocks, num_heads=cfg.num_heads)

    def token_layer(self) -> nn.Module:
        if not self.blocks:
            raise VitlabError("a ViT with num_blocks 0 has no attention to explain; train one with num_blocks >= 1")
        return self.blocks[-1].attention_norm

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        tokens = self.patch_embedding(images) + self.position_embedding  # (B, N, D)
        if self.cls_token is not None:
            cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, D); the CLS token has no position
            tokens = torch.cat([cls, tokens], dim=1)  # (B, 1+N, D)
        tokens = self.embedding_dropout(tokens)
        attention_maps = []
        for block in self.blocks:
            tokens, weights = block(tokens, return_attention)
            attention_maps.append(weights)
        tokens = self.norm(tokens)  # (B, T, D)
        pooled = tokens[:, 0] if self.cls_token is not None else tokens.mean(dim=1)  # (B, D)
        logits = self.head(pooled)  # (B, num_classes)
        return (logits, attention_maps) if return_attention else logits
