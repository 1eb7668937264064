"""The command line's parser: flags derived from the config dataclasses.

Every model, data and training setting is a flag (in the seeds' `--batch_size` and the `--batch-size`
spelling), stored under a `setting:` destination so the commands collect them without a deny-list.
Settings the data decides (image size, number of classes) are not flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

from vitlab.config import DataConfig, TrainConfig, flag_parser
from vitlab.models import MODELS

SETTING = "setting:"  # argparse destination prefix of every config flag


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (plus the --help hint), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def docstring_args(cls: type) -> dict[str, str]:
    """The `name: text` entries of a dataclass's `Args:` docstring section, continuation lines included."""
    doc = cls.__doc__ or ""
    section = doc.split("Args:", 1)[1] if "Args:" in doc else doc
    entries: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        match = re.match(r"^\s{4,8}(\w+): (.+)$", line)
        if match and (current is None or len(line) - len(line.lstrip()) <= entries[current][1]):
            current = match.group(1)
            entries[current] = (match.group(2).strip(), len(line) - len(line.lstrip()))
        elif current and line.strip():
            text, indent = entries[current]
            entries[current] = (f"{text} {line.strip()}", indent)
        elif not line.strip():
            current = None if current is None else current
    return {name: text for name, (text, _) in entries.items()}


def settable_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config that are flags (not the ones the data decides)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("from_data")]


def add_config_flags(group, cls: type, seen: set[str], help_override: dict[str, str] | None = None) -> None:
    """One flag per settable field of `cls` (default None = 'not given'); fields shared by models are added once."""
    hints, help_texts = typing.get_type_hints(cls), docstring_args(cls) | (help_override or {})
    for config_field in settable_fields(cls):
        name = config_field.name
        if name in seen:
            continue
        seen.add(name)
        spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        group.add_argument(*spellings, dest=SETTING + name, type=flag_parser(hints[name]), default=None,
                           metavar=name.upper(), help=help_texts.get(name, "").replace("%", "%%"))


def model_flag_help() -> dict[str, str]:
    """Help for each model setting, naming the models that have it: '[vit] token width ...; [mlp] width of ...'."""
    texts: dict[str, dict[str, list[str]]] = {}
    for model_name, cls in MODELS.items():
        for name, text in docstring_args(cls.config_class).items():
            texts.setdefault(name, {}).setdefault(text, []).append(model_name)
    return {name: "; ".join(f"[{', '.join(models)}] {text.rstrip('.')}" for text, models in by_text.items()) for name, by_text in texts.items()}


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """Every model, data and training setting as a flag."""
    seen: set[str] = set()
    model_group = parser.add_argument_group("model settings (each applies to the models that have it)")
    model_help = model_flag_help()
    for cls in MODELS.values():
        add_config_flags(model_group, cls.config_class, seen, model_help)
    add_config_flags(parser.add_argument_group("data settings"), DataConfig, seen)
    add_config_flags(parser.add_argument_group("training settings"), TrainConfig, seen)


def given_settings(args: argparse.Namespace) -> dict[str, typing.Any]:
    """The settings given on the command line, by name."""
    return {key.removeprefix(SETTING): value for key, value in vars(args).items() if key.startswith(SETTING) and value is not None}


def model_argument(text: str) -> str:
    """A --model value: a registered model, or NAME:VARIANT such as timm:resnet18 (argparse's `type=`)."""
    from vitlab.errors import VitlabError
    from vitlab.models import model_class, split_model_name

    try:
        model_class(split_model_name(text)[0])
    except VitlabError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


MODEL_HELP = f"{', '.join(MODELS)}, or timm:NAME for any timm model (e.g. timm:resnet18; needs pip install 'vitlab[timm]')"


def whole_number_at_least(minimum: int):
    """An argparse type: a whole number of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = whole_number_at_least(1)
non_negative_int = whole_number_at_least(0)


def existing_folder(text: str) -> str:
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"no folder {text}; pass the folder that holds the run's dataset (or leave the flag out)")
    return text


def add_data_dir_flag(parser: argparse.ArgumentParser) -> None:
    """--data-dir for commands on a trained run: the data exists already, so a folder that does not is a typo (it would
    otherwise fall through to $VITLAB_DATA silently)."""
    parser.add_argument("--data-dir", "--data_dir", dest="data_dir", type=existing_folder,
                        help="an existing folder holding the dataset (default: where the run was trained from, then $VITLAB_DATA, then ./data)")
