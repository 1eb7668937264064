"""Versions, device and git commit, saved with every result so a number can be traced."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch


def versions() -> dict[str, str]:
    import numpy
    import torchvision

    from vitlab import __version__

    return {
        "vitlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "numpy": numpy.__version__,
    }


def cpu_description() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (e.g. 'Intel(R) Xeon(R) Platinum 8480+')."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu: {cpu_description()}, {torch.get_num_threads()} threads"
    return device.type


def measured_matmul_peak(device: torch.device, size: int = 2048) -> float | None:
    """Best bf16 TFLOP/s of a size³ matmul on the CPU (the definition of ../shared/tools/matmul_peak.py:
    best of 5 rounds of 5 after 3 warm-ups; $VITLAB_PEAK_ROUNDS lowers the rounds). None off the CPU.

    Time targets are stated for a CPU with a 0.70 TFLOP/s peak; on another CPU a target is met when
    train_seconds × peak / 0.70 is within it, so every run records the peak it had."""
    import time

    if device.type != "cpu":
        return None
    rounds = max(1, int(os.environ.get("VITLAB_PEAK_ROUNDS", "5")))
    a, b = torch.randn(size, size, dtype=torch.bfloat16), torch.randn(size, size, dtype=torch.bfloat16)
    for _ in range(3 if rounds > 1 else 1):
        a @ b
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * size**3 / (time.perf_counter() - start))
    return best / 1e12


@functools.cache
def git_commit() -> str | None:
    """The commit of the vitlab checkout, with '-dirty' if it has uncommitted changes; None if not a checkout. Read once
    per process (by its first run): the code a process runs is what it imported, whatever is committed later."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return os.environ.get("VITLAB_GIT_COMMIT")  # a copy of a checkout without .git (e.g. shipped to a GPU machine)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source, capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("VITLAB_GIT_COMMIT")
