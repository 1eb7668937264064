"""ctypes bindings of pool.c: ReLU and a 2×2 max-pool in one pass over channels-last bf16 or fp32 activations, or the
max-pool alone.

Both directions are registered as PyTorch operators (`torch.ops.vitlab.relu_max_pool2d`, `torch.ops.vitlab.max_pool2d`
and, for both, `torch.ops.vitlab.relu_max_pool2d_backward`; CPU only), so the profiler names them and dispatch modes see their
tensors (benchmarks/bench.py counts their bytes as it counts aten's).
"""

from __future__ import annotations

import torch

from vitlab.kernels.build import compiled_library, library_capabilities, loaded_library

# The byte the kernel writes where ReLU stops the gradient (0-3 name the window position that won).
NO_GRADIENT = 4
# dtype → the suffix of the C functions that take it
SUFFIXES = {torch.bfloat16: "bf16", torch.float32: "f32"}

_operators = torch.library.Library("vitlab", "FRAGMENT")
_operators.define("relu_max_pool2d(Tensor x) -> (Tensor, Tensor)")
_operators.define("max_pool2d(Tensor x) -> (Tensor, Tensor)")
_operators.define("relu_max_pool2d_backward(Tensor grad_out, Tensor position, int height, int width) -> Tensor")


def shape_supported(x: torch.Tensor, library) -> bool:
    """Whether the library's kernel takes x: a plain (not a subclass, not a negated view) (B, C, H, W) bf16 or fp32 CPU
    tensor in channels-last memory, none of its sizes 0, H and W at least 2, on a CPU and compiler with AVX-512."""
    return (library is not None and library_capabilities(library).relu_max_pool and type(x) is torch.Tensor
            and x.device.type == "cpu" and x.dtype in SUFFIXES and x.dim() == 4 and x.shape[2] >= 2 and x.shape[3] >= 2
            and x.shape[0] > 0 and x.shape[1] > 0 and not x.is_neg() and x.is_contiguous(memory_format=torch.channels_last))


def kernel_supports(x: torch.Tensor) -> bool:
    """Whether `relu_max_pool` will take x (see shape_supported) with the kernels switched on."""
    return shape_supported(x, compiled_library())


def channels_last_empty(batch: int, channels: int, height: int, width: int, dtype: torch.dtype,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.empty((batch, channels, height, width), dtype=dtype, device=device, memory_format=torch.channels_last)


def relu_max_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max-pool 2×2 of ReLU(x), (B, C, H/2, W/2) in x's dtype, channels-last; the winning position per output, uint8
    in the same layout: 0-3 in reading order within the window, NO_GRADIENT where ReLU passes no gradient) for x that
    `kernel_supports`."""
    return pooled(x, "relu_max_pool")


def max_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`relu_max_pool` without the ReLU: max-pool 2×2 of x and the winning positions (never NO_GRADIENT)."""
    return pooled(x, "max_pool")


def pooled(x: torch.Tensor, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of pool.c's `kernel` (relu_max_pool or max_pool) for x that `kernel_supports`."""
    if not shape_supported(x, loaded_library()):
        raise ValueError(f"the max-pool kernel takes (B, C, H, W) bf16 or fp32 CPU channels-last tensors with H, W >= 2, got "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    batch, channels, height, width = x.shape
    out = channels_last_empty(batch, channels, height // 2, width // 2, x.dtype)
    position = channels_last_empty(batch, channels, height // 2, width // 2, torch.uint8)
    forward = getattr(loaded_library(), f"vitlab_{kernel}_forward_{SUFFIXES[x.dtype]}")
    forward(x.data_ptr(), out.data_ptr(), position.data_ptr(), batch, height, width, channels, torch.get_num_threads())
    return out, position


def relu_max_pool_backward(grad_out: torch.Tensor, position: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The gradient of x (B, C, height, width), channels-last, in the output gradient's dtype (bf16 or fp32), from that
    gradient and `relu_max_pool`'s positions."""
    if position.dim() != 4 or position.dtype != torch.uint8:
        raise ValueError(f"the ReLU/max-pool backward needs the forward's (B, C, H/2, W/2) uint8 positions, got "
                         f"{tuple(position.shape)} {position.dtype}")
    batch, channels = position.shape[:2]
    expected = (batch, channels, height // 2, width // 2)
    if tuple(grad_out.shape) != expected or tuple(position.shape) != expected:
        raise ValueError(f"the ReLU/max-pool backward needs a gradient and positions of shape {expected}, got "
                         f"{tuple(grad_out.shape)} and {tuple(position.shape)}")
    if grad_out.dtype not in SUFFIXES or grad_out.device.type != "cpu":
        raise ValueError(f"the ReLU/max-pool backward takes a bf16 or fp32 CPU gradient, got {grad_out.dtype} on {grad_out.device}")
    grad_out = grad_out.resolve_neg().contiguous(memory_format=torch.channels_last)  # the kernel reads memory as it is
    position = position.contiguous(memory_format=torch.channels_last)
    grad_x = channels_last_empty(batch, channels, height, width, grad_out.dtype)
    backward = getattr(loaded_library(), f"vitlab_relu_max_pool_backward_{SUFFIXES[grad_out.dtype]}")
    backward(grad_out.data_ptr(), position.data_ptr(), grad_x.data_ptr(), batch, height, width, channels,
             torch.get_num_threads())
    return grad_x


def relu_max_pool_meta(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shapes, dtypes and layout of `relu_max_pool`'s outputs, without data (for fake and meta tensors)."""
    batch, channels, height, width = x.shape
    return (channels_last_empty(batch, channels, height // 2, width // 2, x.dtype, x.device),
            channels_last_empty(batch, channels, height // 2, width // 2, torch.uint8, x.device))


def relu_max_pool_backward_meta(grad_out: torch.Tensor, position: torch.Tensor, height: int, width: int) -> torch.Tensor:
    batch, channels = position.shape[:2]
    return channels_last_empty(batch, channels, height, width, grad_out.dtype, grad_out.device)


_operators.impl("relu_max_pool2d", relu_max_pool, "CPU")
_operators.impl("max_pool2d", max_pool, "CPU")
_operators.impl("max_pool2d", relu_max_pool_meta, "Meta")
_operators.impl("relu_max_pool2d_backward", relu_max_pool_backward, "CPU")
_operators.impl("relu_max_pool2d", relu_max_pool_meta, "Meta")
_operators.impl("relu_max_pool2d_backward", relu_max_pool_backward_meta, "Meta")
