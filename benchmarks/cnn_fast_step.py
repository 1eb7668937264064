"""cnn-fast's training step in variants, alternating in one process on real CIFAR-10 batches: img/s of each.

    .venv/bin/python benchmarks/cnn_fast_step.py --variants whole,frozen,micro500,micro500-frozen,compile --rounds 5

A variant names what it changes from the preset as given: `whole` (the batch of 2000 at once), `microN`
(`--micro_batch_size N`), `frozen` (the whitening bias frozen, as the preset's epochs after its third are),
`compile` (`--compile true`); parts join with `-`. Each variant builds its own seeded model and optimiser, takes two
untimed steps, then every round times `--images` images of each variant in turn (`Runner.train_step`, the step
`vitlab train` runs, on device-resident augmented batches). Prints each round and the median; time it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import bench
import torch

from vitlab.data import load_cifar10, locate_cifar10, normalize
from vitlab.errors import VitlabError, run_script
from vitlab.models import model_from_config
from vitlab.presets import build_run_config
from vitlab.train.run import fit_to_data

PARTS = ("whole", "frozen", "compile", "micro")


def settings_of(variant: str) -> tuple[dict, bool]:
    """The preset overrides a variant names, and whether it freezes the whitening bias."""
    given: dict = {"micro_batch_size": 0}
    frozen = False
    for part in variant.split("-"):
        if part == "frozen":
            frozen = True
        elif part == "compile":
            given["compile"] = True
        elif part.startswith("micro") and part[5:].isdigit():
            given["micro_batch_size"] = int(part[5:])
        elif part != "whole":
            raise VitlabError(f"unknown variant part '{part}' in '{variant}'; use parts of {', '.join(PARTS)} (microN) joined by '-'")
    return given, frozen


def variant_step(variant: str, data) -> tuple[callable, int]:
    """A function that trains one cnn-fast step of `variant` (returns its images), and the batch size."""
    given, frozen = settings_of(variant)
    run = fit_to_data(build_run_config(None, "cnn-fast", given), data)
    torch.manual_seed(0)
    model = model_from_config(run.model)
    model.init_from_data(normalize(data.train_images[:5000], mean=data.mean, std=data.std))
    _, step = bench.vitlab_step(model, data, dataclasses.replace(run.train, device="cpu", progress=False))
    if frozen:
        model.whiten.bias.requires_grad_(False)
    return step, run.train.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="whole,micro500,micro1000")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--images", type=int, default=4000, help="images timed per variant and round (whole steps)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    variants = args.variants.split(",")
    for variant in variants:
        settings_of(variant)  # a bad name stops here, before minutes of setup
    data = load_cifar10(str(locate_cifar10(args.data_dir, download_if_missing=False).parent))
    steps = {}
    for variant in variants:
        step, batch_size = variant_step(variant, data)
        for _ in range(2):  # untimed: the first steps allocate and pick kernels
            step()
        steps[variant] = step, max(1, args.images // batch_size)
    speeds: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_index in range(args.rounds):
        for variant, (step, count) in steps.items():
            speeds[variant].append(bench.images_per_second(step, steps=count, warmup=0))
        print(f"round {round_index + 1}: " + ", ".join(f"{v} {s[-1]:.0f}" for v, s in speeds.items()) + " img/s", flush=True)
    print("median: " + ", ".join(f"{v} {statistics.median(s):.0f}" for v, s in speeds.items()) + f" img/s ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    run_script(main)
