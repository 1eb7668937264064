"""Any timm model as a vitlab model: `vitlab train --model timm:resnet18`.

timm (Wightman, pytorch-image-models) builds the network; this wrapper gives it what every vitlab model
has: a typed config saved in model.json (so `VitlabModel.load` rebuilds it), the image size and number
of classes taken from the data, stages for CAMs and feature maps on timm CNNs, and attention maps for
timm ViTs. The weights are always random (`pretrained=False`): nothing is downloaded.

Attention of a timm ViT: timm's `Attention` calls the fused `F.scaled_dot_product_attention`, which
never materialises the weights. For `forward(images, return_attention=True)` each block's attention
is switched to timm's own explicit path for that one call, and a hook on its `attn_drop` reads the
softmax(Q Kᵀ / √d) probabilities that path feeds into the dropout (the identity in eval mode).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vitlab.config import check_finite_numbers, parse_keyword_arguments
from vitlab.errors import VitlabError
from vitlab.models.base import FROM_DATA, TokenLayout, VitlabModel, eval_mode

INSTALL_HINT = "pip install 'vitlab[timm]'"
# Keyword arguments vitlab decides itself: random weights only, 3 colour channels, classes from the data.
RESERVED_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "num_classes", "in_chans")


def import_timm():
    """The timm package, or a one-line error saying how to install it."""
    try:
        import timm
    except ImportError:
        raise VitlabError(f"timm models need the timm package; {INSTALL_HINT}") from None
    return timm


@dataclass
class TimmConfig:
    """A timm architecture and the keyword arguments it is built with (always pretrained=False).

    Args:
        architecture: timm model name (timm.list_models()), e.g. resnet18 or vit_tiny_patch16_224; --model timm:NAME sets it.
        timm_kwargs: extra keyword arguments for timm.create_model as NAME=VALUE,... (e.g. img_size=32,patch_size=4 for a ViT
            on 32×32 images); numbers and true/false are converted, anything else stays text. A ViT's img_size is the data's
            image size unless given.
        image_size: side of the square input image.
        num_classes: number of output logits.
    """

    architecture: str = "resnet18"
    timm_kwargs: dict[str, int | float | bool | str] = field(default_factory=dict)
    image_size: int = field(default=32, metadata=FROM_DATA)
    num_classes: int = field(default=10, metadata=FROM_DATA)

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        if isinstance(self.timm_kwargs, str):  # the Python API may pass the flag's text
            self.timm_kwargs = parse_keyword_arguments(self.timm_kwargs)
        self.timm_kwargs = dict(self.timm_kwargs)
        for name, value in self.timm_kwargs.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise VitlabError(f"timm_kwargs {name} must be finite, got {value}; fix --timm_kwargs")
        if not isinstance(self.architecture, str) or not self.architecture.strip():
            raise VitlabError("architecture must name a timm model such as resnet18 (--model timm:resnet18)")
        reserved = sorted(set(self.timm_kwargs) & set(RESERVED_KWARGS))
        if reserved:
            raise VitlabError(f"timm_kwargs may not set {reserved[0]}: vitlab sets it (random weights, 3 channels, classes from the data); drop it")
        img_size = self.timm_kwargs.get("img_size")
        if img_size is not None and img_size != self.image_size:
            raise VitlabError(f"timm_kwargs img_size={img_size} differs from the data's image size {self.image_size}; drop img_size (vitlab sets it)")


def takes_fixed_input_size(timm, architecture: str) -> bool:
    """Whether timm builds the model for one input size (ViTs: position tables), so img_size must be passed."""
    try:
        return bool(getattr(timm.get_pretrained_cfg(architecture), "fixed_input_size", False))
    except (RuntimeError, ValueError, KeyError):
        return False


@contextlib.contextmanager
def recorded_attention(attention_modules: list[nn.Module]):
    """Within the block, every given timm `Attention` runs its explicit path and appends its softmax
    probabilities (B, heads, T, T) to the yielded list, in the order the modules run."""
    maps: list[torch.Tensor] = []
    fused = [module.fused_attn for module in attention_modules]
    # attn_drop's input is exactly softmax(q k^T * scale) (timm layers/attention.py, non-fused branch).
    handles = [module.attn_drop.register_forward_pre_hook(lambda _module, args: maps.append(args[0])) for module in attention_modules]
    for module in attention_modules:
        module.fused_attn = False
    try:
        yield maps
    finally:
        for module, was_fused in zip(attention_modules, fused, strict=True):
            module.fused_attn = was_fused
        for handle in handles:
            handle.remove()


class TimmModel(VitlabModel):
    """A network built by `timm.create_model(architecture, pretrained=False, num_classes=..., **timm_kwargs)`.

    It holds the timm module as `network`. Capabilities depend on the architecture: timm CNNs (those
    whose `feature_info` stages give (B, C, h, w) maps) have stages; timm VisionTransformers with
    timm's standard attention return attention.
    """

    name = "timm"
    config_class = TimmConfig

    def __init__(self, config: TimmConfig | None = None) -> None:
        super().__init__(config or TimmConfig())
        timm = import_timm()
        cfg = self.config
        if not timm.is_model(cfg.architecture):
            close = difflib.get_close_matches(cfg.architecture, timm.list_models(), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
            raise VitlabError(f"timm has no model '{cfg.architecture}'; {hint}")
        kwargs = dict(cfg.timm_kwargs)
        if takes_fixed_input_size(timm, cfg.architecture):
            kwargs.setdefault("img_size", cfg.image_size)
        try:
            self.network = timm.create_model(cfg.architecture, pretrained=False, num_classes=cfg.num_classes, **kwargs)
        except (TypeError, ValueError, AssertionError, ArithmeticError, IndexError, KeyError) as error:  # e.g. patch_size=0
            raise VitlabError(f"timm could not build '{cfg.architecture}' with {kwargs or 'no keyword arguments'} "
                              f"({str(error).strip() or type(error).__name__}); fix --timm_kwargs") from None

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        if not return_attention:
            return self.network(images)  # (B, num_classes)
        with recorded_attention(self.attention_modules()) as maps:
            logits = self.network(images)  # (B, num_classes)
        return logits, maps  # maps: one (B, heads, T, T) per block

    def no_weight_decay(self) -> set[str]:
        """timm's own list of parameters not to decay (CLS token, position table, ...), as names in this module."""
        names = self.network.no_weight_decay() if hasattr(self.network, "no_weight_decay") else set()
        return {f"network.{name}" for name in names}

    # ------------------------------------------------------------ ViTs: attention

    def attention_modules(self) -> list[nn.Module]:
        """Each block's attention, for a timm VisionTransformer built from timm's standard `Attention`."""
        modules = self.standard_attention_modules
        if not modules:
            raise VitlabError(f"timm model '{self.config.architecture}' is not a timm VisionTransformer with standard attention; "
                              "attention maps are for models such as vit_tiny_patch16_224 or deit_tiny_patch16_224")
        return modules

    @functools.cached_property
    def standard_attention_modules(self) -> list[nn.Module]:
        from timm.layers import Attention
        from timm.models.vision_transformer import VisionTransformer

        network = self.network
        if not isinstance(network, VisionTransformer) or not len(network.blocks):
            return []
        modules = [getattr(block, "attn", None) for block in network.blocks]
        grid, patch = network.patch_embed.grid_size, network.patch_embed.patch_size
        square = grid[0] == grid[1] and patch[0] == patch[1]
        return modules if square and all(type(module) is Attention for module in modules) else []

    @property
    def returns_attention(self) -> bool:  # type: ignore[override]  (a class constant for vitlab's own models)
        return bool(self.standard_attention_modules)

    def token_layout(self) -> TokenLayout:
        modules = self.attention_modules()
        network = self.network
        # 'token' reads the CLS token; the other pools ('avg', 'map', ...) read all patch tokens.
        return TokenLayout(prefix_tokens=network.num_prefix_tokens, grid_size=network.patch_embed.grid_size[0],
                           patch_size=network.patch_embed.patch_size[0], padding=0,
                           readout="cls" if network.global_pool == "token" else "mean", num_layers=len(modules), num_heads=modules[0].num_heads)

    def token_layer(self) -> nn.Module:
        self.attention_modules()
        return self.network.blocks[-1].norm1

    # ------------------------------------------------------------ CNNs: stages

    @functools.cached_property
    def stage_modules(self) -> list[tuple[str, nn.Module]]:
        """timm's `feature_info` names each stage; kept are those whose output is a (B, C, h, w) feature map
        (found with one probe forward pass: some models name modules with (B, h, w, C) or token outputs)."""
        if self.standard_attention_modules:
            return []
        candidates = []
        for entry in list(getattr(self.network, "feature_info", None) or []):
            if isinstance(entry, dict) and {"module", "num_chs", "reduction"} <= set(entry):
                with contextlib.suppress(AttributeError):
                    candidates.append((entry, self.network.get_submodule(entry["module"])))
        shapes: dict[int, torch.Size | None] = {}

        def keep_shape(index: int):
            def hook(module, inputs, output) -> None:  # returns None: the output passes on unchanged
                shapes.setdefault(index, getattr(output, "shape", None))
            return hook

        handles = [module.register_forward_hook(keep_shape(index)) for index, (_, module) in enumerate(candidates)]
        try:
            device = next(self.parameters()).device
            with eval_mode(self), torch.no_grad():
                self.network(torch.zeros(1, 3, self.config.image_size, self.config.image_size, device=device))
        except RuntimeError:
            return []
        finally:
            for handle in handles:
                handle.remove()
        return [(f"{entry['module']} ({entry['num_chs']} ch, 1/{entry['reduction']})", module)
                for index, (entry, module) in enumerate(candidates)
                if shapes.get(index) is not None and len(shapes[index]) == 4 and shapes[index][1] == entry["num_chs"]]

    @property
    def has_stages(self) -> bool:  # type: ignore[override]  (a class constant for vitlab's own models)
        return bool(self.stage_modules)

    def stages(self) -> list[tuple[str, nn.Module]]:
        if not self.stage_modules:
            raise VitlabError(f"timm model '{self.config.architecture}' has no convolutional stages with (B, C, h, w) outputs to show; "
                              "use a timm CNN such as resnet18")
        return self.stage_modules
