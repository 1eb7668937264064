"""Small C kernels for the CPU, compiled on first use, for steps PyTorch's operators do in several passes.

`compiled_library()` builds `*.c` in this folder with the system's C compiler (`$CC`, else `cc`, `gcc` or
`clang`) into a shared library cached per source, compiler and CPU (`$VITLAB_CACHE`, else
`$XDG_CACHE_HOME/vitlab`, else `~/.cache/vitlab`), and loads it with ctypes. The library links the OpenMP
runtime PyTorch already loaded, so its threads are PyTorch's threads.

Without a C compiler, or with `VITLAB_C_KERNELS=0`, every caller falls back to PyTorch operators; the
results differ only in which random numbers are drawn (see `kernel_status()`, saved with every result).
"""

from vitlab.kernels.build import compiled_library, kernel_status, recording_graph

__all__ = ["compiled_library", "kernel_status", "recording_graph"]
