"""What a study is: SPECs (models or presets with any settings), a shared budget, seeds; and its folder.

A SPEC names a model or preset with optional settings of any kind (model, data or training):
`cnn-small`, `vit:patch_size=4,num_blocks=6`, `vit-seed001:lr=0.001,train_size=5000`. A timm model is
`timm:NAME` (its first item, without `=`, is the architecture): `timm:resnet18,lr=0.01`,
`timm:vit_tiny_patch16_224,timm_kwargs=[patch_size=4]`. A tuple value
is written with `/` (`cnn:widths=16/32`) or in brackets (`cnn:widths=[16,32]`), so it never clashes
with the comma between settings or between the values of `--vary`.

A study folder holds `study.json` (what was asked: specs, budget, seeds, the command) and one run
folder per spec and seed under `runs/<spec>/seed<k>/`.
"""

from __future__ import annotations

import json
import re
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitlab.config import RunConfig, parse_field_value, route_settings
from vitlab.errors import VitlabError
from vitlab.io import ExclusiveLock, read_json, write_json
from vitlab.models import MODELS, NAMED_VARIANTS, model_class
from vitlab.presets import PRESETS, build_run_config
from vitlab.provenance import versions

STUDY_FILE = "study.json"
RUNS_FOLDER = "runs"
MAX_FOLDER_NAME = 200  # a SPEC's folder name: file systems take 255 bytes, and the lock file beside a run adds a few

# The seeds' study: their CNN against ViTs at patch sizes 2, 4, 6, 8 (ViT defaults: width 64, 4 blocks,
# 4 heads, seed 001's size), the CNN first as the baseline, and the seeds' MLP.
SEED_STUDY = ("cnn-small", "vit:patch_size=2", "vit:patch_size=4", "vit:patch_size=6", "vit:patch_size=8", "mlp")

# Named budgets (shared settings). `cpu`: 8 epochs, sized for a 2-core CPU; `gpu`: the seeds' own 20 epochs.
BUDGETS: dict[str, dict[str, Any]] = {"cpu": {"epochs": 8}, "gpu": {"epochs": 20}}


def split_top_level(text: str, separator: str = ",") -> list[str]:
    """Split on `separator` outside square brackets: 'a=1,b=[1,2]' → ['a=1', 'b=[1,2]']."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(0, depth - 1)
        if char == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def setting_annotation_class(model: str, name: str) -> type:
    """The dataclass that declares setting `name` for `model` (to parse its value with the right type)."""
    from vitlab.config import DataConfig, TrainConfig, setting_owner

    owner = setting_owner(model, name)
    return {"model": model_class(model).config_class, "data": DataConfig, "train": TrainConfig}[owner]


def parse_setting_value(model: str, name: str, text: str) -> Any:
    """'4' → 4, '16/32' or '[16,32]' → (16, 32), 'true' → True, typed by the setting's field."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    owner = setting_annotation_class(model, name)
    annotation = typing.get_type_hints(owner).get(name)
    if any(option is tuple or typing.get_origin(option) is tuple for option in (annotation, *typing.get_args(annotation))):
        text = text.replace("/", ",")  # only a tuple's items are separated by '/': a path keeps its own
    return parse_field_value(owner, name, text)


def canonical_value(value: Any) -> str:
    """How a parsed value is written in a canonical SPEC (equal values are written equally)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "/".join(canonical_value(v) for v in value)
    if isinstance(value, dict):  # keyword arguments (timm_kwargs): in brackets, so their commas stay inside the value
        return "[" + ",".join(f"{key}={canonical_value(v)}" for key, v in value.items()) + "]"
    if isinstance(value, float):  # short where that is exact (folder names), every digit where it is not (0.0012345678)
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


@dataclass(frozen=True)
class ModelSpec:
    """One entry of a study: a model or preset name plus settings (model, data or training)."""

    text: str  # canonical: parsed values written back, so two spellings of one value are one SPEC
    model: str
    preset: str | None
    overrides: dict[str, Any]

    @property
    def slug(self) -> str:
        """A folder name: 'vit:patch_size=4' → 'vit_patch_size-4'; 'cnn:widths=16/32' → 'cnn_widths-16x32'."""
        text = self.text.replace("=", "-").replace("/", "x")
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def parse_spec(text: str) -> ModelSpec:
    name, _, settings = text.strip().partition(":")
    name = name.strip()
    if name in PRESETS:
        model, preset = PRESETS[name].model, name
    elif name in MODELS:
        model, preset = name, None
    else:
        raise VitlabError(f"'{text}': unknown model or preset '{name}'; choose from {', '.join([*MODELS, *PRESETS])}")
    overrides: dict[str, Any] = {}
    items = [part.strip() for part in split_top_level(settings) if part.strip()]
    variant_field = NAMED_VARIANTS.get(model)
    if variant_field and items and "=" not in items[0]:  # timm:resnet18 → architecture=resnet18
        overrides[variant_field] = items.pop(0)
    for item in items:
        key, equals, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or not key:
            raise VitlabError(f"'{text}': expected NAME=VALUE, got '{item}' (e.g. vit:patch_size=4,num_blocks=6)")
        if key in ("seed", "device"):
            raise VitlabError(f"'{text}': {key} is set for the whole study (--seeds, --{key}), not per SPEC")
        if key in overrides:
            raise VitlabError(f"'{text}': {key} is given twice")
        try:
            overrides[key] = parse_setting_value(model, key, value)
        except VitlabError as error:
            raise VitlabError(f"'{text}': {error}") from None
    parts = [canonical_value(overrides[variant_field])] if variant_field in overrides else []
    parts += [f"{key}={canonical_value(value)}" for key, value in overrides.items() if key != variant_field]
    canonical = name + (":" + ",".join(parts) if parts else "")
    try:
        build_run_config(None if preset else model, preset, overrides)  # impossible values and shapes fail now
    except VitlabError as error:
        raise VitlabError(f"'{text}': {error}") from None
    return ModelSpec(text=canonical, model=model, preset=preset, overrides=overrides)


def base_of(spec: str, setting: str) -> str:
    """The SPEC without its `setting=...` part: the curve a row of a sweep belongs to ('vit:train_size=40,lr=0.1' → 'vit:lr=0.1')."""
    name, _, settings = spec.partition(":")
    kept = [item for item in split_top_level(settings) if item and item.partition("=")[0] != setting]
    return name + (":" + ",".join(kept) if kept else "")


def sweep_values(vary: str) -> tuple[str, list[str]]:
    """'FIELD=v1,v2,...' → (field, ['v1', 'v2', ...]); tuple values as '16/32' or '[16,32]'."""
    field_name, equals, values = vary.partition("=")
    values_list = [value.strip() for value in split_top_level(values) if value.strip()]
    field_name = field_name.strip().replace("-", "_")
    if not equals or not field_name or len(values_list) < 2:
        raise VitlabError(f"--vary needs FIELD=v1,v2,... with at least two values, got '{vary}'")
    return field_name, values_list


def sweep_specs(bases: list[str], vary: str) -> list[str]:
    """Each base SPEC once per value of `vary`: (['vit'], 'num_blocks=2,4') → ['vit:num_blocks=2', 'vit:num_blocks=4']."""
    field_name, values = sweep_values(vary)
    specs = []
    for base in bases:
        for value in values:
            separator = "," if ":" in base else ":"
            specs.append(f"{base}{separator}{field_name}={value}")
    return specs


def plan_study(specs: list[str], settings: dict[str, Any], budget_name: str | None, seed_count: int, kind: str = "compare",
               vary: str | None = None) -> StudyPlan:
    """A study from what a command line gives: SPECs, shared settings (a named budget, then the flags given),
    how many seeds (starting at the given `seed`, default 0), and optionally a setting to vary for every SPEC."""
    budget = dict(BUDGETS[budget_name]) if budget_name else {}
    budget.update(settings)
    first_seed = budget.pop("seed", 0)
    if seed_count < 1:
        raise VitlabError(f"--seeds must be >= 1, got {seed_count}")
    field_name = None
    if vary:
        field_name, _ = sweep_values(vary)
        if field_name in budget:
            raise VitlabError(f"--{field_name} is what --vary changes; drop one of them")
        specs = sweep_specs(specs, vary)
    return StudyPlan(specs=list(specs), budget=budget, seeds=[first_seed + i for i in range(seed_count)], kind=kind, vary=field_name)


def json_normalized(value: Any) -> Any:
    """What `value` becomes after a JSON round trip (tuples → lists), for comparing with a saved study.json."""
    return json.loads(json.dumps(value))


@dataclass
class StudyMember:
    spec: ModelSpec
    seed: int
    run_dir: Path
    config: RunConfig


@dataclass
class StudyPlan:
    """What a study is: its specs (the first is the baseline), the shared budget and the seeds."""

    specs: list[str]
    budget: dict[str, Any]  # settings shared by every run (model, data and training settings by name)
    seeds: list[int]
    kind: str = "compare"  # compare or sweep
    vary: str | None = None  # the setting a sweep varies

    def __post_init__(self) -> None:
        parsed = [parse_spec(spec) for spec in self.specs]
        self.specs = [spec.text for spec in parsed]  # canonical
        seen: dict[str, str] = {}
        for spec in parsed:
            if spec.slug in seen:
                raise VitlabError(f"SPECs '{seen[spec.slug]}' and '{spec.text}' are the same run (folder runs/{spec.slug}); give each model once")
            seen[spec.slug] = spec.text
            if len(spec.slug) > MAX_FOLDER_NAME:
                raise VitlabError(f"SPEC '{spec.text}' is too long for a folder name ({len(spec.slug)} characters); give the settings every "
                                  "SPEC shares as flags, or fewer settings per SPEC")
        test_sets: dict[tuple, str] = {}
        for spec in parsed:
            run = self.run_config(spec, self.seeds[0])  # a budget setting a SPEC's model lacks fails now
            if run.train.optimizer in ("muon", "muon-adamw") or run.train.whitening_bias_epochs:  # so do optimiser settings the model cannot take
                check_optimizer(spec.text, run)
            test_sets.setdefault((run.data.dataset, run.data.data_dir, run.data.test_subset, run.data.image_size), spec.text)
        if len(test_sets) > 1:  # the paired statistics compare predictions on the same test images
            first, second = list(test_sets.values())[:2]
            raise VitlabError(f"SPECs '{first}' and '{second}' would be tested on different images (dataset, data_dir, test_subset or "
                              "image_size differ); a study compares runs on one test set, so give these settings as flags for all")
        if len(set(self.seeds)) != len(self.seeds):
            raise VitlabError(f"seeds {self.seeds} repeat a seed; give distinct seeds")

    def run_config(self, spec: ModelSpec, seed: int) -> RunConfig:
        """The spec's preset (if any), then the shared budget, then the spec's own settings."""
        settings = {**self.budget, **spec.overrides, "seed": seed}
        try:
            route_settings(spec.model, settings)
        except VitlabError as error:
            raise VitlabError(f"SPEC '{spec.text}': {error}") from None
        return build_run_config(None if spec.preset else spec.model, spec.preset, settings)

    def members(self, study_dir: Path) -> list[StudyMember]:
        """Every (spec, seed) run, most expensive first so parallel workers finish together."""
        members = [StudyMember(spec, seed, Path(study_dir) / RUNS_FOLDER / spec.slug / f"seed{seed}", self.run_config(spec, seed))
                   for spec in map(parse_spec, self.specs) for seed in self.seeds]
        cost: dict[str, float] = {}
        for member in members:
            if member.spec.text not in cost:  # every seed of a spec costs the same
                cost[member.spec.text] = estimated_cost(member.config)
        return sorted(members, key=lambda member: -cost[member.spec.text])

    def description(self) -> dict[str, Any]:
        return json_normalized({"kind": self.kind, "specs": self.specs, "budget": self.budget, "seeds": self.seeds, "vary": self.vary})


def check_optimizer(spec_text: str, run: RunConfig) -> None:
    from vitlab.models import model_from_config
    from vitlab.train.optim import parameter_groups

    try:
        parameter_groups(model_from_config(run.model), run.train)
    except VitlabError as error:
        raise VitlabError(f"SPEC '{spec_text}': {error}") from None


def estimated_cost(run: RunConfig) -> float:
    """Training FLOPs, roughly: forward FLOPs per image × training images × epochs (for ordering jobs only)."""
    from vitlab.config import epochs_for
    from vitlab.models import model_from_config
    from vitlab.models.flops import forward_flops_per_image

    images = run.data.train_size or run.data.subset or 40_000
    return forward_flops_per_image(model_from_config(run.model), batch=1) * images * epochs_for(run.train, images)


def check_study_folder(study_dir: Path, plan: StudyPlan) -> bool:
    """Whether `study_dir` already holds this same study (False: it is free for it); anything else is refused, before
    the study writes a file (its lock included)."""
    study_dir = Path(study_dir)
    study_file = study_dir / STUDY_FILE
    wanted = plan.description()
    if study_dir.exists() and not study_dir.is_dir():
        raise VitlabError(f"--out {study_dir} is a file, not a folder; choose another --out")
    if study_file.exists():
        saved = read_json(study_file, "study description")
        if not isinstance(saved, dict) or {key: saved.get(key) for key in wanted} != wanted:
            specs = " ".join(saved.get("specs", [])) if isinstance(saved, dict) and isinstance(saved.get("specs"), list) else "?"
            budget = saved.get("budget") if isinstance(saved, dict) else "?"
            raise VitlabError(f"{study_dir} holds a different study ({specs}, budget {budget}, seeds "
                              f"{saved.get('seeds') if isinstance(saved, dict) else '?'}); use a new --out")
        return True
    if study_dir.exists() and any(entry.name != LOCK_FILE for entry in study_dir.iterdir()):
        raise VitlabError(f"--out {study_dir} is not empty and holds no {STUDY_FILE}; choose a new folder")
    return False


def open_study(study_dir: Path, plan: StudyPlan, command: str) -> None:
    """Create the study folder, or check that an existing one holds this same study."""
    if check_study_folder(study_dir, plan):
        return
    write_json(study_dir / STUDY_FILE, plan.description() | {"command": command, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "versions": versions()})


LOCK_FILE = ".lock"


def StudyLock(study_dir: Path) -> ExclusiveLock:
    """An exclusive lock on a study folder for as long as a process works in it."""
    return ExclusiveLock(Path(study_dir) / LOCK_FILE, f"study folder {study_dir} is in use by another vitlab process ({{holder}}); "
                         "wait for it to finish or choose another --out")


def read_study(study_dir: Path) -> dict:
    """study.json, with the fields the summaries rely on checked."""
    study = read_json(Path(study_dir) / STUDY_FILE, "study description")
    problems = []
    if not isinstance(study, dict):
        problems.append("not an object")
    else:
        if not isinstance(study.get("specs"), list) or not study["specs"] or not all(isinstance(s, str) for s in study["specs"]):
            problems.append("'specs' is not a list of SPEC strings")
        if not isinstance(study.get("seeds"), list) or not study["seeds"] or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                                      for s in study["seeds"]):
            problems.append("'seeds' is not a list of integers")
        if not isinstance(study.get("budget", {}), dict):
            problems.append("'budget' is not an object")
        if study.get("vary") is not None and not isinstance(study.get("vary"), str):
            problems.append("'vary' is not a setting name")
    if problems:
        raise VitlabError(f"{Path(study_dir) / STUDY_FILE} is damaged ({problems[0]}); restore it or run the study again in a new folder")
    return study


__all__ = ["base_of", "check_study_folder",
           "plan_study", "BUDGETS", "ModelSpec", "SEED_STUDY", "STUDY_FILE", "RUNS_FOLDER", "StudyLock", "StudyMember", "StudyPlan",
           "open_study", "parse_spec", "read_study", "sweep_specs", "sweep_values"]
