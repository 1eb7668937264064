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
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MALLOC_", host_memory.SWITCH_VARIABLE))}
    result = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True, timeout=120,
                            env={**env, **environment})
    import json

    found = json.loads(result.stdout.strip().splitlines()[-1])
    return found["said"], found["faults"]


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    said, kept = faults_per_round("keep")
    _, mapped_each_time = faults_per_round("untouched", MALLOC_MMAP_THRESHOLD_="131072")  # the count sees faults
    assert said == "freed blocks kept for reuse (no mmap, no trimming)"
    assert mapped_each_time >= 192 / 2, mapped_each_time  # at least one fault per 2 MiB (huge pages) of the 192 MiB
    assert kept <= 0.01 * mapped_each_time, (kept, mapped_each_time)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
@pytest.mark.parametrize(("environment", "reason"), [
    ({"VITLAB_KEEP_FREED_MEMORY": "0"}, "VITLAB_KEEP_FREED_MEMORY=0"),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "the environment sets glibc's own thresholds"),
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "the environment sets glibc's own thresholds"),
    ({"MALLOC_MMAP_MAX_": "65536"}, "the environment sets glibc's own thresholds"),
])
def test_the_switch_and_glibcs_own_settings_are_left_alone(environment, reason):
    said, faults = faults_per_round("keep", **environment)
    assert said == f"not changed ({reason})"


def test_placing_a_model_on_the_cpu_keeps_freed_memory(monkeypatch):
    from torch import nn

    from vitlab.config import TrainConfig
    from vitlab.train import device

    calls = []
    monkeypatch.setattr(device, "keep_freed_memory", lambda: calls.append("kept"))
    device.place_model(nn.Linear(2, 2), TrainConfig(device="cpu", progress=False))
    assert calls == ["kept"]
