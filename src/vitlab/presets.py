"""Named recipes: a model, its config and the training settings that go with it.

`vitlab train --preset NAME` starts from a preset; any flag given on top of it wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vitlab.errors import VitlabError


@dataclass(frozen=True)
class Preset:
    model: str
    description: str
    model_config: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "vit-seed000": Preset("vit", "seed 000's ViT: patch 2, width 64, 10 blocks (4 heads: its 3 do not divide 64)",
                          {"patch_size": 2, "hidden_size": 64, "num_heads": 4, "num_blocks": 10}, {"epochs": 20}),
    "vit-seed001": Preset("vit", "seed 001's ViT: patch 4, width 64, 4 blocks, 4 heads",
                          {"patch_size": 4, "hidden_size": 64, "num_heads": 4, "num_blocks": 4}, {"epochs": 20}),
    "vit-seed002": Preset("vit", "seed 002's ViT: patch 4, width 128, 6 blocks, 4 heads, dropout 0.1",
                          {"patch_size": 4, "hidden_size": 128, "num_heads": 4, "num_blocks": 6, "dropout": 0.1}, {"epochs": 20}),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise VitlabError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)} (see 'vitlab models')") from None
