"""`vitlab models`: the models and presets with their parameter counts."""

from __future__ import annotations

import argparse
import dataclasses
import json


def add_parser(commands) -> None:
    commands.add_parser("models", help="list models and presets with parameter counts")


def run(args: argparse.Namespace) -> None:
    from vitlab.errors import VitlabError
    from vitlab.models import MODELS, build_model
    from vitlab.presets import PRESETS

    print(f"{'model':<14}{'parameters':>12}  default config")
    for name in MODELS:
        try:
            model = build_model(name)
        except VitlabError as error:  # an optional dependency is missing (timm)
            print(f"{name:<14}{'-':>12}  {error}")
            continue
        note = "  (the default; any timm architecture with --model timm:NAME)" if name == "timm" else ""
        print(f"{name:<14}{model.num_parameters:>12,}  {json.dumps(dataclasses.asdict(model.config))}{note}")
    print(f"\n{'preset':<14}{'parameters':>12}  recipe")
    for name, preset in PRESETS.items():
        model = build_model(preset.model, **preset.model_config)
        print(f"{name:<14}{model.num_parameters:>12,}  {preset.description}; train {json.dumps(preset.train)}")
