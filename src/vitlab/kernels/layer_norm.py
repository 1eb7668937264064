"""ctypes bindings of layer_norm.c: LayerNorm of fp32 rows into bf16 (for a norm that feeds a bf16 matmul)."""

from __future__ import annotations

import torch

from vitlab.kernels.build import compiled_library, library_capabilities, loaded_library


def shape_supported(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, library) -> bool:
    """Whether the library's layer norm kernel can take x (..., D): fp32 on the CPU with fp32 weight and bias of D
    features, D a multiple of 16 up to the kernel's limit, and a CPU and compiler with AVX-512."""
    if library is None or weight is None or bias is None or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() < 1:
        return False
    features = x.shape[-1]
    capabilities = library_capabilities(library)
    return (capabilities.layer_norm and x.numel() > 0 and features % 16 == 0 and 0 < features <= capabilities.layer_norm_max_features
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.shape == (features,) for t in (weight, bias)))


def kernel_supports(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether `layer_norm_forward` will take x (see shape_supported) with the kernels switched on."""
    return shape_supported(x, weight, bias, compiled_library())


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the last axis of x (..., D) fp32 → (y (..., D) bf16, mean (N,), rstd (N,) fp32) with N rows."""
    if not shape_supported(x, weight, bias, loaded_library()):
        raise ValueError(f"the layer norm kernel cannot take a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}")
    cpu = torch.device("cpu")
    x, weight, bias = x.contiguous(), weight.detach().contiguous(), bias.detach().contiguous()
    features = x.shape[-1]
    rows = x.numel() // features
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=cpu)
    mean, rstd = torch.empty(rows, device=cpu), torch.empty(rows, device=cpu)
    loaded_library().vitlab_layer_norm_forward(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), mean.data_ptr(),
                                               rstd.data_ptr(), rows, features, float(eps), torch.get_num_threads())
    return y, mean, rstd


def layer_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                        rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `layer_norm_forward`: (grad_x (..., D) fp32, grad_weight (D,), grad_bias (D,) fp32)."""
    cpu = torch.device("cpu")
    grad_y = grad_y.to(cpu, torch.bfloat16).contiguous()
    x, weight = x.contiguous(), weight.detach().contiguous()
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y must have x's shape {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    features = x.shape[-1]
    grad_x = torch.empty_like(x)
    grad_weight, grad_bias = torch.empty(features, device=cpu), torch.empty(features, device=cpu)
    failed = loaded_library().vitlab_layer_norm_backward(grad_y.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr(),
                                                         rstd.data_ptr(), grad_x.data_ptr(), grad_weight.data_ptr(), grad_bias.data_ptr(),
                                                         x.numel() // features, features, torch.get_num_threads())
    if failed:
        raise MemoryError("the layer norm kernel could not allocate its per-thread sums")
    return grad_x, grad_weight, grad_bias
