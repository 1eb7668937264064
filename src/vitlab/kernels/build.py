"""Compile this folder's C sources once per machine and load them (see the package docstring)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # (also loads PyTorch's OpenMP runtime before the library, so the library shares it)

SOURCES = ("attention.c", "dropout.c", "softmax.c")
HEADERS = ("bf16_math.h",)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
COMPILE_SECONDS = 120
DISABLE_VARIABLE = "VITLAB_C_KERNELS"

# name → (argument types, return type) of every function the library exports
SIGNATURES = {
    "vitlab_splitmix64_word": ([ctypes.c_uint64, ctypes.c_uint64], ctypes.c_uint64),
    "vitlab_dropout_bf16": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32,
                             ctypes.c_float, ctypes.c_int], None),
    "vitlab_dropout_f32": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32,
                            ctypes.c_float, ctypes.c_int], None),
    "vitlab_softmax_bf16": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int], None),
    "vitlab_softmax_backward_bf16": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int],
                                     None),
    "vitlab_softmax_max_columns": ([], ctypes.c_int64),
    "vitlab_softmax_supported": ([], ctypes.c_int),
    "vitlab_attention_supported": ([], ctypes.c_int),
    "vitlab_attention_max_tokens": ([], ctypes.c_int64),
    "vitlab_attention_max_head_size": ([], ctypes.c_int64),
    "vitlab_attention_forward": ([ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_int], None),
    "vitlab_attention_backward": ([ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int], None),
}


def cache_folder() -> Path:
    """Where compiled libraries are kept: $VITLAB_CACHE, else $XDG_CACHE_HOME/vitlab, else ~/.cache/vitlab."""
    if os.environ.get("VITLAB_CACHE"):
        return Path(os.environ["VITLAB_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vitlab" / "kernels"


def find_compiler() -> str | None:
    """$CC if set, else the first of cc, gcc, clang on the PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None)


def cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), so a cache shared by two CPUs keeps two builds."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def library_path(compiler: str, source_text: bytes) -> Path:
    digest = hashlib.sha256()
    for part in (source_text, " ".join(FLAGS).encode(), compiler.encode(), cpu_flags().encode(), platform.machine().encode()):
        digest.update(part + b"\0")
    return cache_folder() / f"vitlab-kernels-{digest.hexdigest()[:16]}.so"


def compile_library(compiler: str, sources: list[Path], target: Path) -> None:
    """Compile into a temporary file next to `target`, then rename: a concurrent process sees all or nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run([compiler, *FLAGS, "-o", temporary, *map(str, sources)], check=True, capture_output=True,
                       timeout=COMPILE_SECONDS)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@functools.cache
def load() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library or None, a line saying which kernels run and why)."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return None, f"PyTorch operators ({DISABLE_VARIABLE}=0)"
    compiler = find_compiler()
    if compiler is None:
        return None, "PyTorch operators (no C compiler found; set CC to use vitlab's C kernels)"
    sources = [Path(__file__).with_name(name) for name in SOURCES]
    headers = [Path(__file__).with_name(name) for name in HEADERS]
    target = library_path(compiler, b"\0".join(path.read_bytes() for path in sources + headers))
    try:
        if not target.exists():
            compile_library(compiler, sources, target)
        library = ctypes.CDLL(str(target))
    except subprocess.CalledProcessError as error:
        reason = error.stderr.decode(errors="replace").strip().splitlines()
        return None, f"PyTorch operators ({Path(compiler).name} failed: {reason[0] if reason else error})"
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"PyTorch operators (C kernels unavailable: {error})"
    for name, (argument_types, return_type) in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argument_types, return_type
    return library, f"compiled C ({Path(compiler).name} {' '.join(FLAGS[:2])}, {target.name})"


# Switched per run by the Runner's placement (TrainConfig.cpu_kernels); on by default.
_switched_on = True


def switch_kernels(on: bool) -> None:
    """Use the C kernels (where they can run) or PyTorch's operators only, from now on in this process."""
    global _switched_on
    _switched_on = bool(on)


def compiled_library() -> ctypes.CDLL | None:
    """The C kernels, compiled on first use; None where they cannot be or are switched off (then use PyTorch operators)."""
    return load()[0] if _switched_on else None


def recording_graph() -> bool:
    """Whether torch.compile, tracing or ONNX export is recording the graph: the C kernels are plain function calls
    that none of them can record, so callers use PyTorch operators then."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def kernel_status() -> str:
    """Which kernels this process uses, e.g. 'compiled C (gcc -O3 -march=native, vitlab-kernels-….so)'."""
    return load()[1] if _switched_on else "PyTorch operators (cpu_kernels false)"
