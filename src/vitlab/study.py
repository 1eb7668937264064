"""Studies: several models trained under one identical budget, each with K seeds, resumable.

A study folder holds `study.json` (what was asked: specs, budget, seeds, the command) and one run
folder per model and seed under `runs/`. Running the same command again skips finished runs,
resumes runs that have a checkpoint and restarts runs that died before their first one. Summaries
and figures are made from the folder alone (see `vitlab.summary`).

A SPEC names a model or preset with optional model overrides: `cnn-small`, `vit:patch_size=4,num_blocks=6`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitlab.checkpoint import CHECKPOINT_FILE
from vitlab.config import RunConfig, parse_field_value
from vitlab.errors import RunStopped, VitlabError
from vitlab.io import read_json, write_json
from vitlab.models import MODELS, build_model, model_setting_names
from vitlab.presets import PRESETS, build_run_config
from vitlab.provenance import versions

STUDY_FILE = "study.json"
RUNS_FOLDER = "runs"

# The seeds' study: their CNN against ViTs at patch sizes 2, 4, 6, 8 (ViT defaults: width 64, 4 blocks,
# 4 heads, seed 001's size), the CNN first as the baseline.
SEED_STUDY = ("cnn-small", "vit:patch_size=2", "vit:patch_size=4", "vit:patch_size=6", "vit:patch_size=8")

# Named budgets. `cpu`: the whole seed study with 2 seeds fits in under an hour on a 2-core CPU with
# --jobs 2 (measured, see README). `gpu`: the seeds' own budget, 20 epochs.
BUDGETS: dict[str, dict[str, Any]] = {"cpu": {"epochs": 8}, "gpu": {"epochs": 20}}


@dataclass(frozen=True)
class ModelSpec:
    """One entry of a study: a model or preset name plus model-setting overrides."""

    text: str
    model: str
    preset: str | None
    overrides: dict[str, Any]

    @property
    def slug(self) -> str:
        """A folder name: 'vit:patch_size=4' → 'vit_patch_size-4'."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.text.replace("=", "-")).strip("_")


def parse_spec(text: str) -> ModelSpec:
    name, _, settings = text.strip().partition(":")
    if name in PRESETS:
        model, preset = PRESETS[name].model, name
    elif name in MODELS:
        model, preset = name, None
    else:
        raise VitlabError(f"'{text}': unknown model or preset '{name}'; choose from {', '.join([*MODELS, *PRESETS])}")
    config_class = MODELS[model].config_class
    known = {f.name for f in dataclasses.fields(config_class)}
    overrides: dict[str, Any] = {}
    for item in filter(None, settings.split(",")):
        key, equals, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals:
            raise VitlabError(f"'{text}': expected NAME=VALUE, got '{item}' (e.g. vit:patch_size=4,num_blocks=6)")
        if key not in known:
            raise VitlabError(f"'{text}': model '{model}' has no setting '{key}'; its settings are {', '.join(sorted(known))}")
        overrides[key] = parse_field_value(config_class, key, value.strip())
    build_model(model, **{**(PRESETS[preset].model_config if preset else {}), **overrides})  # impossible shapes fail now
    return ModelSpec(text=text.strip(), model=model, preset=preset, overrides=overrides)


def sweep_specs(model: str, vary: str) -> list[str]:
    """`vary` = 'FIELD=v1,v2,...' → one spec per value, e.g. ['vit:num_blocks=2', 'vit:num_blocks=4']."""
    field_name, equals, values = vary.partition("=")
    values_list = [value.strip() for value in values.split(",") if value.strip()]
    if not equals or len(values_list) < 2:
        raise VitlabError(f"--vary needs FIELD=v1,v2,... with at least two values, got '{vary}'")
    return [f"{model}:{field_name.strip()}={value}" for value in values_list]


@dataclass
class StudyPlan:
    """What a study is: its specs (the first is the baseline), the shared budget and the seeds."""

    specs: list[str]
    budget: dict[str, Any]  # settings shared by every run (training, data and model settings by name)
    seeds: list[int]
    kind: str = "compare"  # compare or sweep
    vary: str | None = None  # the field a sweep varies

    def run_config(self, spec: ModelSpec, seed: int) -> RunConfig:
        own, all_model = model_setting_names(spec.model), model_setting_names()
        # Model settings in the budget (e.g. --hidden_size) apply to the models that have them.
        shared = {k: v for k, v in self.budget.items() if k not in all_model or k in own}
        return build_run_config(None if spec.preset else spec.model, spec.preset, {**shared, **spec.overrides, "seed": seed})

    def jobs(self, study_dir: Path) -> list[tuple[ModelSpec, int, Path, RunConfig]]:
        """Every (spec, seed) run, most expensive first so parallel workers finish together."""
        jobs = []
        for spec in map(parse_spec, self.specs):
            for seed in self.seeds:
                jobs.append((spec, seed, study_dir / RUNS_FOLDER / spec.slug / f"seed{seed}", self.run_config(spec, seed)))
        cost = {}
        for spec, _, _, config in jobs:
            if spec.text not in cost:  # every seed of a spec costs the same
                cost[spec.text] = estimated_cost(config)
        return sorted(jobs, key=lambda job: -cost[job[0].text])


def estimated_cost(run: RunConfig) -> float:
    """Training FLOPs, roughly: forward FLOPs per image × epochs (for ordering jobs only)."""
    from vitlab.flops import forward_flops_per_image

    return forward_flops_per_image(build_model(run.model, **run.model_config), batch=1) * run.train.epochs


def open_study(study_dir: Path, plan: StudyPlan, command: str) -> None:
    """Create the study folder, or check that an existing one holds this same study."""
    study_file = study_dir / STUDY_FILE
    wanted = {"kind": plan.kind, "specs": plan.specs, "budget": plan.budget, "seeds": plan.seeds, "vary": plan.vary}
    if study_file.exists():
        saved = read_json(study_file, "study description")
        if {key: saved.get(key) for key in wanted} != wanted:
            raise VitlabError(f"{study_dir} holds a different study ({' '.join(saved.get('specs', []))}, budget {saved.get('budget')}, "
                              f"seeds {saved.get('seeds')}); run its own command again to resume it, or choose a new --out")
        return
    if study_dir.exists() and any(study_dir.iterdir()):
        raise VitlabError(f"--out {study_dir} is not empty and holds no {STUDY_FILE}; choose a new folder")
    write_json(study_file, wanted | {"command": command, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "versions": versions()})


def run_state(run_dir: Path) -> str:
    if (run_dir / "results.json").is_file():
        return "finished"
    if (run_dir / CHECKPOINT_FILE).is_file() and (run_dir / "config.json").is_file():
        return "resumable"
    return "new"


def run_one(run: RunConfig, run_dir: Path) -> dict:
    """Train one member of a study (or finish it): the same code path as `vitlab train`."""
    from vitlab.training import RESULTS_FILE, resume_run, train_run

    state = run_state(run_dir)
    if state == "finished":
        return read_json(run_dir / RESULTS_FILE, "run results")
    if state == "resumable":
        return resume_run(run_dir)
    if run_dir.exists():  # died before its first checkpoint: nothing worth keeping
        shutil.rmtree(run_dir)
    return train_run(run, run_dir)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_run(run: RunConfig, run_dir: Path) -> tuple[str, dict | str]:
    try:
        return "ok", run_one(run, run_dir)
    except RunStopped as stop:
        return "stopped", str(stop)
    except VitlabError as error:
        return "error", str(error)


def run_study(plan: StudyPlan, study_dir: str | Path, jobs: int = 1, command: str = "") -> Path:
    """Train every run of the study that is not finished; `jobs` runs at a time (CPU threads split evenly)."""
    study_dir = Path(study_dir)
    members = plan.jobs(study_dir)  # parses every spec and config before anything is written
    if jobs < 1:
        raise VitlabError(f"--jobs must be >= 1, got {jobs}")
    from vitlab.training import load_run_data

    for config in {id(config.data): config for _, _, _, config in members}.values():
        load_run_data(config.data)  # missing or corrupt data fails before the folder is made
    open_study(study_dir, plan, command or shlex.join(["vitlab", *sys.argv[1:]]))
    todo = [(spec, seed, run_dir, config) for spec, seed, run_dir, config in members if run_state(run_dir) != "finished"]
    print(f"study {study_dir}: {len(members)} runs ({len(plan.specs)} models x {len(plan.seeds)} seeds), "
          f"{len(members) - len(todo)} already finished, {len(todo)} to train", flush=True)
    if jobs == 1 or len(todo) <= 1:
        for spec, seed, run_dir, config in todo:
            print(f"-> {spec.text} seed {seed} ({run_state(run_dir)})", flush=True)
            results = run_one(config, run_dir)
            print(f"<- {spec.text} seed {seed}: test accuracy {results['test_acc']:.2f}%", flush=True)
        return study_dir
    threads = max(1, (os.cpu_count() or 1) // jobs)  # measured: 2 one-thread ViT runs beat one two-thread run ~1.8x
    context = multiprocessing.get_context("spawn")
    failures = []
    with context.Pool(jobs, initializer=_worker_init, initargs=(threads,)) as pool:
        pending = {(spec.text, seed): pool.apply_async(_worker_run, (dataclasses.replace(config, train=dataclasses.replace(
            config.train, progress=False)), run_dir)) for spec, seed, run_dir, config in todo}
        try:
            for (text, seed), result in pending.items():
                status, value = result.get()
                if status == "ok":
                    print(f"<- {text} seed {seed}: test accuracy {value['test_acc']:.2f}% in {value['train_seconds']:.0f} s", flush=True)
                else:
                    failures.append(f"{text} seed {seed}: {value}")
                    print(f"<- {text} seed {seed}: did not finish: {value}", flush=True)
        except KeyboardInterrupt:  # the workers got the same Ctrl-C: let them save their checkpoints
            pool.close()
            pool.join()
            raise RunStopped(f"study stopped; finished runs are kept, run the same command to resume ({study_dir})") from None
    if failures:
        raise VitlabError(f"{len(failures)} run(s) did not finish, first: {failures[0]}; run the same command again to resume")
    return study_dir
