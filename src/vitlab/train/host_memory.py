"""Keeping freed CPU memory in the process for the next training step, instead of handing it back to the OS.

glibc's malloc serves a large block (above its mmap threshold, which it raises to the largest block freed so far, up
to 32 MiB) with fresh pages from the OS and unmaps it when freed, and returns free memory at the top of its heap once
there is more than twice that threshold. A CNN's training step allocates and frees the same large activations every
step, so every step paid for them again in page faults, about a microsecond each: the BN CNN at batch 128 faulted in
60–130 MB a step and cnn-fast about 1 GB a step of 2000 images, where the ViTs' smaller tensors faulted in none
(docs/performance.md, "Page faults in every CNN step"). `keep_freed_memory()` serves every block from malloc's heap
(no mmap) and stops the trimming, so the blocks freed in one step serve the next; the process keeps its largest step's
memory until it ends, as it would while training anyway.

It runs once per process when a model is placed on the CPU for training (`train.device.place_model`). It does nothing
off glibc (macOS, musl), where one of glibc's own environment variables is set (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`: the user's choice stands), or with `VITLAB_KEEP_FREED_MEMORY=0`.
Without mmap, a block that a thread's own arena cannot hold is served from the main heap (glibc retries there).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

# mallopt's parameters (glibc's malloc.h) and the values set
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: in effect, never trim
SWITCH_VARIABLE = "VITLAB_KEEP_FREED_MEMORY"
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


@functools.cache
def keep_freed_memory() -> str:
    """Set glibc's malloc to keep freed memory (see the module doc), once per process; says what it did."""
    if os.environ.get(SWITCH_VARIABLE, "1") == "0":
        return f"not changed ({SWITCH_VARIABLE}=0)"
    if any(name in os.environ for name in GLIBC_VARIABLES):
        return "not changed (the environment sets glibc's own thresholds)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not changed (not glibc)"
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return "not changed (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        return "not changed (mallopt refused)"
    return "freed blocks kept for reuse (no mmap, no trimming)"
