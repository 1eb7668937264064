"""How long a computation spends inside vitlab's C kernels: every call of the library's kernels timed, for a benchmark
to say how much of a training step is the kernels' work and how much is the Python and PyTorch around them."""

from __future__ import annotations

import time
from collections import Counter

from vitlab.kernels.build import SIGNATURES, loaded_library

# The library's functions that only report what it can do (no work of their own): not timed.
CAPABILITY_SUFFIXES = ("_supported", "_max_tokens", "_max_head_size", "_max_width", "_max_columns", "_max_features",
                       "_max_bias_features", "_on_tiles")
KERNEL_FUNCTIONS = tuple(name for name in SIGNATURES if not name.endswith(CAPABILITY_SUFFIXES))


class KernelClock:
    """Within `with KernelClock() as clock:` every call of a C kernel is timed (wall clock around the call):
    `clock.seconds` is their total, `clock.by_kernel` and `clock.calls` the same per function. The library's own
    functions are put back on leaving, also after an error. Not for use from two threads at once."""

    def __init__(self) -> None:
        self.by_kernel: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._originals: dict[str, object] = {}

    @property
    def seconds(self) -> float:
        return sum(self.by_kernel.values())

    def __enter__(self) -> KernelClock:
        library = loaded_library()
        if not all(isinstance(getattr(library, name), library._FuncPtr) for name in KERNEL_FUNCTIONS):
            raise RuntimeError("the C kernels are being timed already (KernelClock does not nest)")
        for name in KERNEL_FUNCTIONS:
            self._originals[name] = getattr(library, name)
            setattr(library, name, self._timed(name, self._originals[name]))
        return self

    def __exit__(self, *exc_info) -> None:
        library = loaded_library()
        for name, function in self._originals.items():
            setattr(library, name, function)
        self._originals.clear()

    def _timed(self, name: str, function):
        by_kernel, calls, clock = self.by_kernel, self.calls, time.perf_counter

        def timed(*arguments):
            start = clock()
            try:
                return function(*arguments)
            finally:
                by_kernel[name] += clock() - start
                calls[name] += 1

        return timed
