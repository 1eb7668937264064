"""Gaps between two curves of the small-data study at every size, and how each gap changes from the
smallest size to the largest, with vitlab's seed-aware intervals (the report compares every curve with
the first one, cnn-small; this adds the like-for-like pairs).

    python docs/study/small-data-5/pair_gaps.py STUDY vit-fast:aircnn vit-seed001:cnn-small
"""
import sys
from pathlib import Path

import torch

from vitlab.rundir import RunDir
from vitlab.study.stats import seed_aware_contrast, seed_aware_difference
from vitlab.study.summary import correctness as run_correctness

SIZES = (1000, 4000, 8000, 16000, 40000)
study = Path(sys.argv[1])


def correct(model: str, size: int) -> torch.Tensor:
    """(seeds, test images) bool for one curve at one training-set size."""
    folder = study / "runs" / f"{model}_train_size-{size}"
    rows = []
    for seed in sorted(folder.glob("seed*")):
        if (seed / "test_predictions.safetensors").exists():
            rows.append(run_correctness(RunDir(seed), None))
    return torch.stack(rows)


def interval(d) -> str:
    return f"{d.observed:+.2f} [{d.ci_low:+.2f}, {d.ci_high:+.2f}]"


for pair in sys.argv[2:]:
    first, second = pair.split(":")
    print(f"{first} - {second}")
    for size in SIZES:
        print(f"  {size:>6}: {interval(seed_aware_difference(correct(first, size), correct(second, size)))}")
    small, large = SIZES[0], SIZES[-1]
    change = seed_aware_contrast([(1.0, correct(first, large)), (-1.0, correct(second, large)),
                                  (-1.0, correct(first, small)), (1.0, correct(second, small))])
    print(f"  gap change {small} -> {large}: {interval(change)}")
