"""ctypes bindings of layer_norm.c: LayerNorm of fp32 rows into bf16 (for a norm that feeds a bf16 matmul), on its
own or with the residual add before it."""

from __future__ import annotations

import torch

from vitlab.kernels.build import compiled_library, fp32_cpu_vector, library_capabilities, loaded_library, pointer

CPU = torch.device("cpu")


def shape_supported(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, library) -> bool:
    """Whether the library's layer norm kernel can take x (..., D): fp32 on the CPU with fp32 weight and bias of D
    features, D a multiple of 16 up to the kernel's limit, and a CPU and compiler with AVX-512."""
    if library is None or weight is None or bias is None or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() < 1:
        return False
    features = x.shape[-1]
    capabilities = library_capabilities(library)
    return (capabilities.layer_norm and x.numel() > 0 and features % 16 == 0 and 0 < features <= capabilities.layer_norm_max_features
            and fp32_cpu_vector(weight, features) and fp32_cpu_vector(bias, features))


def residual_shape_supported(x: torch.Tensor, addend: torch.Tensor, addend_bias: torch.Tensor | None, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, library) -> bool:
    """shape_supported, and an addend of x's shape in bf16 on the CPU, and an addend bias (if any) as the weight."""
    return (shape_supported(x, weight, bias, library) and addend.device.type == "cpu" and addend.dtype == torch.bfloat16
            and addend.shape == x.shape
            and (addend_bias is None or fp32_cpu_vector(addend_bias, x.shape[-1])))


def kernel_supports(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether `layer_norm_forward` will take x (see shape_supported) with the kernels switched on."""
    return shape_supported(x, weight, bias, compiled_library())


def residual_kernel_supports(x: torch.Tensor, addend: torch.Tensor, addend_bias: torch.Tensor | None, weight: torch.Tensor | None,
                             bias: torch.Tensor | None) -> bool:
    """Whether `residual_layer_norm_forward` will take these (see residual_shape_supported) with the kernels on."""
    return residual_shape_supported(x, addend, addend_bias, weight, bias, compiled_library())


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the last axis of x (..., D) fp32 → (y (..., D) bf16, mean (N,), rstd (N,) fp32) with N rows."""
    if not shape_supported(x, weight, bias, loaded_library()):
        raise ValueError(f"the layer norm kernel cannot take a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}")
    _, y, mean, rstd = run_forward(x, None, None, weight, bias, eps)
    return y, mean, rstd


def residual_layer_norm_forward(x: torch.Tensor, addend: torch.Tensor, addend_bias: torch.Tensor | None, weight: torch.Tensor,
                                bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """total = x + addend (+ addend_bias) in fp32 (x (..., D) fp32, addend bf16 of x's shape, addend_bias (D,) fp32 or
    None), and its LayerNorm → (total (..., D) fp32, y (..., D) bf16, mean (N,), rstd (N,) fp32)."""
    if not residual_shape_supported(x, addend, addend_bias, weight, bias, loaded_library()):
        raise ValueError(f"the layer norm kernel cannot add a {addend.dtype} tensor of shape {tuple(addend.shape)} to a {x.dtype} "
                         f"tensor of shape {tuple(x.shape)} on {x.device}")
    return run_forward(x, addend, addend_bias, weight, bias, eps)


def run_forward(x: torch.Tensor, addend: torch.Tensor | None, addend_bias: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's forward on checked inputs: (total or None without an addend, y, mean, rstd)."""
    x, weight, bias = x.contiguous(), weight.detach().contiguous(), bias.detach().contiguous()
    addend = None if addend is None else addend.contiguous()
    addend_bias = None if addend_bias is None else addend_bias.detach().contiguous()
    features = x.shape[-1]
    rows = x.numel() // features
    total = None if addend is None else torch.empty_like(x)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=CPU)
    mean, rstd = torch.empty(rows, device=CPU), torch.empty(rows, device=CPU)
    loaded_library().vitlab_layer_norm_forward(x.data_ptr(), pointer(addend), pointer(addend_bias), pointer(total), weight.data_ptr(),
                                               bias.data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), rows, features,
                                               float(eps), torch.get_num_threads())
    return total, y, mean, rstd


def layer_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                        rstd: torch.Tensor, input_gradient: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The gradients of `layer_norm_forward`: (grad_x (..., D) fp32, or None without `input_gradient` (then not
    computed), grad_weight (D,), grad_bias (D,) fp32)."""
    grad_x, _, grad_weight, grad_bias, _ = run_backward(grad_y, x, weight, mean, rstd, None, False, input_gradient=input_gradient)
    return grad_x, grad_weight, grad_bias


def residual_layer_norm_backward(grad_y: torch.Tensor, total: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                                 grad_total: torch.Tensor | None, addend_bias_gradient: bool) -> tuple[torch.Tensor, ...]:
    """The gradients of `residual_layer_norm_forward`, given grad_y and the gradient reaching `total` from elsewhere
    (None: none): (grad_x (..., D) fp32, grad_addend (..., D) bf16 — the same values —, grad_weight (D,),
    grad_bias (D,), and with `addend_bias_gradient` grad_addend_bias (D,) fp32, else None)."""
    return run_backward(grad_y, total, weight, mean, rstd, grad_total, addend_bias_gradient, bf16_copy=True)


def run_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                 grad_residual: torch.Tensor | None, column_sums: bool, bf16_copy: bool = False,
                 input_gradient: bool = True) -> tuple[torch.Tensor | None, ...]:
    """The kernel's backward: (grad_x, grad_x in bf16 or None, grad_weight, grad_bias, grad_x's column sums or None);
    without `input_gradient` (no residual, copy or column sums then) grad_x is None and not computed."""
    if not input_gradient and (grad_residual is not None or column_sums or bf16_copy):
        raise ValueError("the residual, the bf16 copy and the column sums all need the input gradient")
    grad_y = grad_y.to(CPU, torch.bfloat16).contiguous()
    x, weight = x.contiguous(), weight.detach().contiguous()
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y must have x's shape {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    if grad_residual is not None:
        grad_residual = grad_residual.to(CPU, torch.float32).contiguous()
        if grad_residual.shape != x.shape:
            raise ValueError(f"the residual gradient must have x's shape {tuple(x.shape)}, got {tuple(grad_residual.shape)}")
    features = x.shape[-1]
    grad_x = torch.empty_like(x) if input_gradient else None
    grad_x_bf16 = torch.empty(x.shape, dtype=torch.bfloat16, device=CPU) if bf16_copy else None
    grad_weight, grad_bias = torch.empty(features, device=CPU), torch.empty(features, device=CPU)
    grad_columns = torch.empty(features, device=CPU) if column_sums else None
    failed = loaded_library().vitlab_layer_norm_backward(grad_y.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr(),
                                                         rstd.data_ptr(), pointer(grad_residual), pointer(grad_x), pointer(grad_x_bf16),
                                                         grad_weight.data_ptr(), grad_bias.data_ptr(), pointer(grad_columns),
                                                         x.numel() // features, features, torch.get_num_threads())
    if failed:
        raise MemoryError("the layer norm kernel could not allocate its per-thread sums")
    return grad_x, grad_x_bf16, grad_weight, grad_bias, grad_columns
