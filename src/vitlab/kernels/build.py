"""Compile this folder's C sources once per machine and load them (see the package docstring)."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch  # (also loads PyTorch's OpenMP runtime before the library, so the library shares it)

SOURCES = ("attention.c", "augment.c", "batch_norm.c", "block.c", "cores.c", "dropout.c", "gelu.c", "layer_norm.c", "matmul.c",
           "patches.c", "pool.c", "single_query.c", "softmax.c", "weight_gradient.c")
HEADERS = ("amx.h", "bf16_math.h")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
COMPILE_SECONDS = 120
DISABLE_VARIABLE = "VITLAB_C_KERNELS"

DROPOUT = [ctypes.c_uint32, ctypes.c_float, ctypes.c_uint64]  # the attention kernel's drop threshold, scale and key
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
    "vitlab_gelu_supported": ([], ctypes.c_int),
    "vitlab_gelu_forward": ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int], None),
    "vitlab_gelu_backward": ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int], ctypes.c_int),
    "vitlab_layer_norm_supported": ([], ctypes.c_int),
    "vitlab_layer_norm_max_features": ([], ctypes.c_int64),
    "vitlab_layer_norm_forward": ([ctypes.c_void_p] * 9 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int], None),
    "vitlab_layer_norm_backward": ([ctypes.c_void_p] * 11 + [ctypes.c_int64] * 2 + [ctypes.c_int], ctypes.c_int),
    "vitlab_crop_flip_normalize": ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 4 + [ctypes.c_int], None),
    "vitlab_crop_flip_max_width": ([], ctypes.c_int64),
    "vitlab_shifted_patches": ([ctypes.c_void_p] * 2 + [ctypes.c_int64] * 6 + [ctypes.c_int], None),
    "vitlab_patches_bf16": ([ctypes.c_void_p] * 2 + [ctypes.c_int64] * 5 + [ctypes.c_int], ctypes.c_int),
    "vitlab_patches_max_width": ([], ctypes.c_int64),
    "vitlab_single_query_forward": ([ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_int],
                                    ctypes.c_int),
    "vitlab_single_query_backward": ([ctypes.c_void_p] * 8 + [ctypes.c_int64] * 4 + [ctypes.c_int], ctypes.c_int),
    "vitlab_single_query_max_head_size": ([], ctypes.c_int64),
    "vitlab_attention_supported": ([], ctypes.c_int),
    "vitlab_attention_max_tokens": ([], ctypes.c_int64),
    "vitlab_attention_max_head_size": ([], ctypes.c_int64),
    "vitlab_attention_forward": ([ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int] + DROPOUT + [ctypes.c_int],
                                 None),
    "vitlab_attention_backward": ([ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] + DROPOUT + [ctypes.c_int], None),
    "vitlab_relu_max_pool_supported": ([], ctypes.c_int),
    **{f"vitlab_relu_max_pool_{direction}_{dtype}": ([ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int], None)
       for direction in ("forward", "backward") for dtype in ("bf16", "f32")},
    **{f"vitlab_max_pool_forward_{dtype}": ([ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int], None)
       for dtype in ("bf16", "f32")},
    "vitlab_batch_norm_supported": ([], ctypes.c_int),
    "vitlab_batch_norm_forward_bf16": ([ctypes.c_void_p] * 7 + [ctypes.c_int64] * 2 + [ctypes.c_double, ctypes.c_int, ctypes.c_int],
                                       ctypes.c_int),
    "vitlab_batch_norm_backward_bf16": ([ctypes.c_void_p] * 9 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 2, ctypes.c_int),
    "vitlab_matmul_supported": ([], ctypes.c_int),
    "vitlab_pack_linear_weight": ([ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2, None),
    "vitlab_matmul_pairs": ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int], None),
    "vitlab_weight_gradient_supported": ([], ctypes.c_int),
    "vitlab_weight_gradient_max_bias_features": ([], ctypes.c_int64),
    "vitlab_weight_gradient_on_tiles": ([], ctypes.c_int),
    "vitlab_weight_gradient": ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int], ctypes.c_int),
    "vitlab_block_supported": ([], ctypes.c_int),
    "vitlab_block_forward": ([ctypes.c_void_p] * 2, ctypes.c_int),
    "vitlab_block_backward": ([ctypes.c_void_p] * 2, ctypes.c_int),
    "vitlab_first_token_block_forward": ([ctypes.c_void_p] * 2, ctypes.c_int),
    "vitlab_first_token_block_backward": ([ctypes.c_void_p] * 2, ctypes.c_int),
    "vitlab_block_scratch_bytes": ([ctypes.c_int64], ctypes.c_int64),
    "vitlab_block_release_scratch": ([], ctypes.c_int64),
    "vitlab_block_fill_scratch": ([ctypes.c_int], ctypes.c_int64),
    "vitlab_core_round_trip_ns": ([ctypes.c_int64], ctypes.c_double),
}


def cache_folder() -> Path:
    """Where compiled libraries are kept: $VITLAB_CACHE, else $XDG_CACHE_HOME/vitlab, else ~/.cache/vitlab."""
    if os.environ.get("VITLAB_CACHE"):
        return Path(os.environ["VITLAB_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vitlab" / "kernels"


def find_compiler() -> list[str] | None:
    """The compiler's command: $CC if set (split like a shell would, e.g. 'ccache gcc'), else the first of cc, gcc,
    clang on the PATH; None if there is none."""
    if os.environ.get("CC"):
        words = shlex.split(os.environ["CC"])
        found = shutil.which(words[0]) if words else None
        return [found, *words[1:]] if found else None
    return next(([found] for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None)


def cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), so a cache shared by two CPUs keeps two builds."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


@functools.cache
def cpu_has_amx() -> bool:
    """Whether the CPU has AMX's bf16 tiles, whatever the compiler knew when it built the library. oneDNN's bf16
    products run on them, several times faster than the `vdpbf16ps` kernels (matmul.c, weight_gradient.c), which
    therefore leave their products to oneDNN there: `library_capabilities` reports them off (docs/performance.md, "The
    Intel machine's AMX"), unless the library has weight_gradient.c's version on the tiles."""
    return "amx_bf16" in cpu_flags().split()


def library_path(compiler: list[str], source_text: bytes) -> Path:
    digest = hashlib.sha256()
    for part in (source_text, " ".join(FLAGS).encode(), " ".join(compiler).encode(), cpu_flags().encode(), platform.machine().encode()):
        digest.update(part + b"\0")
    return cache_folder() / f"vitlab-kernels-{digest.hexdigest()[:16]}.so"


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digest_path(target: Path) -> Path:
    """The sidecar holding the library's sha256, written after the library: a library without a matching one (cut
    short by a crash, damaged, replaced) is rebuilt instead of loaded, since loading a damaged one can kill the process."""
    return target.with_suffix(".sha256")


def intact(target: Path) -> bool:
    try:
        return target.exists() and digest_path(target).read_text(encoding="ascii").strip() == file_digest(target)
    except (OSError, UnicodeDecodeError):
        return False


def compile_library(compiler: list[str], sources: list[Path], target: Path) -> None:
    """Compile into a temporary file next to `target`, flush it to disk, then rename it and write its digest: a
    concurrent process sees all or nothing. Temporary files an hour old (a killed build's) are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob("tmp*"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                stale.unlink()
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run([*compiler, *FLAGS, "-o", temporary, *map(str, sources)], check=True, capture_output=True,
                       timeout=COMPILE_SECONDS)
        with open(temporary, "rb") as built:
            os.fsync(built.fileno())
        digest = file_digest(Path(temporary))
        os.replace(temporary, target)
        write_text_atomically(digest_path(target), digest + "\n")
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_text_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent)
    with os.fdopen(handle, "w", encoding="ascii") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def compiler_error(error: subprocess.CalledProcessError) -> str:
    """The compiler's first line that names an error (else its first line)."""
    lines = error.stderr.decode(errors="replace").strip().splitlines()
    return next((line for line in lines if "error" in line.lower()), lines[0] if lines else str(error))


def open_library(target: Path) -> ctypes.CDLL:
    """Load the library and declare its functions' types; AttributeError if a function is missing."""
    library = ctypes.CDLL(str(target))
    for name, (argument_types, return_type) in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argument_types, return_type
    return library


def pointer(tensor: torch.Tensor | None) -> int | None:
    """The tensor's data address for a kernel, or None (a NULL pointer) for no tensor."""
    return None if tensor is None else tensor.data_ptr()


def fp32_cpu_vector(tensor: torch.Tensor | None, length: int) -> bool:
    """Whether `tensor` is an fp32 CPU vector of `length` numbers (a weight, bias or per-feature scale a kernel reads)."""
    return tensor is not None and tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.shape == (length,)


def fp32_cpu_matrix(tensor: torch.Tensor | None) -> bool:
    """Whether `tensor` is an fp32 CPU matrix (a linear layer's weight a kernel reads)."""
    return tensor is not None and tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.dim() == 2


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a loaded library's kernels can run on this CPU, read from it once (the checks run in every training step)."""

    softmax: bool  # AVX-512
    softmax_max_columns: int
    attention: bool  # AVX-512 BF16
    attention_max_tokens: int
    attention_max_head_size: int
    layer_norm: bool  # AVX-512 (BF16 not needed)
    layer_norm_max_features: int
    gelu: bool  # AVX-512 (BF16 not needed)
    weight_gradient: bool  # AVX-512 BF16; where the CPU has AMX, only the library's tile version
    weight_gradient_max_bias_features: int
    weight_gradient_on_tiles: bool  # AMX
    relu_max_pool: bool  # AVX-512 (BF16 not needed)
    batch_norm: bool  # AVX-512 (BF16 not needed)
    matmul: bool  # AVX-512 BF16, and no AMX (cpu_has_amx)
    small_convolutions_as_matmuls: bool  # AMX (cpu_has_amx); PyTorch's matmul, no C code (models/conv.py)
    block: bool  # a pre-norm block in one call (block.c): the matmul kernel's conditions


@functools.cache
def library_capabilities(library: ctypes.CDLL) -> Capabilities:
    weight_gradient_on_tiles = bool(library.vitlab_weight_gradient_on_tiles())
    return Capabilities(bool(library.vitlab_softmax_supported()), library.vitlab_softmax_max_columns(),
                        bool(library.vitlab_attention_supported()), library.vitlab_attention_max_tokens(),
                        library.vitlab_attention_max_head_size(), bool(library.vitlab_layer_norm_supported()),
                        library.vitlab_layer_norm_max_features(), bool(library.vitlab_gelu_supported()),
                        bool(library.vitlab_weight_gradient_supported()) and (not cpu_has_amx() or weight_gradient_on_tiles),
                        library.vitlab_weight_gradient_max_bias_features(), weight_gradient_on_tiles,
                        bool(library.vitlab_relu_max_pool_supported()),
                        bool(library.vitlab_batch_norm_supported()),
                        bool(library.vitlab_matmul_supported()) and not cpu_has_amx(), cpu_has_amx(),
                        bool(library.vitlab_block_supported()) and not cpu_has_amx())


def available_kernels(library: ctypes.CDLL) -> str:
    capabilities = library_capabilities(library)
    return ", ".join(["dropout", "crop and flip", "patches (plain and shifted)", "single-query attention"]
                     + ["softmax"] * capabilities.softmax + ["attention"] * capabilities.attention
                     + ["layer norm"] * capabilities.layer_norm + ["GELU"] * capabilities.gelu
                     + ["linear products"] * capabilities.matmul + ["weight gradients"] * capabilities.weight_gradient
                     + ["max-pool (after a ReLU or alone)"] * capabilities.relu_max_pool
                     + ["batch norm (with its ReLU)"] * capabilities.batch_norm
                     + ["pre-norm ViT blocks in one call"] * capabilities.block
                     + ["small convolutions as matmuls"] * capabilities.small_convolutions_as_matmuls)


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
    name = Path(compiler[0]).name
    try:
        if not intact(target):
            compile_library(compiler, sources, target)
        library = open_library(target)
    except subprocess.CalledProcessError as error:
        return None, f"PyTorch operators ({name} failed: {compiler_error(error)})"
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        return None, f"PyTorch operators (C kernels unavailable: {error})"
    return library, f"compiled C: {available_kernels(library)} ({name} {' '.join(FLAGS[:2])}, {target.name})"


# Switched per run by the Runner's placement (TrainConfig.cpu_kernels); on by default.
_switched_on = True


def switch_kernels(on: bool) -> None:
    """Use the C kernels (where they can run) or PyTorch's operators only, from now on in this process."""
    global _switched_on
    _switched_on = bool(on)


def compiled_library() -> ctypes.CDLL | None:
    """The C kernels, compiled on first use; None where they cannot be or are switched off (then use PyTorch operators).
    Callers decide with this; a backward pass calls the library it started with (`loaded_library`), even if a later
    run switched the kernels off in between."""
    return load()[0] if _switched_on else None


def loaded_library() -> ctypes.CDLL:
    """The library itself, switched on or not (for a computation that already started in C)."""
    library = load()[0]
    if library is None:
        raise RuntimeError("vitlab's C kernels are not available in this process")
    return library


def library_if_loaded() -> ctypes.CDLL | None:
    """The library if this process has already loaded it, else None (without compiling or loading it: for freeing what
    it holds)."""
    return load()[0] if load.cache_info().currsize else None


def recording_graph() -> bool:
    """Whether torch.compile, tracing (TorchScript's or FX's), ONNX export, a torch.func transform (grad, vmap, jvp, …)
    or forward-mode AD is recording or transforming the computation: the C kernels are plain function calls that none
    of them can see through, so callers use PyTorch operators then. (Asked dozens of times a training step: the
    checks are looked up once, `graph_recording_checks`; torch.compile's first and called by name, which Dynamo
    answers while tracing without stepping into the cached lookup, whose call it would run outside the graph.)"""
    if torch.compiler.is_compiling():
        return True
    tracing, onnx_exporting, fx_tracing_now, interpreter_stack = graph_recording_checks()
    return tracing() or onnx_exporting() or fx_tracing_now() or interpreter_stack() is not None or forward_ad_active()


@functools.cache
def graph_recording_checks() -> tuple[Callable[[], object], ...]:
    """recording_graph's checks after torch.compile's, as functions found once: TorchScript tracing, ONNX export (the two flags
    `torch.onnx.is_in_onnx_export` reads, read directly: that function imports its modules on every call; where this
    PyTorch keeps them elsewhere, the function itself), FX tracing, and the torch.func interpreter stack (None when
    no transform runs)."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

        if not (hasattr(GLOBALS, "in_onnx_export") and hasattr(_flags, "_is_onnx_exporting")):
            raise ImportError("this PyTorch keeps its ONNX export flags elsewhere")

        def onnx_exporting() -> bool:
            return GLOBALS.in_onnx_export or _flags._is_onnx_exporting
    except ImportError:
        onnx_exporting = torch.onnx.is_in_onnx_export
    tracer = torch.fx._symbolic_trace
    fx_is_tracing = getattr(tracer, "is_fx_symbolic_tracing", None) or getattr(tracer, "is_fx_tracing", None) or (lambda: False)
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None) or (lambda: None)
    return torch.jit.is_tracing, onnx_exporting, fx_is_tracing, peek


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (`torch.autograd.forward_ad.dual_level`)."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def kernel_status() -> str:
    """Which kernels this process uses, e.g. 'compiled C (gcc -O3 -march=native, vitlab-kernels-….so)'."""
    return load()[1] if _switched_on else "PyTorch operators (cpu_kernels false)"
