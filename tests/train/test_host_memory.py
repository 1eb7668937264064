import os
import platform
import subprocess
import sys

import pytest

from vitlab.train import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A step's pattern: eight 16 MiB activations and one of 64 MiB (above glibc's largest mmap threshold) made and
# written, then all freed. Left to itself, glibc serves them from
# its heap once its threshold has risen, and hands the freed 128 MiB at the heap's top back to the OS when it can (not
# always: where its heap could not grow in place it keeps them), so that the next round faults them in again.
ROUNDS = """
import json, resource, sys, torch
from vitlab.train.host_memory import keep_freed_memory
said = keep_freed_memory() if sys.argv[1] == "keep" else "untouched"
def round_of_activations():
    blocks = [torch.empty(4 * 2**20).fill_(1.0) for _ in range(8)] + [torch.empty(16 * 2**20).fill_(1.0)]  # 8 × 16, 64 MiB
    del blocks
for _ in range(3):
    round_of_activations()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    round_of_activations()
print(json.dumps({"said": said, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5}))
"""


def faults_per_round(mode: str, **environment: str) -> tuple[str, float]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MALLOC_", host_memory.SWITCH_VARIABLE, "GLIBC_TUNABLES", "LD_PRELOAD"))}
    result = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True, timeout=120,
                            env={**env, **environment})
    import json

    found = json.loads(result.stdout.strip().splitlines()[-1])
    return found["said"], found["faults"]


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    said, kept = faults_per_round("keep")
    _, mapped_each_time = faults_per_round("untouched", MALLOC_MMAP_THRESHOLD_="131072")  # the count sees faults
    assert said == host_memory.KEPT
    assert mapped_each_time >= 192 / 2, mapped_each_time  # at least one fault per 2 MiB (huge pages) of the 192 MiB
    assert kept <= 0.01 * mapped_each_time, (kept, mapped_each_time)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
@pytest.mark.parametrize(("environment", "reason"), [
    ({"VITLAB_KEEP_FREED_MEMORY": "0"}, "VITLAB_KEEP_FREED_MEMORY=0"),
    ({"VITLAB_KEEP_FREED_MEMORY": " Off"}, "VITLAB_KEEP_FREED_MEMORY= Off"),
    ({"VITLAB_KEEP_FREED_MEMORY": "false"}, "VITLAB_KEEP_FREED_MEMORY=false"),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "the environment sets glibc's own malloc settings"),
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "the environment sets glibc's own malloc settings"),
    ({"MALLOC_MMAP_MAX_": "65536"}, "the environment sets glibc's own malloc settings"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"}, "the environment sets glibc's own malloc settings"),
    ({"LD_PRELOAD": "/no/such/libjemalloc.so.2"}, "LD_PRELOAD loads another allocator"),
])
def test_the_switch_and_the_users_own_malloc_settings_are_left_alone(environment, reason):
    said, faults = faults_per_round("keep", **environment)
    assert said == f"not changed ({reason})"


RELEASE = """
import json, sys, torch
from vitlab.train import host_memory
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
host_memory.release_freed_memory()  # before any setting: nothing to do
said = host_memory.keep_freed_memory()
blocks = [torch.empty(4 * 2**20).fill_(1.0) for _ in range(16)]  # 256 MiB
del blocks
kept = resident_mib()
host_memory.release_freed_memory()
print(json.dumps({"said": said, "kept": kept, "released": resident_mib()}))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_a_run_gives_its_kept_memory_back_when_it_ends():
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MALLOC_", host_memory.SWITCH_VARIABLE))}
    result = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True, timeout=120, env=env)
    import json

    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["said"] == host_memory.KEPT
    assert found["kept"] - found["released"] >= 200, found  # the 256 MiB freed and kept, then given back


def test_a_run_releases_what_it_kept_when_training_ends(monkeypatch, cifar_root, tmp_path):
    from vitlab.cli import main
    from vitlab.train import run

    released = []
    monkeypatch.setattr(run, "release_freed_memory", lambda: released.append(True))
    assert main(["train", "--model", "cnn-small", "--subset", "300", "--test_subset", "100", "--epochs", "1", "--batch-size", "50",
                 "--progress", "false", "--data-dir", str(cifar_root), "--out", str(tmp_path / "run")]) == 0
    assert released == [True]


def test_placing_a_model_on_the_cpu_keeps_freed_memory(monkeypatch):
    from torch import nn

    from vitlab.config import TrainConfig
    from vitlab.train import device

    calls = []
    monkeypatch.setattr(device, "keep_freed_memory", lambda: calls.append("kept"))
    device.place_model(nn.Linear(2, 2), TrainConfig(device="cpu", progress=False))
    assert calls == ["kept"]
