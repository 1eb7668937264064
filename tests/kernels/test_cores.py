import os

import pytest

from vitlab.kernels import compiled_library, cores


@pytest.mark.skipif(compiled_library() is None or len(os.sched_getaffinity(0)) < 2, reason="needs the C kernels and two CPUs")
def test_a_cache_lines_round_trip_between_two_cores_takes_nanoseconds_not_time_slices():
    round_trip = cores.core_round_trip_ns(round_trips=5_000)
    assert round_trip is not None and 1.0 < round_trip < 100_000.0  # tens to hundreds of ns on real cores


def test_without_the_kernels_or_a_second_cpu_there_is_no_probe(monkeypatch):
    monkeypatch.setattr(cores, "compiled_library", lambda: None)
    assert cores.core_round_trip_ns() is None


def test_on_one_cpu_the_probe_does_not_spin_two_threads(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert cores.core_round_trip_ns() is None
