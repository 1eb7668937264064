"""ctypes bindings of batch_norm.c: training-mode BatchNorm of channels-last bf16 activations, with the ReLU after it or
without, forward and backward (statistics and parameters in fp32)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from vitlab.kernels.build import compiled_library, fp32_cpu_vector, library_capabilities, loaded_library, pointer


class BatchStatistics(NamedTuple):
    """A batch's per-channel statistics, fp32 (C,) each: what normalised it and what updates the running estimates."""

    mean: torch.Tensor
    variance: torch.Tensor  # biased: Σ(x − mean)² / rows
    invstd: torch.Tensor  # 1 / √(variance + eps)


def shape_supported(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, library) -> bool:
    """Whether the library's kernel takes x: a plain (not a subclass, not a negated view) (B, C, H, W) bf16 CPU tensor
    in channels-last memory, C a multiple of 16, more than one value per channel; fp32 CPU weight and bias of C numbers
    where given; a CPU and compiler with AVX-512."""
    if library is None or not library_capabilities(library).batch_norm or type(x) is not torch.Tensor:
        return False
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 4 or x.is_neg():
        return False
    channels = x.shape[1]
    return (channels > 0 and channels % 16 == 0 and x.numel() // channels > 1
            and x.is_contiguous(memory_format=torch.channels_last)
            and all(vector is None or fp32_cpu_vector(vector, channels) for vector in (weight, bias)))


def kernel_supports(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether `batch_norm_forward` will take these (see shape_supported) with the kernels switched on."""
    return shape_supported(x, weight, bias, compiled_library())


def batch_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                       with_relu: bool) -> tuple[torch.Tensor, BatchStatistics]:
    """(y, the batch's statistics): y = BatchNorm of x (B, C, H, W) over its batch statistics, ReLU'd if `with_relu`,
    bf16 channels-last as x, for x, weight and bias that `kernel_supports`."""
    if not shape_supported(x, weight, bias, loaded_library()):
        raise ValueError(f"the BatchNorm kernel takes (B, C, H, W) bf16 CPU channels-last tensors with C a multiple of 16 and "
                         f"fp32 parameters, got {tuple(x.shape)} {x.dtype} on {x.device}")
    channels = x.shape[1]
    y = torch.empty_like(x, memory_format=torch.channels_last)
    mean, variance, invstd = torch.empty(channels), torch.empty(channels), torch.empty(channels)
    weight, bias = (None if vector is None else vector.detach().contiguous() for vector in (weight, bias))
    failed = loaded_library().vitlab_batch_norm_forward_bf16(
        x.data_ptr(), y.data_ptr(), pointer(weight), pointer(bias), mean.data_ptr(), variance.data_ptr(),
        invstd.data_ptr(), x.numel() // channels, channels, eps, int(with_relu), torch.get_num_threads())
    if failed:
        raise MemoryError("the BatchNorm kernel could not allocate its per-thread sums")
    return y, BatchStatistics(mean, variance, invstd)


def batch_norm_backward(grad_out: torch.Tensor, x: torch.Tensor, statistics: BatchStatistics, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, with_relu: bool,
                        input_gradient: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(grad_x bf16 channels-last or None without `input_gradient`, grad_weight (C,), grad_bias (C,) fp32) of
    `batch_norm_forward` for its x, parameters and statistics, from the output gradient."""
    if tuple(grad_out.shape) != tuple(x.shape) or grad_out.device.type != "cpu":
        raise ValueError(f"the BatchNorm backward needs a CPU gradient of x's shape {tuple(x.shape)}, got {tuple(grad_out.shape)}")
    channels = x.shape[1]
    grad_out = grad_out.to(torch.bfloat16).resolve_neg().contiguous(memory_format=torch.channels_last)
    grad_x = torch.empty_like(x, memory_format=torch.channels_last) if input_gradient else None
    grad_weight, grad_bias = torch.empty(channels), torch.empty(channels)
    weight, bias = (None if vector is None else vector.detach().contiguous() for vector in (weight, bias))
    failed = loaded_library().vitlab_batch_norm_backward_bf16(
        grad_out.data_ptr(), x.data_ptr(), statistics.mean.data_ptr(), statistics.invstd.data_ptr(), pointer(weight),
        pointer(bias), pointer(grad_x), grad_weight.data_ptr(), grad_bias.data_ptr(), x.numel() // channels, channels,
        int(with_relu), torch.get_num_threads())
    if failed:
        raise MemoryError("the BatchNorm kernel could not allocate its per-thread sums")
    return grad_x, grad_weight, grad_bias
