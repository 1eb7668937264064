"""Seed-aware differences between any two rows of a study (the report lists neighbours in SPEC order only).

    python docs/study/gpu-20epoch/extra_pairs.py STUDY vit_patch_size-2-vs-vit_patch_size-6 ...

Each argument names two run folders under STUDY/runs, joined by '-vs-'; prints A − B in test-accuracy
points with its 95% seed-aware interval (vitlab.study.stats.seed_aware_difference).
"""
import sys
from pathlib import Path

import torch

from vitlab.rundir import RunDir
from vitlab.study.stats import seed_aware_difference
from vitlab.study.summary import correctness as run_correctness

study = Path(sys.argv[1])


def correct(folder: str) -> torch.Tensor:
    """(seeds, test images) bool: which test images each finished seed got right."""
    seeds = sorted(s for s in (study / "runs" / folder).glob("seed*") if (s / "test_predictions.safetensors").exists())
    rows = []
    for seed in seeds:
        rows.append(run_correctness(RunDir(seed), None))
    return torch.stack(rows)


for pair in sys.argv[2:]:
    first, second = pair.split("-vs-")
    d = seed_aware_difference(correct(first), correct(second))
    print(f"{first} - {second}: {d.observed:+.2f} [{d.ci_low:+.2f}, {d.ci_high:+.2f}] "
          f"df={d.degrees_of_freedom:.1f} seed share {d.seed_variance_share:.2f}")
