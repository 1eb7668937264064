"""Shared fixtures: a CIFAR-10 folder (the real one when VITLAB_DATA points at it, otherwise small
generated files in the same format) and tiny in-memory datasets for unit tests."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vitlab import data as data_module
from vitlab.data import CIFAR10, FOLDER, MD5, batches_folder
from vitlab.kernels import build, switch_kernels


def write_fake_cifar10(root: Path, per_batch: int = 60, seed: int = 0) -> dict[str, str]:
    """Write CIFAR-10-format batch files whose images carry a learnable signal; returns their MD5s.

    Each class gets its own mean colour plus noise, so a model can beat chance in one short epoch.
    """
    rng = np.random.default_rng(seed)
    folder = root / FOLDER
    folder.mkdir(parents=True)
    palette = rng.integers(30, 225, size=(10, 3))

    def batch(label_name: str, count: int) -> dict:
        labels = rng.integers(0, 10, size=count)
        pixels = palette[labels][:, :, None] + rng.normal(0, 25, size=(count, 3, 1024))
        return {b"batch_label": label_name.encode(), b"labels": labels.tolist(),
                b"data": np.clip(pixels, 0, 255).astype(np.uint8).reshape(count, 3072),
                b"filenames": [f"img_{i}.png".encode() for i in range(count)]}

    for index in range(1, 6):
        with open(folder / f"data_batch_{index}", "wb") as handle:
            pickle.dump(batch(f"training batch {index} of 5", per_batch), handle, protocol=2)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump(batch("testing batch 1 of 1", per_batch * 2), handle, protocol=2)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in data_module.CLASSES],
                     b"num_vis": 3072}, handle, protocol=2)
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in MD5}


def real_cifar10_root() -> Path | None:
    value = os.environ.get("VITLAB_DATA")
    if value and batches_folder(Path(value)) is not None:
        return Path(value)
    return None


@pytest.fixture
def cifar_root(tmp_path_factory, monkeypatch) -> Path:
    """A folder holding `cifar-10-batches-py`: real CIFAR-10 if available, else generated files
    (with the expected checksums patched to theirs, so verification still runs)."""
    real = real_cifar10_root()
    if real is not None:
        return real
    root = tmp_path_factory.mktemp("fake-cifar")
    monkeypatch.setattr(data_module, "MD5", write_fake_cifar10(root))
    return root


@pytest.fixture
def writable_cifar_root(cifar_root, tmp_path, monkeypatch) -> Path:
    """A private copy of the dataset folder that a test may damage."""
    copy = tmp_path / "cifar-copy"
    shutil.copytree(batches_folder(cifar_root), copy / FOLDER)
    return copy


@pytest.fixture
def amx_cpu(monkeypatch):
    """This CPU as one with AMX tiles, for vitlab's run-time kernel checks: library capabilities read again under the
    pretence, and again after it (they are cached per library)."""
    build.library_capabilities.cache_clear()
    monkeypatch.setattr(build, "cpu_has_amx", lambda: True)
    yield
    monkeypatch.undo()
    build.library_capabilities.cache_clear()


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, tmp_path):
    """Tests never download, never read ./data from the repo, and run in a scratch folder. Every run measures the
    CPU's bf16 matmul peak at its start; the tests measure it with one round instead of five."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VITLAB_PEAK_ROUNDS", "1")
    torch.manual_seed(0)
    yield
    switch_kernels(True)  # a run with --cpu_kernels false switches them off for the rest of its process


def tiny_dataset(count: int = 256, seed: int = 0) -> CIFAR10:
    """Random uint8 images whose class decides the mean colour: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    palette = torch.randint(30, 225, (10, 3), generator=generator)

    def split(n: int):
        labels = torch.randint(0, 10, (n,), generator=generator)
        noise = torch.randn(n, 3, 32, 32, generator=generator) * 20
        images = (palette[labels][:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)
        return images, labels

    train, val, test = split(count), split(count // 4), split(count // 4)
    return CIFAR10(*train, *val, *test)


def vitlab_process(argv: list[str], **popen_options) -> subprocess.Popen:
    """`vitlab ARGV` in a child process that expects the same CIFAR-10 checksums as this test (the
    generated files' when there is no real data)."""
    code = ("import json, sys; import vitlab.data as d; d.MD5.update(json.loads(sys.argv[1])); "
            "from vitlab.cli import main; sys.exit(main(sys.argv[2:]))")
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(data_module.MD5), *argv], **popen_options)


def living_members(group: int) -> list[int]:
    """The processes of process group `group` that have not exited (zombies, which hold no files or locks, excluded)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[2]) == group and fields[0] not in "ZX":
            members.append(int(stat.parent.name))
    return members


def wait_until_the_group_has_exited(group: int, seconds: float = 60) -> None:
    """After a SIGKILL to a process group: wait until each of its processes has exited. The group's leader may be
    reaped while a job of the group is still exiting, and a dying process keeps its locks until it is gone."""
    deadline = time.time() + seconds
    while living_members(group):
        if time.time() > deadline:
            raise AssertionError(f"process group {group} still has processes {living_members(group)} {seconds} s after SIGKILL")
        time.sleep(0.05)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="run the fuzzers with many more examples (minutes instead of seconds)")


@pytest.fixture
def fuzz_examples(request) -> int:
    """How many inputs each fuzzer tries: a quick default in `make test`, many more with --slow."""
    return 400 if request.config.getoption("--slow") else 25


@pytest.fixture
def small_cifar_root(tmp_path_factory, monkeypatch) -> Path:
    """Generated CIFAR-10-format files (300 training, 120 test images): fast to read for fuzzers."""
    root = tmp_path_factory.mktemp("small-cifar")
    monkeypatch.setattr(data_module, "MD5", write_fake_cifar10(root))
    return root


@pytest.fixture(scope="session")
def serve_data(tmp_path_factory) -> Path:
    """CIFAR-10 for the `vitlab serve` tests, shared by the whole session: the real one, or generated files
    whose checksums stay expected meanwhile (a child process gets them through `vitlab_process`)."""
    real = real_cifar10_root()
    if real is not None:
        yield real
        return
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("serve-cifar")
        patch.setattr(data_module, "MD5", write_fake_cifar10(root))
        yield root


@pytest.fixture(scope="session")
def served_runs(serve_data, tmp_path_factory) -> dict[str, Path]:
    """{'cnn': a finished cnn-small run, 'vit': a finished 2-block, 2-head ViT run with a CLS token}, trained once
    through the command line on a few hundred images, for the serve tests."""
    from vitlab.cli import main

    folder = tmp_path_factory.mktemp("serve-runs")
    quick = ["--subset", "300", "--test_subset", "100", "--epochs", "1", "--batch-size", "50", "--progress", "false"]
    models = {"cnn": ["--model", "cnn-small"],
              "vit": ["--model", "vit", "--patch_size", "8", "--hidden_size", "16", "--num_heads", "2", "--num_blocks", "2", "--pool", "cls"]}
    for name, model_args in models.items():
        assert main(["train", *model_args, *quick, "--data-dir", str(serve_data), "--out", str(folder / name)]) == 0
    return {name: folder / name for name in models}
