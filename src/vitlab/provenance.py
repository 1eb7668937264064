"""Versions, device and git commit, saved with every result so a number can be traced."""

from __future__ import annotations

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


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return device.type


def git_commit() -> str | None:
    """The commit of the vitlab checkout, with '-dirty' if it has uncommitted changes; None if not a checkout."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return os.environ.get("VITLAB_GIT_COMMIT")  # a copy of a checkout without .git (e.g. shipped to a GPU machine)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source, capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("VITLAB_GIT_COMMIT")
