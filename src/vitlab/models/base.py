"""What every vitlab model shares: a dataclass config, and save/load as safetensors + JSON.

A saved model is two files side by side: `model.safetensors` (weights only, no code can run when
they are read) and `model.json` (`{"model": name, "config": {...}}`), enough to rebuild the module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.io import read_json, read_tensors, write_json, write_tensors
from vitlab.rundir import MODEL_FILE, RESULTS_FILE, WEIGHTS_FILE

# Config fields that the data decides (image size, number of classes): not flags, set from the dataset.
FROM_DATA = {"from_data": True}

# CIFAR-10's class names and per-channel statistics (pixels / 255) of its 50,000 training images.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a model expects and means: the dataset's class names and the statistics its images are normalised
    with. Saved in model.json, so any command can prepare images for any run (CIFAR-10 when absent)."""

    classes: tuple[str, ...] = CIFAR10_CLASSES
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    dataset: str = "cifar10"

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → float32, standardised with these statistics."""
        from vitlab.data import normalize

        return normalize(images, mean=self.mean, std=self.std)

    @classmethod
    def from_dict(cls, values) -> InputSpec:
        if not isinstance(values, dict):
            return cls()
        try:
            spec = cls(classes=tuple(str(c) for c in values["classes"]), mean=tuple(float(v) for v in values["mean"]),
                       std=tuple(float(v) for v in values["std"]), dataset=str(values.get("dataset", "?")))
        except (KeyError, TypeError, ValueError):
            raise VitlabError("model.json has a damaged 'data' section (classes, mean, std); the run folder is corrupt") from None
        if len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0 or not spec.classes:
            raise VitlabError("model.json has impossible input statistics; the run folder is corrupt")
        return spec


@dataclass(frozen=True)
class TokenLayout:
    """How a transformer's tokens map onto its input image, for attention maps and token CAMs.

    Tokens are `prefix_tokens` (CLS; timm's registers) first, then a `grid_size` × `grid_size` grid of
    `patch_size`-pixel patches in row-major order, then `suffix_tokens` (vitlab's registers). The grid starts `padding` pixels before the image's
    top-left corner (vitlab pads symmetrically); a grid smaller than the image (timm drops the pixels a
    patch size does not divide) leaves the rest of the image uncovered.

    Args:
        prefix_tokens: tokens before the patches (1 for a CLS token, 0 for a mean-pooled vitlab ViT).
        grid_size: patches per side.
        patch_size: pixels per patch side.
        padding: pixels of padding before the first patch row and column.
        readout: 'cls' (the logits read the first token) or 'mean' (they read the mean, or for sequence pooling a
            learned weighting, of the patch tokens).
        num_layers: attention layers.
        num_heads: heads per layer.
        suffix_tokens: tokens after the patches (vitlab's register tokens).
    """

    prefix_tokens: int
    grid_size: int
    patch_size: int
    padding: int
    readout: str
    num_layers: int
    num_heads: int
    suffix_tokens: int = 0

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_tokens(self) -> slice:
        """Where the patch tokens sit in the token sequence."""
        return slice(self.prefix_tokens, self.prefix_tokens + self.num_patches)

    @property
    def num_tokens(self) -> int:
        return self.prefix_tokens + self.num_patches + self.suffix_tokens


class VitlabModel(nn.Module):
    """Base class: subclasses set `name` and `config_class` and take their config in `__init__`."""

    name: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.input_spec = InputSpec()  # set from the training data by vitlab.train.run; saved in model.json

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # Capabilities a model may declare (subclasses override):
    has_stages: ClassVar[bool] = False  # stages() names convolutional stages (feature maps, Grad-CAM)
    returns_attention: ClassVar[bool] = False  # forward(images, return_attention=True) gives (logits, maps)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of each convolutional stage whose output is a feature map."""
        raise VitlabError(f"model '{self.name}' has no convolutional stages to show; use a CNN run")

    def token_layout(self) -> TokenLayout:
        """Where a transformer's tokens sit on the image (models that return attention)."""
        raise VitlabError(f"model '{self.name}' has no attention maps to show; use a ViT run")

    def token_layer(self) -> nn.Module:
        """A module whose output (B, T, D) holds every token just before the last block mixes them:
        the layer token-CAMs explain (Grad-CAM on ViTs, as pytorch-grad-cam's tutorial does)."""
        raise VitlabError(f"model '{self.name}' has no token layer to explain; use a ViT run")

    def scale_invariant_filters(self) -> list[nn.Parameter]:
        """Convolution filters whose output a BatchNorm normalises, so that their scale does not change what the
        model computes: what `--optimizer muon` may move (and rescale). None unless a model declares them."""
        return []

    def init_from_data(self, images: torch.Tensor) -> None:
        """Set data-dependent weights from normalised training images (B, 3, H, W) before training; most models have none."""

    def describe(self) -> dict:
        """The JSON-serialisable identity of this model: its name, its config and what its inputs and outputs mean."""
        return {"model": self.name, "config": dataclasses.asdict(self.config), "data": dataclasses.asdict(self.input_spec)}

    def save(self, directory: str | Path) -> Path:
        """Write `model.safetensors` and `model.json` into `directory`; returns the weights path. A finished run's folder
        is refused: its weights belong to its results."""
        directory = Path(directory)
        if (directory / RESULTS_FILE).is_file():
            raise VitlabError(f"{directory} holds a finished run (it has {RESULTS_FILE}), whose weights this would replace; save into another folder")
        # contiguous() also makes channels_last weights portable across memory formats.
        state = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}
        write_tensors(directory / WEIGHTS_FILE, state)
        write_json(directory / MODEL_FILE, self.describe())
        return directory / WEIGHTS_FILE

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "VitlabModel":
        """Rebuild a saved model from a run folder, or from its `model.safetensors`/`model.json` path.

        Called on a subclass (`VisionTransformer.load`), it also checks the saved model is that kind.
        """
        from safetensors import SafetensorError

        from vitlab.models import build_model

        path = Path(path)
        if not path.exists():
            raise VitlabError(f"{path} does not exist; pass a run folder written by 'vitlab train' or its model.safetensors")
        directory = path if path.is_dir() else path.parent
        weights, description_file = directory / WEIGHTS_FILE, directory / MODEL_FILE
        if not weights.exists():
            raise VitlabError(f"no saved model in {directory} (missing {WEIGHTS_FILE}); pass a run folder written by 'vitlab train'")
        description = read_json(description_file, "model description")
        try:
            model = build_model(description["model"], **description["config"])
        except (KeyError, TypeError) as error:
            raise VitlabError(f"{description_file} does not describe a vitlab model ({error}); it is corrupt or from another tool") from None
        model.input_spec = InputSpec.from_dict(description.get("data")) if isinstance(description, dict) else InputSpec()
        if len(model.input_spec.classes) != getattr(model.config, "num_classes", len(model.input_spec.classes)):
            raise VitlabError(f"{description_file} names {len(model.input_spec.classes)} classes for a model with "
                              f"{model.config.num_classes} outputs; the run folder is corrupt")
        if cls is not VitlabModel and not isinstance(model, cls):
            raise VitlabError(f"{directory} holds a '{model.name}' model, not a {cls.__name__}; load it with vitlab.load_model")
        try:
            state = read_tensors(weights)
        except (SafetensorError, OSError, ValueError) as error:
            raise VitlabError(f"cannot read {weights} ({error}); the file is corrupt or truncated, retrain or copy it again") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0]
            raise VitlabError(f"{weights} does not match {description_file} ({first_line}); the two files come from different runs") from None
        return model.to(device)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Switch `model` to eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def init_linear_weights(module: nn.Module) -> None:
    """Truncated-normal(0.02) linear/conv weights and zero biases: the ViT paper's (and timm's) init."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ThreadSwitch:
    """A switch per thread, off unless `on()` holds it on (nested uses restore what they found)."""

    def __init__(self) -> None:
        self._state = threading.local()

    @contextlib.contextmanager
    def on(self):
        previous = getattr(self._state, "on", False)
        self._state.on = True
        try:
            yield
        finally:
            self._state.on = previous

    def is_on(self) -> bool:
        return getattr(self._state, "on", False)


def has_own_hooks(module: nn.Module) -> bool:
    """Whether a hook registered on this module itself would see its inputs or outputs."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, getattr(module, "_backward_pre_hooks", None))
    return any(own)


def has_hooks(module: nn.Module) -> bool:
    """Whether a hook (the module's own or a global one) would see this module's inputs or outputs."""
    return has_own_hooks(module) or global_hooks()


def global_hooks() -> bool:
    """Whether a global module hook is registered (nn.modules.module.register_module_forward_hook and the like)."""
    global_names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
    return any(getattr(nn.modules.module, name, None) for name in global_names)


def intercepted_itself(module: nn.Module) -> bool:
    """Whether a hook registered on the module itself or a forward set on the instance changes what calling it runs
    (global hooks aside: they see whichever modules a path calls)."""
    return has_own_hooks(module) or "forward" in vars(module)


def intercepted(module: nn.Module) -> bool:
    """Whether calling the module runs more or other code than its class's forward: a hook (`has_hooks`) or a forward
    set on the instance. The fused paths, which compute a module's work without calling it, step aside for such a
    module."""
    return intercepted_itself(module) or has_hooks(module)


def cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype CPU autocast casts matmul inputs to right now, or None when it is off."""
    try:
        enabled, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    except TypeError:  # torch < 2.4
        enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return dtype if enabled else None


def bf16_on_cpu(x: torch.Tensor) -> bool:
    """Whether a linear layer's output from x will be bf16 on the CPU (x bf16, or CPU bf16 autocast on)."""
    return x.device.type == "cpu" and (x.dtype == torch.bfloat16 or cpu_autocast_dtype() == torch.bfloat16)


def inactive_dropout(module: nn.Module) -> bool:
    """Whether `module` is a dropout (an nn.Dropout, vitlab's included) that passes its input through now: its own
    `training` off or p = 0, and no hook or forward replaced on it that would see it run."""
    return isinstance(module, nn.Dropout) and (not module.training or module.p == 0.0) and not intercepted(module)


def plain_linear(module: nn.Module) -> bool:
    """Whether `module` is an nn.Linear whose forward nothing replaced, on its class or on itself (a fused path may then
    use its weight and bias itself), and no hook would see it run."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward and not intercepted(module)
