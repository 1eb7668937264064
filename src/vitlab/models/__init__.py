"""Model registry: one place that turns a model name and config values into a module."""

from __future__ import annotations

import dataclasses

from vitlab.errors import VitlabError
from vitlab.models.aircnn import AirCNN, AirCNNConfig
from vitlab.models.base import VitlabModel
from vitlab.models.cnn import CNN, CNNConfig, SmallCNN, SmallCNNConfig
from vitlab.models.mlp import MLP, MLPConfig
from vitlab.models.timm_model import TimmConfig, TimmModel
from vitlab.models.vit import VisionTransformer, ViTConfig

MODELS: dict[str, type[VitlabModel]] = {cls.name: cls for cls in (SmallCNN, CNN, AirCNN, MLP, VisionTransformer, TimmModel)}

# Models whose name may carry one setting after a colon: `timm:resnet18` is model 'timm' with architecture=resnet18.
NAMED_VARIANTS: dict[str, str] = {"timm": "architecture"}


def split_model_name(text: str) -> tuple[str, dict[str, str]]:
    """'timm:resnet18' → ('timm', {'architecture': 'resnet18'}); 'vit' → ('vit', {})."""
    name, colon, variant = text.partition(":")
    if not colon:
        return text, {}
    if name not in NAMED_VARIANTS or not variant.strip():
        raise VitlabError(f"--model {text}: only {', '.join(f'{n}:NAME' for n in NAMED_VARIANTS)} takes a name after a colon; "
                          f"choose one of {', '.join(MODELS)} or e.g. timm:resnet18")
    return name, {NAMED_VARIANTS[name]: variant.strip()}


def config_fields(model_name: str) -> list[dataclasses.Field]:
    return list(dataclasses.fields(model_class(model_name).config_class))


def model_setting_names(model_name: str | None = None) -> set[str]:
    """The settings of one model, or (no name) of any model."""
    classes = [model_class(model_name)] if model_name else list(MODELS.values())
    return {field.name for cls in classes for field in dataclasses.fields(cls.config_class)}


def model_class(model_name: str) -> type[VitlabModel]:
    try:
        return MODELS[model_name]
    except KeyError:
        raise VitlabError(f"unknown model '{model_name}'; choose one of {', '.join(MODELS)} (see 'vitlab models')") from None


def model_name_of(config) -> str:
    """The registered name of the model a config object belongs to ('vit' for a ViTConfig)."""
    for name, cls in MODELS.items():
        if type(config) is cls.config_class:
            return name
    raise VitlabError(f"{type(config).__name__} is not the config of a vitlab model; use one of "
                      f"{', '.join(cls.config_class.__name__ for cls in MODELS.values())}")


def model_from_config(config) -> VitlabModel:
    """Build the model a config object describes (its class names the model)."""
    return construct(MODELS[model_name_of(config)], config)


def construct(cls: type[VitlabModel], config) -> VitlabModel:
    """`cls(config)`, with a model too large for this machine's memory turned into a one-line error."""
    try:
        return cls(config)
    except (RuntimeError, MemoryError) as error:
        if not isinstance(error, MemoryError) and "allocate" not in str(error):
            raise
        raise VitlabError(f"a '{cls.name}' model with these settings does not fit in this machine's memory; choose smaller sizes "
                          "(e.g. --hidden_size, --widths, --num_blocks)") from None


def build_model(model_name: str, **config_values) -> VitlabModel:
    """Build a model by name; `config_values` override its config's defaults."""
    cls = model_class(model_name)
    known = {field.name for field in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(config_values) - known)
    if unknown:
        raise VitlabError(f"model '{model_name}' has no setting {', '.join(unknown)}; its settings are {', '.join(sorted(known))}")
    return construct(cls, cls.config_class(**config_values))


__all__ = [
    "AirCNN", "AirCNNConfig", "CNN", "CNNConfig", "MLP", "MLPConfig", "MODELS", "NAMED_VARIANTS", "SmallCNN", "SmallCNNConfig",
    "TimmConfig", "TimmModel", "split_model_name",
    "VisionTransformer", "ViTConfig", "VitlabModel", "build_model", "config_fields", "model_from_config", "model_name_of", "model_class", "model_setting_names",
]
