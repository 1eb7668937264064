"""Small C kernels for the CPU, compiled on first use, for steps PyTorch's operators do in several passes.

`compiled_library()` builds `*.c` in this folder with the system's C compiler (`$CC`, else `cc`, `gcc` or
`clang`) into a shared library cached per source, compiler and CPU (`$VITLAB_CACHE`, else
`$XDG_CACHE_HOME/vitlab`, else `~/.cache/vitlab`), and loads it with ctypes. The library links the OpenMP
runtime PyTorch already loaded, so its threads are PyTorch's threads.

Without a C compiler, with `VITLAB_C_KERNELS=0` or with a run's `--cpu_kernels false` (`switch_kernels`), every
caller uses PyTorch operators instead: the same distributions and formulas, other random draws and roundings
(`kernel_status()` says which, in every results.json).
"""

from vitlab.kernels.build import compiled_library, kernel_status, recording_graph, switch_kernels


def release_buffers() -> int:
    """Free the memory the kernels keep between steps (the attention weights' idle buffers, the ViT block's idle
    temporaries); returns the bytes."""
    from vitlab.kernels.attention import weight_buffers
    from vitlab.kernels.block import release_scratch

    return weight_buffers.release() + release_scratch()


__all__ = ["compiled_library", "kernel_status", "recording_graph", "release_buffers", "switch_kernels"]
