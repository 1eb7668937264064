import os
import subprocess
import sys
import warnings

import pytest
import torch

from vitlab.kernels import build


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """load() recomputed under the test's environment, and again afterwards for the other tests."""
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path))
    build.load.cache_clear()
    yield tmp_path
    build.load.cache_clear()


def test_the_library_is_compiled_into_the_cache_and_reused(fresh_load):
    if build.find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    library, status = build.load()
    assert library is not None and status.startswith("compiled C")
    built = list((fresh_load / "kernels").glob("vitlab-kernels-*.so"))
    assert len(built) == 1 and built[0].name in status
    assert not list((fresh_load / "kernels").glob("tmp*"))  # the temporary file was renamed
    build.load.cache_clear()
    modified = built[0].stat().st_mtime_ns
    assert build.load()[0] is not None and built[0].stat().st_mtime_ns == modified  # loaded, not rebuilt


def test_switched_off_by_the_environment(fresh_load, monkeypatch):
    monkeypatch.setenv("VITLAB_C_KERNELS", "0")
    assert build.load() == (None, "PyTorch operators (VITLAB_C_KERNELS=0)")
    assert build.compiled_library() is None


def test_no_compiler_falls_back_to_pytorch_operators(fresh_load, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-anywhere")
    library, status = build.load()
    assert library is None and "no C compiler found" in status
    assert not (fresh_load / "kernels").exists()


def test_a_failing_compiler_falls_back_and_leaves_nothing_behind(fresh_load, monkeypatch):
    monkeypatch.setenv("CC", "false")  # exits 1 without output
    library, status = build.load()
    assert library is None and status.startswith("PyTorch operators (false failed")
    assert not list((fresh_load / "kernels").iterdir())


def test_the_cache_key_follows_source_compiler_and_cpu(monkeypatch):
    first = build.library_path(["/usr/bin/cc"], b"int x;")
    assert build.library_path(["/usr/bin/cc"], b"int x;") == first
    assert build.library_path(["/usr/bin/cc"], b"int y;") != first
    assert build.library_path(["/usr/bin/clang"], b"int x;") != first
    assert build.library_path(["/usr/bin/ccache", "/usr/bin/cc"], b"int x;") != first
    monkeypatch.setattr(build, "cpu_flags", lambda: "flags : avx2")
    assert build.library_path(["/usr/bin/cc"], b"int x;") != first


def test_a_run_switches_the_kernels_off_and_says_so(monkeypatch):
    from vitlab.config import TrainConfig
    from vitlab.models import build_model
    from vitlab.train.device import place_model

    if build.load()[0] is None:
        pytest.skip("no C kernels on this machine")
    place_model(build_model("cnn-small"), TrainConfig(device="cpu", cpu_kernels=False))
    assert build.compiled_library() is None and build.kernel_status() == "PyTorch operators (cpu_kernels false)"
    place_model(build_model("cnn-small"), TrainConfig(device="cpu"))
    assert build.compiled_library() is not None and build.kernel_status().startswith("compiled C")


def test_a_damaged_or_foreign_cached_library_is_rebuilt_not_loaded(fresh_load):
    """Loading a truncated shared library can kill the process, so a library is loaded only when its digest matches.
    Each damage is followed by a fresh process (this one already has the library mapped) that must rebuild it."""
    if build.find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    build.load()
    built = next((fresh_load / "kernels").glob("vitlab-kernels-*.so"))
    original = built.read_bytes()

    def replace_with(content: bytes) -> None:  # a new file: the library mapped in this process stays untouched
        damaged = built.with_name("damaged")
        damaged.write_bytes(content)
        os.replace(damaged, built)

    check = "from vitlab.kernels import build; library, status = build.load(); print(status); assert library is not None"
    for damage in (lambda: replace_with(original[:5000]), lambda: replace_with(b""), lambda: build.digest_path(built).unlink()):
        damage()
        finished = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "VITLAB_CACHE": str(fresh_load)})
        assert finished.returncode == 0 and finished.stdout.startswith("compiled C"), finished.stderr[-2000:]
        assert build.intact(built) and built.read_bytes() == original


def test_a_library_without_a_kernel_it_should_export_falls_back(fresh_load, monkeypatch):
    if build.find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setitem(build.SIGNATURES, "vitlab_no_such_kernel", ([], None))
    library, status = build.load()
    assert library is None and "C kernels unavailable" in status and "vitlab_no_such_kernel" in status


def test_cc_with_arguments_and_the_compilers_own_error_line(fresh_load, monkeypatch):
    compiler = build.find_compiler()
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("CC", f"{compiler[0]} -DVITLAB_EXTRA_FLAG=1")
    assert build.find_compiler() == [compiler[0], "-DVITLAB_EXTRA_FLAG=1"]
    assert build.load()[0] is not None
    build.load.cache_clear()
    monkeypatch.setenv("CC", f"{compiler[0]} -include /no/such/header.h")
    library, status = build.load()
    assert library is None and "error" in status and "/no/such/header.h" in status


def test_recording_graph_sees_func_transforms_forward_ad_fx_tracing_onnx_export_and_compile(tmp_path):
    from vitlab.kernels import recording_graph
    from vitlab.kernels.build import graph_recording_checks

    seen = []

    def note(x: torch.Tensor) -> torch.Tensor:
        seen.append(recording_graph())
        return x.sum()

    torch.func.grad(note)(torch.ones(2))
    torch.func.vmap(note)(torch.ones(2, 3))
    with torch.autograd.forward_ad.dual_level():
        seen.append(recording_graph())

    class Noting(torch.nn.Module):
        def forward(self, x):
            return note(x)

    torch.fx.symbolic_trace(Noting())
    assert seen == [True, True, True, True] and not recording_graph()
    pytest.importorskip("onnx")

    class NotingExport(torch.nn.Module):  # the ONNX flag itself, whatever else the exporter sets
        def forward(self, x):
            seen.append(graph_recording_checks()[1]())
            return note(x)

    with warnings.catch_warnings():  # the TorchScript-based exporter, deprecated, sets the flag for its whole run
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(NotingExport(), (torch.ones(2),), tmp_path / "noting.onnx", dynamo=False)
    assert seen[4:] == [True, True] and not recording_graph()
    torch.compile(note, backend="eager")(torch.ones(2))  # Dynamo answers it while tracing, inside the graph
    assert seen[6:] == [True] and not recording_graph()


def build_one_source(tmp_path, source_name: str, target: str, needed_macro: str | None = None):
    """ctypes' handle on `source_name`.c built alone for `target` (compiler flags), or a skip where the compiler does
    not take the target or does not define `needed_macro` for it."""
    import ctypes
    from pathlib import Path

    compiler = build.find_compiler()
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    if needed_macro is not None:
        probe = subprocess.run([*compiler, *target.split(), "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True)
        if probe.returncode != 0 or needed_macro not in probe.stdout:
            pytest.skip(f"this compiler does not define {needed_macro} for {target}")
    source = Path(build.__file__).with_name(f"{source_name}.c")
    target_path = tmp_path / f"{source_name}.so"
    flags = [flag for flag in build.FLAGS if not flag.startswith("-march")]
    done = subprocess.run([*compiler, *flags, *target.split(), "-Werror=implicit-function-declaration", "-o",
                           str(target_path), str(source)], capture_output=True, text=True)
    if done.returncode != 0 and any(words in done.stderr for words in ("march", "unrecognized", "unknown target")):
        pytest.skip(f"this compiler does not take {target}")
    assert done.returncode == 0, done.stderr
    return ctypes.CDLL(str(target_path))


@pytest.mark.parametrize(("target", "takes_products"), [("-march=sapphirerapids", False), ("-march=x86-64-v4 -mavx512bf16", True)])
def test_the_linear_products_stay_with_onednn_where_the_cpu_has_amx(tmp_path, target, takes_products):
    """Built for an AMX CPU (whose tiles oneDNN's products use) the products kernel says it does not run; built for an
    AVX-512 BF16 CPU without AMX it does. Only the answer is called, never a product."""
    assert bool(build_one_source(tmp_path, "matmul", target).vitlab_matmul_supported()) is takes_products


def test_the_weight_gradient_builds_on_the_tiles_for_an_amx_cpu(tmp_path):
    """Built for an AMX CPU, weight_gradient.c compiles its tile version (code that only an AMX machine runs, so this
    build is what checks it elsewhere), which runs only on an AMX CPU (where Linux grants the tiles); built without AMX, the vector version,
    which says it runs. Only the answers are called, never a product."""
    tiles = build_one_source(tmp_path, "weight_gradient", "-march=sapphirerapids", "__AMX_BF16__")
    assert tiles.vitlab_weight_gradient_on_tiles() == 1
    assert not tiles.vitlab_weight_gradient_supported() or build.cpu_has_amx()  # runs only where the CPU has AMX
    (tmp_path / "vector").mkdir()
    vector = build_one_source(tmp_path / "vector", "weight_gradient", "-march=x86-64-v4 -mavx512bf16")
    assert vector.vitlab_weight_gradient_on_tiles() == 0 and vector.vitlab_weight_gradient_supported() == 1


def test_an_amx_cpu_leaves_the_products_and_vector_weight_gradients_to_onednn_whatever_the_compiler_knew(amx_cpu, monkeypatch):
    """A compiler that does not know AMX builds the vdpbf16ps kernels even on an AMX CPU; the run-time check still
    keeps them off there (and out of the status line), since oneDNN's products on the tiles are faster. The weight
    gradient's tile version stays on."""
    from vitlab.kernels import matmul as matmul_kernel
    from vitlab.kernels import weight_gradient as weight_gradient_kernel

    library = build.compiled_library()
    if library is None:
        pytest.skip("no C kernels on this machine")
    assert not matmul_kernel.kernel_supports(64, 192)
    on_tiles = bool(library.vitlab_weight_gradient_on_tiles()) and bool(library.vitlab_weight_gradient_supported())
    assert weight_gradient_kernel.kernel_supports(64, 192, True) is on_tiles
    kernels = build.available_kernels(library).split(", ")
    assert kernels[0] == "dropout" and "linear products" not in kernels and ("weight gradients" in kernels) is on_tiles

    class VectorBuild:  # the library as a compiler without AMX builds it
        def __getattr__(self, name):
            return (lambda: 0) if name == "vitlab_weight_gradient_on_tiles" else getattr(library, name)

    vector_build = VectorBuild()
    monkeypatch.setattr(weight_gradient_kernel, "compiled_library", lambda: vector_build)
    assert not weight_gradient_kernel.kernel_supports(64, 192, True)


def test_the_attention_kernel_builds_with_its_amx_tile_code(tmp_path):
    """Built for Sapphire Rapids, attention.c compiles its AMX tile products too (code that only an AMX machine runs, so
    this build is what checks it elsewhere) and reports the kernel. Only the answer is called."""
    assert build_one_source(tmp_path, "attention", "-march=sapphirerapids", "__AMX_BF16__").vitlab_attention_supported() == 1


def test_the_tile_kernels_run_when_the_library_is_built_below_o3(tmp_path):
    """On an AMX CPU, a library built at -O2 (where GCC keeps the tile set-up out of line) runs the tile products of
    attention and of the weight gradient: the
    tile configuration's stores must not be dropped as dead (they were, with GCC 12's own ldtilecfg intrinsic, and the
    first forward crashed). Run in a child process, which such a crash would kill."""
    from pathlib import Path

    compiler = build.find_compiler()
    if compiler is None or not build.cpu_has_amx():
        pytest.skip("needs a C compiler and a CPU with AMX")
    sources = [str(Path(build.__file__).with_name(name)) for name in build.SOURCES]
    target_path = tmp_path / "kernels-O2.so"
    flags = ["-O2" if flag == "-O3" else flag for flag in build.FLAGS]
    done = subprocess.run([*compiler, *flags, "-o", str(target_path), *sources], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    script = f"""
import pathlib, torch
import vitlab.kernels.build as build, vitlab.kernels.attention as attention
library = build.open_library(pathlib.Path({str(target_path)!r}))
build.load = lambda: (library, "-O2")
torch.manual_seed(0)
qkv = torch.randn(2, 33, 3, 2, 16).to(torch.bfloat16)
out, weights = attention.attention_forward(qkv, torch.full((2,), 0.25), False)
grad_qkv, _ = attention.attention_backward(qkv, out, weights, torch.ones_like(out), torch.full((2,), 0.25))
import vitlab.kernels.weight_gradient as weight_gradient
grad_out, x = torch.randn(100, 64).to(torch.bfloat16), torch.randn(100, 32).to(torch.bfloat16)
grad_weight, grad_bias = weight_gradient.weight_gradient(grad_out, x, True)
exact = grad_out.double().t() @ x.double()
print(bool(torch.isfinite(out).all() and torch.isfinite(grad_qkv).all()
           and torch.allclose(grad_weight.double(), exact, atol=1e-4) and torch.allclose(grad_bias.double(), grad_out.double().sum(0), atol=1e-4)))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("True"), run.stderr[-2000:]
