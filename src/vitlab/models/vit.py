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
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.config import check_finite_numbers
from vitlab.errors import VitlabError
from vitlab.kernels import attention as attention_kernel
from vitlab.kernels import gelu as gelu_kernel
from vitlab.kernels import layer_norm as layer_norm_kernel
from vitlab.kernels import patches as patches_kernel
from vitlab.kernels import recording_graph
from vitlab.kernels import single_query as single_query_kernel
from vitlab.kernels import weight_gradient as weight_gradient_kernel
from vitlab.kernels.build import compiled_library, fp32_cpu_matrix, fp32_cpu_vector
from vitlab.models.activations import GELU, MLP
from vitlab.models.aircnn import AirCNNConfig, ConvGroup
from vitlab.models.base import (
    FROM_DATA,
    TokenLayout,
    VitlabModel,
    bf16_on_cpu,
    cpu_autocast_dtype,
    global_hooks,
    inactive_dropout,
    init_linear_weights,
    intercepted,
    intercepted_itself,
    plain_linear,
)
from vitlab.models.dropout import Dropout
from vitlab.models.fused_block import BlockLayout, BlockOnKernels, FirstTokenBlockOnKernels, blocks_may_fuse
from vitlab.models.layers import attention_written_out, self_attention, single_query_attention
from vitlab.models.linear import linear, run_linear
from vitlab.models.norms import MatmulInputNorm
from vitlab.models.pooling import run_layers

POS_EMBEDS = ("learned", "sincos")
POOLS = ("cls", "mean", "seq")
STEMS = ("patch", "spt", "conv", "conv-pool", "conv-group")
NORMS = ("pre", "post")
INITS = ("trunc_normal", "mimetic")
ACTIVATIONS = ("gelu", "relu")
CONV_STEMS = ("conv", "conv-pool", "conv-group")


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
        pool: 'cls' (a learned CLS token is read out), 'mean' (average of the patch tokens) or 'seq'
            (sequence pooling, Hassani et al. 2021: a learned softmax weighting of the patch tokens).
        stem: 'patch' (one linear map per patch: the pure ViT), 'spt' (shifted patch tokenization, Lee et
            al. 2021: the image and its four diagonal half-patch shifts, patchified, LayerNorm, one linear
            map; no convolution), 'conv' (stride-2 3×3 conv + BN + ReLU layers down to the patch grid, then
            a 1×1 projection: Xiao et al. 2021) or 'conv-pool' (stride-1 3×3 conv + BN + ReLU + 3×3 stride-2
            max-pool per halving: the convolutional tokenizer of Hassani et al. 2021's CCT) or 'conv-group'
            (per halving one of airbench's conv groups: conv, 2×2 max-pool, BN with its scale fixed at 1, GELU,
            conv, BN, GELU; the first min(in, out) filters of each conv start as identities, the rest at the ViT's
            truncated normal (0.02); widths quadruple up to hidden_size, as airbench's 64 → 256: a ResNet-stage
            tokenizer in the spirit of the ViT paper's hybrid). The conv stems need a power-of-2
            patch_size.
        lsa: locality self-attention (Lee et al. 2021): a learned softmax temperature per block and no
            attention of a token to itself.
        registers: extra learned tokens that take part in attention and are dropped at the output
            (Darcet et al. 2023).
        init: 'trunc_normal' (ViT/timm) or 'mimetic' (Trockman & Kolter 2023: W_q W_kᵀ ≈ 0.7 Z + 0.7 I and
            W_v W_o ≈ 0.4 Z - 0.4 I at initialisation, Z random, so attention starts out local-looking).
        norm: 'pre' (x + f(LN(x)): the ViT paper) or 'post' (LN(x + f(x)): nn.TransformerEncoderLayer's
            default, as in seed 003's code).
        activation: the MLP's nonlinearity, 'gelu' or 'relu' (nn.TransformerEncoderLayer's default).
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
    lsa: bool = False
    registers: int = 0
    init: str = "trunc_normal"
    norm: str = "pre"
    activation: str = "gelu"
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
        for name, allowed in (("norm", NORMS), ("init", INITS), ("activation", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise VitlabError(f"{name} must be one of {', '.join(allowed)}, got '{getattr(self, name)}'")
        if not 0 <= self.registers <= 64:
            raise VitlabError(f"registers must be between 0 and 64, got {self.registers}")
        if self.stem in CONV_STEMS and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise VitlabError(f"stem {self.stem} halves the image per layer, so patch_size must be a power of 2 (2, 4, 8, ...), got {self.patch_size}")
        if self.lsa and self.num_tokens < 2:
            raise VitlabError(f"lsa leaves out each token's attention to itself, so it needs at least 2 tokens, and patch_size "
                              f"{self.patch_size} on {self.image_size}-pixel images with pool {self.pool} gives 1; use a smaller --patch_size, "
                              "--pool cls or --registers 1")
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
        """Tokens in every block: [CLS] + patches + registers."""
        return (1 if self.pool == "cls" else 0) + self.num_patches + self.registers

    @property
    def patch_tokens(self) -> slice:
        """Where the patch tokens sit in the token sequence."""
        start = 1 if self.pool == "cls" else 0
        return slice(start, start + self.num_patches)


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
    widths = halving_widths(config, growth=2)
    for in_channels, out_channels in pairwise(widths):
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                   nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
    return nn.Sequential(*layers)


def conv_group_stem(config: ViTConfig) -> nn.Sequential:
    """Per halving one of airbench's conv groups (`ConvGroup`); widths quadruple up to hidden_size (64 → 256)."""
    widths = halving_widths(config, growth=4)
    return nn.Sequential(*(ConvGroup(c_in, c_out, AirCNNConfig.batchnorm_momentum) for c_in, c_out in pairwise(widths)))


def halving_widths(config: ViTConfig, growth: int) -> list[int]:
    """[3, then the channels after each of the log2(patch_size) halvings]: the last exactly hidden_size, each earlier one
    `growth` times narrower than the next, but at least 16 (and at most hidden_size)."""
    num_layers = config.patch_size.bit_length() - 1
    hidden = config.hidden_size
    return [3] + [min(hidden, max(16, hidden // growth ** (num_layers - 1 - index))) for index in range(num_layers - 1)] + [hidden]


class ShiftedPatchTokenizer(nn.Module):
    """Shifted patch tokenization (Lee et al. 2021): the image and its four diagonal half-patch shifts are
    stacked as 15 channels, cut into patches, layer-normalised and mapped linearly. No convolution: the
    patches are cut by a reshape, each patch's values in `unfold`'s order (channel, row, column)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.shift = max(1, config.patch_size // 2)
        patch_values = 5 * 3 * config.patch_size**2
        self.norm = MatmulInputNorm(patch_values)  # bf16 straight from a C kernel under CPU autocast
        self.projection = nn.Linear(patch_values, config.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return run_linear(self.projection, self.norm(self.patches(images)))  # (B, G·G, D)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, G·G, 15·P²): each patch of the image and its four shifted views; by vitlab's C kernel on the CPU."""
        _, _, height, width = images.shape  # (B, 3, H, W), H and W multiples of the patch size
        s, p = self.shift, self.patch_size
        if patches_kernel.kernel_supports(images, p):
            return patches_kernel.shifted_patches(images, p, s)
        padded = F.pad(images, (s, s, s, s))  # (B, 3, H+2s, W+2s), zeros = the mean colour
        # view (dy, dx) shows the image moved by (-dy, -dx): pixel (y, x) of it is pixel (y + dy, x + dx) of the image
        shifted = [padded[..., s + dy:s + dy + height, s + dx:s + dx + width] for dy, dx in ((0, 0), (-s, -s), (-s, s), (s, -s), (s, s))]
        cut = [view.unflatten(2, (height // p, p)).unflatten(4, (width // p, p)).permute(0, 2, 4, 1, 3, 5)
               for view in shifted]  # 5 × (B, G, G, 3, P, P)
        # One copy into the final layout: faster on the CPU than cat + unfold + transpose (docs/performance.md).
        return torch.stack(cut, dim=3).flatten(3).flatten(1, 2)  # (B, G·G, 15·P²)


class PatchEmbedding(nn.Module):
    """Pad to a multiple of the patch size, cut into patches and project each to hidden_size (or a conv stem)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        total_padding = config.grid_size * config.patch_size - config.image_size
        self.padding = (total_padding // 2, total_padding - total_padding // 2)  # (before, after)
        if config.stem == "conv":
            self.projection = conv_stem(config)
        elif config.stem == "conv-pool":
            self.projection = conv_pool_stem(config)
        elif config.stem == "conv-group":
            self.projection = conv_group_stem(config)
        elif config.stem == "spt":
            self.projection = ShiftedPatchTokenizer(config)
        else:
            # A conv with kernel = stride = patch size is exactly a linear map of each flattened patch.
            self.projection = nn.Conv2d(3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.padding != (0, 0):
            before, after = self.padding
            images = F.pad(images, (before, after, before, after))  # (B, 3, G*P, G*P)
        if isinstance(self.projection, ShiftedPatchTokenizer):
            return self.projection(images)  # (B, G*G, D)
        if isinstance(self.projection, nn.Sequential):  # a conv stem: its BatchNorms and ReLUs through the kernels
            patches = run_layers(self.projection, images)  # (B, D, G, G)
        elif self.linear_on_patches(images):
            return self.project_patches(images)  # (B, G*G, D)
        else:
            patches = self.projection(images)  # (B, D, G, G)
        return patches.flatten(2).transpose(1, 2)  # (B, G*G, D)

    def linear_on_patches(self, images: torch.Tensor) -> bool:
        """Whether the patch convolution runs as a linear map of the flattened patches (`project_patches`): on the CPU,
        for a plain nn.Conv2d (no hook, no forward replaced). There oneDNN's stride-P convolution, and above all its
        weight gradient, ran slower than the same sums as a matmul (docs/performance.md, "Work that nothing reads,
        skipped; the tokenizers as matmuls")."""
        conv = self.projection
        return (images.device.type == "cpu" and type(conv) is nn.Conv2d and not intercepted(conv)
                and conv.padding == (0, 0) and conv.groups == 1 and conv.dilation == (1, 1))

    def cuts_in_kernel(self, images: torch.Tensor) -> bool:
        """Whether `project_patches` cuts the patches with vitlab's C kernel straight into bf16: fp32 CPU images under
        CPU bf16 autocast that want no gradient, no graph being recorded, rows the kernel takes."""
        return bf16_on_cpu(images) and patches_kernel.plain_cut_supports(images, self.patch_size)

    def project_patches(self, images: torch.Tensor) -> torch.Tensor:
        """The patch convolution as x @ Wᵀ + b over each flattened patch, in `unfold`'s order (channel, row, column),
        the order of the conv weight's last three axes: the same sums as the conv, added in another order."""
        batch, channels, height, width = images.shape  # (B, 3, G*P, G*P)
        p = self.patch_size
        if self.cuts_in_kernel(images):
            patches = patches_kernel.patches_bf16(images, p)  # (B, G*G, 3·P²) bf16, in one pass
        else:
            if bf16_on_cpu(images):  # autocast would cast the patches anyway: cut them in bf16, half the bytes
                images = images.to(torch.bfloat16)
            patches = (images.reshape(batch, channels, height // p, p, width // p, p)
                       .permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // p) * (width // p), channels * p * p))  # (B, G*G, 3·P²)
        weight = self.projection.weight.reshape(self.projection.out_channels, -1)  # (D, 3·P²)
        return linear(patches, weight, self.projection.bias)  # (B, G*G, D)


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
    """Multi-head self-attention; the kernel (fused or explicit) is chosen in `models/layers.py`."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_size = config.hidden_size // config.num_heads
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.projection = nn.Linear(config.hidden_size, config.hidden_size)
        self.output_dropout = Dropout(config.dropout)
        self.lsa = config.lsa
        # LSA's learned temperature, stored as its logarithm (starts at sqrt(Dh), the usual scaling).
        self.log_temperature = nn.Parameter(torch.tensor(0.5 * math.log(self.head_size))) if config.lsa else None

    def forward(self, tokens: torch.Tensor, return_attention: bool = False):
        mixed, weights = self.mix(tokens, return_attention)  # (B, T, D)
        return self.output_dropout(run_linear(self.projection, mixed)), weights

    def mix(self, tokens: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The heads' outputs side by side (B, T, D), before the output projection, and the weights if asked for."""
        batch, num_tokens, _ = tokens.shape  # (B, T, D)
        qkv = run_linear(self.qkv, tokens).reshape(batch, num_tokens, 3, self.num_heads, self.head_size)  # (B, T, 3, H, Dh)
        scale = torch.exp(-self.log_temperature) if self.lsa else None
        return self_attention(qkv, dropout=self.attention_dropout if self.training else 0.0, scale=scale,
                              mask_self=self.lsa, return_weights=return_attention)  # (B, T, D)

    def first_token(self, tokens: torch.Tensor) -> torch.Tensor:
        """This layer's output (B, 1, D) for the first token alone: its query against every token's key and value, then
        the output projection. What `forward` gives for that token (in other roundings), for a last block whose other
        tokens nothing reads (CLS pooling). Only the first token's query is projected (`single_query_attention`)."""
        batch, num_tokens, hidden = tokens.shape  # (B, T, D)
        weight, bias = self.qkv.weight, self.qkv.bias  # (3D, D), (3D,): rows [query; key; value]
        # (B, D), contiguous: under CPU autocast a strided row would leave vitlab's product kernel (and oneDNN's fused
        # linear) for F.linear's addmm, slower for this small product
        query = linear(tokens[:, 0].contiguous(), weight[:hidden], None if bias is None else bias[:hidden])
        key_value = linear(tokens, weight[hidden:], None if bias is None else bias[hidden:])  # (B, T, 2D): keys, values
        scale = torch.exp(-self.log_temperature) if self.lsa else self.head_size**-0.5
        mixed = single_query_attention(query, key_value, self.num_heads, scale=scale, mask_first=self.lsa,
                                       dropout=self.attention_dropout if self.training else 0.0)  # (B, D)
        return self.output_dropout(run_linear(self.projection, mixed.view(batch, 1, hidden)))  # (B, 1, D)

    def projection_without_dropout(self) -> bool:
        """Whether the output projection is all there is after `mix`: a plain nn.Linear, its dropout inactive (by the
        dropout's own mode: Monte-Carlo dropout keeps it on in an evaluated model), no hook on either or on this module."""
        return plain_linear(self.projection) and inactive_dropout(self.output_dropout) and not intercepted(self)


class Block(nn.Module):
    """A transformer block: pre-norm x + Attn(LN(x)), x + MLP(LN(x)); or post-norm LN(x + Attn(x)), LN(x + MLP(x))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        mlp_size = int(config.hidden_size * config.mlp_ratio)
        self.pre_norm = config.norm == "pre"
        # Pre-norm: each norm's output only feeds a linear layer (bf16 straight from a C kernel under CPU autocast).
        norm = MatmulInputNorm if self.pre_norm else nn.LayerNorm
        self.attention_norm = norm(config.hidden_size)
        self.attention = Attention(config)
        self.mlp_norm = norm(config.hidden_size)
        # GELU: bf16 CPU activations through a C kernel, which also adds the first layer's bias
        self.mlp = MLP(config.hidden_size, mlp_size, GELU() if config.activation == "gelu" else nn.ReLU(),
                       Dropout(config.dropout), Dropout(config.dropout))

    def forward(self, tokens: torch.Tensor, return_attention: bool = False, pending: tuple[torch.Tensor, torch.Tensor] | None = None,
                defer_output: bool = False, first_token_only: bool = False):
        """(tokens, attention weights or None). Pre-norm blocks can hand their MLP's output to the next block instead of
        adding it (`defer_output`, see `output_deferrable`): they then return (tokens, weights, pending), and the next
        block takes `pending` — the MLP's last layer without its bias, and that bias — and adds both in its first
        norm's kernel (norms.MatmulInputNorm.after_residual). The same sums either way, in other roundings.

        With `first_token_only` the block computes only the first token's output (B, 1, D), which still attends to every
        token (no weights are returned): for the last block under CLS pooling, whose other outputs nothing reads."""
        if first_token_only:
            if self.runs_as_one_node(tokens, pending, defer_output=False, first_token_only=True):
                return self.first_token_as_one_node(tokens, pending), None
            return self.first_token(tokens, pending), None
        if not return_attention and self.runs_as_one_node(tokens, pending, defer_output):
            return self.as_one_node(tokens, pending, defer_output)
        if not self.pre_norm:
            mixed, weights = self.attention(tokens, return_attention)
            tokens = self.attention_norm(tokens + mixed)  # (B, T, D)
            return self.mlp_norm(tokens + self.mlp(tokens)), weights
        if pending is not None:
            tokens, normalised = self.attention_norm.after_residual(tokens, *pending)
        else:
            normalised = self.attention_norm(tokens)
        if self.attention.projection_without_dropout() and self.mlp_norm.residual_kernel_applies(tokens):
            # The projection's bias and the residual add go into the MLP norm's kernel.
            mixed, weights = self.attention.mix(normalised, return_attention)
            projection = self.attention.projection
            tokens, normalised = self.mlp_norm.after_residual(tokens, linear(mixed, projection.weight), projection.bias)
        else:
            mixed, weights = self.attention(normalised, return_attention)
            tokens = tokens + mixed  # (B, T, D)
            normalised = self.mlp_norm(tokens)
        if defer_output:
            return tokens, weights, self.mlp.without_last_bias(normalised)
        return tokens + self.mlp(normalised), weights

    def runs_as_one_node(self, tokens: torch.Tensor, pending: tuple[torch.Tensor, torch.Tensor] | None, defer_output: bool,
                         first_token_only: bool = False) -> bool:
        """Whether `forward` may run the block as one autograd node on the C kernels (models/fused_block.py): a pre-norm
        block of vitlab's own parts (no subclass, no hook and no replaced forward on the block or any part), every part
        on its kernel as `forward` would run it: CPU bf16 autocast, gradients on, no graph being recorded, exact GELU
        adding the first layer's bias, inactive dropouts but the attention weights' (inside the kernel; with
        `first_token_only`, `first_token`'s path, inactive too). Asked once per block and step, so written for speed: each
        condition once, the parts' attributes read once."""
        # the graph test first: a graph recorder must not trace into the library's loading (a graph break under torch.compile)
        if recording_graph() or not (self.pre_norm and type(self) is Block and blocks_may_fuse()):
            return False
        attention, mlp, attention_norm, mlp_norm = self.attention, self.mlp, self.attention_norm, self.mlp_norm
        if not (type(attention) is Attention and type(mlp) is MLP and type(attention_norm) is MatmulInputNorm
                and type(mlp_norm) is MatmulInputNorm):
            return False
        if len(mlp) != 5:
            return False
        first, activation, hidden_dropout, last, output_dropout = mlp
        qkv, projection, projection_dropout = attention.qkv, attention.projection, attention.output_dropout
        parts = (self, attention_norm, attention, qkv, projection, projection_dropout, mlp_norm, mlp, first, activation,
                 hidden_dropout, last, output_dropout)
        if any(intercepted_itself(part) for part in parts) or global_hooks():
            return False
        if not (type(activation) is GELU and activation.approximate == "none" and type(qkv) is nn.Linear
                and type(projection) is nn.Linear and type(first) is nn.Linear and type(last) is nn.Linear
                and all(isinstance(dropout, nn.Dropout) and (not dropout.training or dropout.p == 0.0)
                        for dropout in (projection_dropout, hidden_dropout, output_dropout))):
            return False
        library = compiled_library()
        if (library is None or not torch.is_grad_enabled() or cpu_autocast_dtype() != torch.bfloat16 or attention_written_out()
                or tokens.dim() != 3):
            return False
        batch, count, width = tokens.shape
        last_bias = None if defer_output else last.bias
        if first_token_only:  # the query and the keys and values from qkv's two parts, one query's attention
            query_bias, key_value_bias = (None, None) if qkv.bias is None else (qkv.bias[:width], qkv.bias[width:])
            products = ((qkv.weight[:width], query_bias), (qkv.weight[width:], key_value_bias), (projection.weight, projection.bias))
            attention_fits = (attention.attention_dropout == 0.0 or not attention.training) and single_query_kernel.sizes_supported(
                batch, count, width, attention.num_heads, library)
        else:
            products = ((qkv.weight, qkv.bias), (projection.weight, None))
            attention_fits = attention_kernel.sizes_supported(batch, count, attention.num_heads, attention.head_size, library)
        return (attention_fits and layer_norm_kernel.shape_supported(tokens, attention_norm.weight, attention_norm.bias, library)
                and len(attention_norm.normalized_shape) == 1 and len(mlp_norm.normalized_shape) == 1
                and fp32_cpu_vector(mlp_norm.weight, width) and fp32_cpu_vector(mlp_norm.bias, width)
                and (pending is None or layer_norm_kernel.residual_shape_supported(tokens, *pending, attention_norm.weight,
                                                                                   attention_norm.bias, library))
                and (projection.bias is None or fp32_cpu_vector(projection.bias, width))
                and all(fp32_cpu_matrix(weight) and (bias is None or fp32_cpu_vector(bias, weight.shape[0]))
                        and weight_gradient_kernel.shape_supported(weight.shape[1], weight.shape[0], bias is not None, library)
                        for weight, bias in (*products, (first.weight, None), (last.weight, last_bias)))
                and gelu_kernel.adds_bias(first.out_features, first.bias))

    def as_one_node(self, tokens: torch.Tensor, pending: tuple[torch.Tensor, torch.Tensor] | None, defer_output: bool):
        """`forward`'s result, the same bits, from one BlockOnKernels (where `runs_as_one_node`)."""
        attention, last = self.attention, self.mlp[3]
        dropout = attention.attention_dropout if attention.training else 0.0
        after_attention, out = BlockOnKernels.apply(*self.one_node_inputs(tokens, pending, None if defer_output else last.bias, dropout))
        if defer_output:
            return after_attention, None, (out, last.bias)
        return after_attention + out, None

    def first_token_as_one_node(self, tokens: torch.Tensor, pending: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """`first_token`'s result, the same values, from one FirstTokenBlockOnKernels (where `runs_as_one_node` with
        first_token_only)."""
        return FirstTokenBlockOnKernels.apply(*self.one_node_inputs(tokens, pending, self.mlp[3].bias, 0.0))  # (B, 1, D)

    def one_node_inputs(self, tokens: torch.Tensor, pending: tuple[torch.Tensor, torch.Tensor] | None, last_bias: torch.Tensor | None,
                        attention_dropout: float) -> tuple:
        """The inputs of BlockOnKernels and FirstTokenBlockOnKernels, in their order."""
        attention, mlp = self.attention, self.mlp
        scale = torch.exp(-attention.log_temperature) if attention.lsa else attention.head_size**-0.5
        layout = BlockLayout(attention.num_heads, self.attention_norm.eps, self.mlp_norm.eps, attention.lsa, attention_dropout)
        addend, addend_bias = pending if pending is not None else (None, None)
        return (tokens, addend, addend_bias, scale, self.attention_norm.weight, self.attention_norm.bias, attention.qkv.weight,
                attention.qkv.bias, attention.projection.weight, attention.projection.bias, self.mlp_norm.weight, self.mlp_norm.bias,
                mlp[0].weight, mlp[0].bias, mlp[3].weight, last_bias, layout)

    def first_token(self, tokens: torch.Tensor, pending: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The block's output for the first token alone (B, 1, D); `pending` as in `forward`."""
        if not self.pre_norm:
            first = self.attention_norm(tokens[:, :1] + self.attention.first_token(tokens))  # (B, 1, D)
            return self.mlp_norm(first + self.mlp(first))
        if pending is not None:
            tokens, normalised = self.attention_norm.after_residual(tokens, *pending)
        else:
            normalised = self.attention_norm(tokens)
        first = tokens[:, :1] + self.attention.first_token(normalised)  # (B, 1, D)
        return first + self.mlp(self.mlp_norm(first))

    def output_deferrable(self, tokens: torch.Tensor) -> bool:
        """Whether this block may leave its MLP's output to the next block (a pre-norm block computing in bf16 on the
        CPU, its MLP's last dropout inactive, no hook on the block or on the MLP's last layers)."""
        return self.pre_norm and bf16_on_cpu(tokens) and not intercepted(self) and self.mlp.last_bias_deferrable()

    def takes_pending(self, tokens: torch.Tensor) -> bool:
        """Whether this block adds a deferred MLP output to `tokens` in its first norm's kernel (pre-norm, no hook on the
        block, the kernel available for these tokens)."""
        return self.pre_norm and not intercepted(self) and self.attention_norm.residual_kernel_applies(tokens)


def mimetic_factors(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two factors A (D, r), B (D, r) with A Bᵀ the best rank-r approximation of `target` (D, D), split evenly (SVD)."""
    left, singular, right = torch.linalg.svd(target)
    root = singular[:rank].sqrt()
    return left[:, :rank] * root, right.T[:, :rank] * root


@torch.no_grad()
def mimetic_init(attention_layer: Attention, generator: torch.Generator | None = None,
                 query_key: tuple[float, float] = (0.7, 0.7), value_output: tuple[float, float] = (0.4, 0.4)) -> None:
    """Trockman & Kolter 2023: per head W_qᵀ W_k ≈ a1 Z1 + b1 I, and W_vᵀ W_oᵀ ≈ a2 Z2 - b2 I, Z with N(0, 1/D) entries.

    With nn.Linear's (out, in) weights, the scores are x W_qᵀ W_k xᵀ and the value path x W_vᵀ W_oᵀ, so those
    D × D products are what is set."""
    hidden = attention_layer.qkv.in_features
    heads, head_size = attention_layer.num_heads, attention_layer.head_size
    eye = torch.eye(hidden)
    weight = attention_layer.qkv.weight  # (3D, D): rows [query; key; value]
    for head in range(heads):
        target = query_key[0] * torch.randn(hidden, hidden, generator=generator) / math.sqrt(hidden) + query_key[1] * eye
        query_t, key_t = mimetic_factors(target, head_size)  # (D, Dh) each: W_q_hᵀ and W_k_hᵀ
        rows = slice(head * head_size, (head + 1) * head_size)
        weight[rows] = query_t.T.to(weight.dtype)
        weight[hidden:][rows] = key_t.T.to(weight.dtype)
    target = value_output[0] * torch.randn(hidden, hidden, generator=generator) / math.sqrt(hidden) - value_output[1] * eye
    value_t, output = mimetic_factors(target, hidden)  # W_vᵀ (D, D) and W_oᵀ's transpose
    weight[2 * hidden:] = value_t.T.to(weight.dtype)
    attention_layer.projection.weight.copy_(output)  # W_oᵀ = output.T, so W_o = output


class VisionTransformer(VitlabModel):
    """ViT for small images. `forward(images)` gives logits (B, classes); with `return_attention=True`
    it gives `(logits, [attention (B, heads, T, T) for each block])`. Tokens are `[CLS] + patches +
    registers` for pool='cls' and `patches + registers` otherwise, patches in row-major grid order
    (`config.patch_tokens` says where they are).
    """

    name = "vit"
    config_class = ViTConfig
    returns_attention = True

    def __init__(self, config: ViTConfig | None = None) -> None:
        super().__init__(config or ViTConfig())
        cfg = self.config
        self.patch_embedding = PatchEmbedding(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size)) if cfg.pool == "cls" else None
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.registers, cfg.hidden_size)) if cfg.registers else None
        if cfg.pos_embed == "learned":
            self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.hidden_size))
        else:
            self.register_buffer("position_embedding", sincos_position_embedding(cfg.grid_size, cfg.hidden_size)[None], persistent=False)
        self.embedding_dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        # Post-norm blocks end in a LayerNorm already (as nn.TransformerEncoder without a final norm). Under sequence
        # pooling the norm's output only feeds products (the pooling weights' linear layer and the weighted sum), so it
        # comes in bf16 from the C kernel under CPU autocast, as a block's norms do.
        final_norm = MatmulInputNorm if cfg.pool == "seq" else nn.LayerNorm
        self.norm = final_norm(cfg.hidden_size) if cfg.norm == "pre" else nn.Identity()
        self.pool_weights = nn.Linear(cfg.hidden_size, 1) if cfg.pool == "seq" else None
        self.head = nn.Linear(cfg.hidden_size, cfg.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_linear_weights)
        if isinstance(self.position_embedding, nn.Parameter):
            nn.init.trunc_normal_(self.position_embedding, std=0.02)
        for token in (self.cls_token, self.register_tokens):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
        for group in self.patch_embedding.modules():
            if isinstance(group, ConvGroup):
                group.reset_filters()  # identities again, after the generic init above
        if self.config.init == "mimetic":
            for block in self.blocks:
                mimetic_init(block.attention)
        # A zero head starts every class at equal probability (timm does the same for fine-tuning).
        nn.init.zeros_(self.head.weight)

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The weight matrices inside the network, for `--optimizer muon-adamw`: every linear map of the blocks and the
        filters of a conv-group tokenizer (each followed by BatchNorm). The patch embedding of the other stems, the
        tokens, positions, pooling and head stay with AdamW, as Muon's authors advise. The fused (3D, D) query-key-value
        matrix is orthogonalised as one matrix (modded-nanogpt splits it into three; `vit-fast` was tuned this way)."""
        linears = [m.weight for m in self.blocks.modules() if isinstance(m, nn.Linear)]
        filters = [weight for group in self.patch_embedding.modules() if isinstance(group, ConvGroup) for weight in group.filters()]
        return filters + linears

    def token_layout(self) -> TokenLayout:
        cfg = self.config
        return TokenLayout(prefix_tokens=1 if cfg.pool == "cls" else 0, grid_size=cfg.grid_size, patch_size=cfg.patch_size,
                           padding=self.patch_embedding.padding[0], readout="cls" if cfg.pool == "cls" else "mean",
                           num_layers=cfg.num_blocks, num_heads=cfg.num_heads, suffix_tokens=cfg.registers)

    def token_layer(self) -> nn.Module:
        if not self.blocks:
            raise VitlabError("a ViT with num_blocks 0 has no attention to explain; train one with num_blocks >= 1")
        return self.blocks[-1].attention_norm

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        tokens = self.patch_embedding(images) + self.position_embedding  # (B, N, D)
        batch = tokens.shape[0]
        parts = [self.cls_token.expand(batch, -1, -1)] if self.cls_token is not None else []  # the CLS token has no position
        parts.append(tokens)
        if self.register_tokens is not None:
            parts.append(self.register_tokens.expand(batch, -1, -1))  # (B, R, D), no position either
        tokens = torch.cat(parts, dim=1) if len(parts) > 1 else tokens  # (B, T, D)
        tokens = self.embedding_dropout(tokens)
        attention_maps = []
        pending = None  # the previous block's MLP output, left for this block's first norm to add (Block.forward)
        cls_only = not return_attention and self.reads_only_the_cls_token()
        for index, block in enumerate(self.blocks):
            following = self.blocks[index + 1] if index + 1 < len(self.blocks) else None
            defer = following is not None and following.takes_pending(tokens) and block.output_deferrable(tokens)
            if cls_only and following is None:  # (a block whose forward was replaced never gets here: intercepted)
                tokens, weights, *rest = block(tokens, pending=pending, first_token_only=True)  # (B, 1, D)
            else:
                tokens, weights, *rest = block(tokens, return_attention, pending=pending, defer_output=defer)
            pending = rest[0] if defer else None
            attention_maps.append(weights)
        if self.cls_token is not None and not intercepted_itself(self.norm):
            # The final LayerNorm acts on each token alone and CLS pooling reads one: normalise only that one (the last
            # block may have computed only that one).
            pooled = self.norm(tokens[:, 0])  # (B, D)
        else:
            pooled = self.pool(self.norm(tokens))  # (B, D)
        logits = self.head(pooled)  # (B, num_classes)
        return (logits, attention_maps) if return_attention else logits

    def reads_only_the_cls_token(self) -> bool:
        """Whether nothing reads the last block's outputs but the CLS token's, so that the block may compute only that
        one: CLS pooling, and no hook or replaced forward on the last block, on anything in it or on the final norm (a
        hook there would expect the other tokens). A global hook (a FLOP counter's module tracker) sees the modules the
        path runs, so it does not stop it: FLOPs are counted for the path that trains (models/flops.py)."""
        return (self.cls_token is not None and len(self.blocks) > 0 and not intercepted_itself(self.norm)
                and not any(intercepted_itself(module) for module in self.blocks[-1].modules()))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) → (B, D): the CLS token, the mean of the patch tokens, or their learned weighting."""
        if self.cls_token is not None:
            return tokens[:, 0]
        patches = tokens[:, self.config.patch_tokens]  # (B, N, D)
        if self.pool_weights is None:
            return patches.mean(dim=1)
        weights = self.pool_weights(patches).softmax(dim=1)  # (B, N, 1)
        return (weights.transpose(1, 2) @ patches).squeeze(1)  # one product (B, 1, N) @ (B, N, D), not a broadcast and a sum
