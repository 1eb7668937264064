"""Keeping freed CPU memory in the process for the next training step, instead of handing it back to the OS.

glibc's malloc serves a large block (above its mmap threshold, which it raises to the largest block freed so far, up
to 32 MiB) with fresh pages from the OS and unmaps it when freed, and returns free memory at the top of its heap once
there is more than twice that threshold. A CNN's training step allocates and frees the same large activations every
step, so every step paid for them again in page faults, about a microsecond each: the BN CNN at batch 128 faulted in
60–130 MB a step and cnn-fast about 1 GB a step of 2000 images, where the ViTs' smaller tensors faulted in none
(docs/performance.md, "Page faults in every CNN step"). `keep_freed_memory()` serves the main thread's blocks from
malloc's heap (no mmap) and stops the trimming, so the blocks freed in one step serve the next. The peak memory of a
training process measured the same with it (the BN CNN 1,493 against 1,488 MiB, cnn-fast 1,567 against 1,623).

Kept memory is not given back by itself, and a heap that serves blocks of many sizes between small long-lived
allocations can grow past what is live (a helper's review grew one to 3.5 GB with 0.6 GB live, over many rounds of
random sizes): so every run gives its free memory back when it ends (`release_freed_memory`, from `train.run`), and a
study or notebook that trains run after run starts each from a trimmed heap. A block allocated on another thread
that its arena cannot hold is still mapped afresh (glibc falls back to mmap there).

It runs once per process when a model is placed on the CPU for training (`train.device.place_model`). It does nothing
off glibc (macOS, musl), where the user chose for malloc (glibc's `MALLOC_MMAP_THRESHOLD_`, `MALLOC_MMAP_MAX_`,
`MALLOC_TRIM_THRESHOLD_`, a `glibc.malloc` tunable in `GLIBC_TUNABLES`, or another allocator in `LD_PRELOAD`, which
would ignore these settings), or with `VITLAB_KEEP_FREED_MEMORY` set to 0, false, no or off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
NEVER = -1  # as a size_t, the largest: M_TRIM_THRESHOLD at it never trims (2**31 - 1 still trimmed 2 GiB)
SWITCH_VARIABLE = "VITLAB_KEEP_FREED_MEMORY"
SWITCHED_OFF = ("0", "false", "no", "off")
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc", "hoard", "snmalloc")
KEPT = "freed blocks kept for reuse (no mmap, no trimming)"


@functools.cache
def libc() -> ctypes.CDLL | None:
    """glibc, with mallopt and malloc_trim declared; None off glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    library = ctypes.CDLL(None)
    if getattr(library, "mallopt", None) is None or getattr(library, "malloc_trim", None) is None:
        return None
    library.mallopt.argtypes, library.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    library.malloc_trim.argtypes, library.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return library


def users_choice() -> str | None:
    """Why malloc is left alone (the user's switch or settings), or None."""
    if os.environ.get(SWITCH_VARIABLE, "1").strip().lower() in SWITCHED_OFF:
        return f"{SWITCH_VARIABLE}={os.environ[SWITCH_VARIABLE]}"
    if any(name in os.environ for name in GLIBC_VARIABLES) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "the environment sets glibc's own malloc settings"
    if any(name in os.environ.get("LD_PRELOAD", "").lower() for name in OTHER_ALLOCATORS):
        return "LD_PRELOAD loads another allocator"
    return None


@functools.cache
def keep_freed_memory() -> str:
    """Set glibc's malloc to keep freed memory (see the module doc), once per process; says what it did."""
    reason = users_choice()
    if reason is not None:
        return f"not changed ({reason})"
    library = libc()
    if library is None:
        return "not changed (not glibc)"
    if not library.mallopt(M_TRIM_THRESHOLD, NEVER):
        return "not changed (mallopt refused)"
    if not library.mallopt(M_MMAP_MAX, 0):
        return "trimming off only (mallopt refused to stop mmap)"
    return KEPT


def release_freed_memory() -> None:
    """Give the free memory of malloc's heap back to the OS (malloc_trim), where `keep_freed_memory` kept it: at the
    end of a run."""
    if keep_freed_memory.cache_info().currsize == 0:  # never set in this process: malloc as it was
        return
    if not keep_freed_memory().startswith("not changed"):
        libc().malloc_trim(0)
