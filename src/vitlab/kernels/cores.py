"""ctypes binding of cores.c: how far apart the two threads' cores are (a cache line's round trip between them)."""

from __future__ import annotations

import os

from vitlab.kernels.build import compiled_library

ROUND_TRIPS = 50_000
WARMUP_TRIPS = 2_000  # the second thread may be asleep when the first call starts


def core_round_trip_ns(round_trips: int = ROUND_TRIPS) -> float | None:
    """Nanoseconds for a cache line to go from one thread's core to another's and back (tens of ns: the cores share a
    cache; hundreds: they do not), or None without the C kernels or without two CPUs to run on (two threads spinning
    on one CPU would take turns by the scheduler's time slices)."""
    library = compiled_library()
    if library is None or len(os.sched_getaffinity(0)) < 2:
        return None
    library.vitlab_core_round_trip_ns(WARMUP_TRIPS)
    nanoseconds = library.vitlab_core_round_trip_ns(round_trips)
    return nanoseconds if nanoseconds >= 0 else None
