"""ctypes bindings of weight_gradient.c: a linear layer's weight (and bias) gradient from bf16 activations, in fp32."""

from __future__ import annotations

import torch

from vitlab.kernels.build import compiled_library, library_capabilities, loaded_library

# On the AMX tiles the kernel keeps its fp32 sums (out × in) in memory between chunks of rows; for layers of more than
# this many weights it was slower than oneDNN's product for some shapes and faster for others (docs/performance.md, "The
# weight gradient on the AMX tiles"), so they stay with oneDNN. Every ViT preset's layers are within it.
TILES_MAX_WEIGHTS = 512 * 512


def shape_supported(in_features: int, out_features: int, with_bias: bool, library) -> bool:
    """Whether the library's kernel takes a layer of these widths: multiples of 16 (out_features at most the kernel's
    bias width when it sums a bias gradient), on a CPU and compiler with AVX-512 BF16; on a CPU with AMX, the kernel's
    tile version and at most TILES_MAX_WEIGHTS weights."""
    if library is None:
        return False
    capabilities = library_capabilities(library)
    return (capabilities.weight_gradient and in_features > 0 and out_features > 0 and in_features % 16 == 0
            and out_features % 16 == 0 and (not with_bias or out_features <= capabilities.weight_gradient_max_bias_features)
            and (not capabilities.weight_gradient_on_tiles or in_features * out_features <= TILES_MAX_WEIGHTS))


def kernel_supports(in_features: int, out_features: int, with_bias: bool) -> bool:
    """Whether `weight_gradient` will take a layer of these widths with the kernels switched on."""
    return shape_supported(in_features, out_features, with_bias, compiled_library())


def weight_gradient(grad_out: torch.Tensor, x: torch.Tensor, bias_gradient: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Σ over rows of grad_outᵀ x, (out, in) fp32; with `bias_gradient` the column sums of grad_out, (out,) fp32, else
    None) for bf16 CPU grad_out (..., out) and x (..., in) with the same leading shape."""
    if grad_out.shape[:-1] != x.shape[:-1] or grad_out.dim() < 1:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)} must share every axis but the last")
    out_features, in_features = grad_out.shape[-1], x.shape[-1]
    for name, tensor in (("grad_out", grad_out), ("x", x)):
        if tensor.device.type != "cpu" or tensor.dtype != torch.bfloat16:
            raise ValueError(f"the weight-gradient kernel takes bf16 CPU tensors, got {name} {tensor.dtype} on {tensor.device}")
    if not shape_supported(in_features, out_features, bias_gradient, loaded_library()):
        raise ValueError(f"the weight-gradient kernel cannot take {in_features} → {out_features} features on this machine")
    grad_out, x = grad_out.contiguous(), x.contiguous()
    grad_weight = torch.empty(out_features, in_features)
    grad_bias = torch.empty(out_features) if bias_gradient else None
    failed = loaded_library().vitlab_weight_gradient(grad_out.data_ptr(), x.data_ptr(), grad_weight.data_ptr(),
                                                     None if grad_bias is None else grad_bias.data_ptr(),
                                                     x.numel() // in_features, out_features, in_features, torch.get_num_threads())
    if failed:
        raise MemoryError("the weight-gradient kernel could not allocate its per-thread sums")
    return grad_weight, grad_bias
