"""The `vitlab` command line. Flags are derived from the config dataclasses, so every config field
is a flag (in both the seeds' `--batch_size` and the `--batch-size` spelling)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from vitlab.config import DataConfig, RunConfig, TrainConfig
from vitlab.errors import VitlabError
from vitlab.models import MODELS, build_model, model_class
from vitlab.presets import PRESETS, get_preset

DEFAULT_MODEL = "cnn-small"


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (plus the --help hint), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def docstring_args(cls: type) -> dict[str, str]:
    """The `name: text` lines of a dataclass's `Args:` docstring section, for --help."""
    return dict(re.findall(r"^\s+(\w+): (.+)$", cls.__doc__ or "", flags=re.MULTILINE))


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def parse_int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,128, got '{text}'") from None


def flag_parser(annotation: Any):
    """argparse `type=` for a resolved dataclass field annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if annotation is bool:
        return parse_bool
    if typing.get_origin(annotation) is tuple:
        return parse_int_tuple
    return annotation


def add_config_flags(group, cls: type, seen: set[str], help_override: dict[str, str] | None = None) -> None:
    """One flag per field of `cls` (default None = 'not given'); fields shared by models are added once."""
    hints, help_texts = typing.get_type_hints(cls), docstring_args(cls) | (help_override or {})
    for config_field in dataclasses.fields(cls):
        name = config_field.name
        if name in seen:
            continue
        seen.add(name)
        spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        group.add_argument(*spellings, dest=name, type=flag_parser(hints[name]), default=None,
                           metavar=name.upper(), help=help_texts.get(name, ""))


def model_flag_help() -> dict[str, str]:
    """Help for each model setting, naming the models that have it: '[vit] token width ...; [mlp] width of ...'."""
    texts: dict[str, dict[str, list[str]]] = {}
    for model_name, cls in MODELS.items():
        for name, text in docstring_args(cls.config_class).items():
            texts.setdefault(name, {}).setdefault(text, []).append(model_name)
    return {name: "; ".join(f"[{', '.join(models)}] {text.rstrip('.')}" for text, models in by_text.items()) for name, by_text in texts.items()}


def model_fields() -> dict[str, set[str]]:
    return {name: {f.name for f in dataclasses.fields(cls.config_class)} for name, cls in MODELS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="vitlab", description="Train, compare and look inside ViTs and CNNs on CIFAR-10.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)

    train = commands.add_parser("train", help="train a model and write a run folder",
                                description="Train a model on CIFAR-10; writes config, metrics, weights, results and curves to --out.")
    train.add_argument("--model", choices=list(MODELS), help=f"architecture (default {DEFAULT_MODEL})")
    train.add_argument("--preset", help="start from a named recipe (see 'vitlab models')")
    train.add_argument("--out", help="run folder to create (default runs/<model>-<time>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoint (takes no other settings)")
    seen: set[str] = {"model", "preset"}
    model_group = train.add_argument_group("model settings (each applies to the models that have it)")
    model_help = model_flag_help()
    for cls in MODELS.values():
        add_config_flags(model_group, cls.config_class, seen, model_help)
    add_config_flags(train.add_argument_group("data settings"), DataConfig, seen)
    add_config_flags(train.add_argument_group("training settings"), TrainConfig, seen)

    evaluate = commands.add_parser("evaluate", help="test a saved run and print JSON")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--data-dir", "--data_dir", dest="data_dir", help="folder holding CIFAR-10")
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="device to evaluate on")

    commands.add_parser("models", help="list models and presets with parameter counts")
    return parser


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """Preset values, then the flags given on the command line; everything else keeps its default."""
    preset = get_preset(args.preset) if args.preset else None
    model = args.model or (preset.model if preset else DEFAULT_MODEL)
    if preset and args.model and args.model != preset.model:
        raise VitlabError(f"--preset {args.preset} is a '{preset.model}' model but --model says '{args.model}'; drop one of them")
    model_class(model)
    given = {key: value for key, value in vars(args).items() if value is not None}
    own_fields = model_fields()[model]
    all_model_fields = set().union(*model_fields().values())
    foreign = sorted(name for name in given if name in all_model_fields and name not in own_fields)
    if foreign:
        raise VitlabError(f"--{foreign[0]} does not apply to model '{model}'; its settings are {', '.join(sorted(own_fields))}")
    model_config = dict(preset.model_config) if preset else {}
    model_config.update({name: given[name] for name in own_fields if name in given})
    data_values = dict(preset.data) if preset else {}
    data_values.update({f.name: given[f.name] for f in dataclasses.fields(DataConfig) if f.name in given})
    train_values = dict(preset.train) if preset else {}
    train_values.update({f.name: given[f.name] for f in dataclasses.fields(TrainConfig) if f.name in given})
    return RunConfig(model=model, model_config=model_config, data=DataConfig(**data_values),
                     train=TrainConfig(**train_values), preset=args.preset)


def command_train(args: argparse.Namespace) -> None:
    from vitlab.training import resume_run, train_run

    if args.resume:
        given = sorted(key for key, value in vars(args).items() if value is not None and key not in ("command", "resume"))
        if given:
            raise VitlabError(f"--resume continues a run with its saved settings; drop --{given[0]}")
        results = resume_run(args.resume)
    else:
        results = train_run(run_config_from_args(args), args.out)
    print(f"test accuracy {results['test_acc']:.2f}% (test loss {results['test_loss']:.4f}, "
          f"best validation {results['best_val_acc']:.2f}%), {results['train_seconds']:.0f} s of training "
          f"at {results['images_per_second']:.0f} img/s; results in {results['out_dir']}")


def command_evaluate(args: argparse.Namespace) -> None:
    from vitlab.training import evaluate_run

    print(json.dumps(evaluate_run(args.run_dir, args.data_dir, args.device), indent=2))


def command_models(args: argparse.Namespace) -> None:
    print(f"{'model':<14}{'parameters':>12}  default config")
    for name in MODELS:
        model = build_model(name)
        print(f"{name:<14}{model.num_parameters:>12,}  {json.dumps(dataclasses.asdict(model.config))}")
    print(f"\n{'preset':<14}{'parameters':>12}  recipe")
    for name, preset in PRESETS.items():
        model = build_model(preset.model, **preset.model_config)
        print(f"{name:<14}{model.num_parameters:>12,}  {preset.description}; train {json.dumps(preset.train)}")


COMMANDS = {"train": command_train, "evaluate": command_evaluate, "models": command_models}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        COMMANDS[args.command](args)
    except VitlabError as error:
        print(f"vitlab {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
