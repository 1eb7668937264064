"""ctypes bindings of block.c: a pre-norm transformer block's forward and backward, every kernel called from C in one
call. The caller (models/fused_block.py) allocates what the block keeps and its gradients; the structures below
carry their addresses."""

from __future__ import annotations

import ctypes

import torch

from vitlab.kernels import matmul as matmul_kernel
from vitlab.kernels.build import library_capabilities, library_if_loaded, loaded_library

CPU = torch.device("cpu")
POINTER = ctypes.c_void_p


class BlockSizes(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int64), ("tokens", ctypes.c_int64), ("width", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("hidden", ctypes.c_int64), ("attention_eps", ctypes.c_float), ("mlp_eps", ctypes.c_float),
                ("mask_diagonal", ctypes.c_int32), ("drop_threshold", ctypes.c_uint32), ("drop_scale", ctypes.c_float),
                ("drop_key", ctypes.c_uint64), ("threads", ctypes.c_int32)]


class LinearWeights(ctypes.Structure):
    _fields_ = [("weight", POINTER), ("bias", POINTER), ("backward_pairs", POINTER)]


class BlockForward(ctypes.Structure):
    _fields_ = [(name, POINTER) for name in ("tokens", "addend", "addend_bias", "scales", "attention_norm_weight",
                                             "attention_norm_bias", "mlp_norm_weight", "mlp_norm_bias")] + \
               [(name, LinearWeights) for name in ("qkv", "projection", "first", "last")] + \
               [(name, POINTER) for name in ("stream", "normalised", "attention_mean", "attention_rstd", "qkv_out", "mixed", "weights",
                                             "after_attention", "mlp_input", "mlp_mean", "mlp_rstd", "activated", "slope", "out")]


class BlockBackward(ctypes.Structure):
    _fields_ = [(name, POINTER) for name in (
        "tokens", "stream", "normalised", "qkv", "mixed", "weights", "mlp_input", "activated", "slope", "attention_norm_weight",
        "attention_mean", "attention_rstd", "mlp_norm_weight", "mlp_mean", "mlp_rstd", "after_attention", "scales", "qkv_pairs",
        "projection_pairs", "first_pairs", "last_pairs", "grad_after_attention", "grad_out", "grad_tokens", "grad_addend",
        "grad_addend_bias", "grad_attention_norm_weight", "grad_attention_norm_bias", "grad_mlp_norm_weight", "grad_mlp_norm_bias",
        "grad_qkv_weight", "grad_qkv_bias", "grad_projection_weight", "grad_projection_bias", "grad_first_weight", "grad_first_bias",
        "grad_last_weight", "grad_last_bias", "grad_scale_sums")]


class FirstTokenForward(ctypes.Structure):
    _fields_ = [(name, POINTER) for name in ("tokens", "addend", "addend_bias", "scales", "attention_norm_weight",
                                             "attention_norm_bias", "mlp_norm_weight", "mlp_norm_bias")] + \
               [(name, LinearWeights) for name in ("query", "key_value", "projection", "first", "last")] + \
               [(name, POINTER) for name in ("stream", "normalised", "attention_mean", "attention_rstd", "query_input", "query_out",
                                             "key_value_out", "mixed", "weights", "first_token", "mlp_input", "mlp_mean", "mlp_rstd",
                                             "activated", "slope", "result")]


class FirstTokenBackward(ctypes.Structure):
    _fields_ = [(name, POINTER) for name in (
        "tokens", "stream", "query_input", "normalised", "query", "key_value", "mixed", "mlp_input", "activated", "slope", "weights",
        "first_token", "scales", "attention_norm_weight", "attention_mean", "attention_rstd", "mlp_norm_weight", "mlp_mean", "mlp_rstd",
        "query_pairs", "key_value_pairs", "projection_pairs", "first_pairs", "last_pairs", "grad_result", "grad_tokens", "grad_addend",
        "grad_addend_bias", "grad_attention_norm_weight", "grad_attention_norm_bias", "grad_mlp_norm_weight", "grad_mlp_norm_bias",
        "grad_qkv_weight", "grad_qkv_bias", "grad_projection_weight", "grad_projection_bias", "grad_first_weight", "grad_first_bias",
        "grad_last_weight", "grad_last_bias", "grad_scale_sums")]


def sizes_supported(rows: int, width: int, hidden: int, library) -> bool:
    """Whether block.c takes a block of these sizes: where the Python path runs each of its four products in matmul.c
    (models/linear.py's products_in_kernel: more than a few multiply-adds each, widths it takes: width, 3 · width and
    hidden) — not in PyTorch's own small products or oneDNN's."""
    return (library is not None and library_capabilities(library).block
            and rows * width * min(width, hidden) > matmul_kernel.SMALL_PRODUCT
            and all(matmul_kernel.shape_supported(ins, outs, library) for ins, outs in (
                (width, 3 * width), (width, width), (width, hidden), (hidden, width))))


def layers_fit(width: int, heads: int, qkv_weight: torch.Tensor, projection_weight: torch.Tensor, first_weight: torch.Tensor,
               last_weight: torch.Tensor) -> bool:
    """Whether a block's weights have the shapes block.c reads them in: QKV (3D, D), projection (D, D), the MLP's (M, D)
    and (D, M), with D = width split evenly into `heads` (a replaced layer of another shape goes to the Python path,
    whose checks name the mismatch)."""
    hidden = first_weight.shape[0]
    return (heads > 0 and width % heads == 0 and qkv_weight.shape == (3 * width, width) and projection_weight.shape == (width, width)
            and first_weight.shape == (hidden, width) and last_weight.shape == (width, hidden))


def first_token_sizes_supported(batch: int, tokens: int, width: int, hidden: int, library) -> bool:
    """sizes_supported for the CLS-only last block (its query, projection and MLP act on `batch` rows, its keys and
    values on every token's): the same widths, 2 · width for the keys and values, and more than a few multiply-adds in
    each of its products."""
    return (library is not None and library_capabilities(library).block and batch * width * min(width, hidden) > matmul_kernel.SMALL_PRODUCT
            and all(matmul_kernel.shape_supported(ins, outs, library) for ins, outs in (
                (width, width), (width, 2 * width), (width, hidden), (hidden, width))))


def scratch_bytes(size: int = 0) -> int:
    """The bytes block.c keeps between calls for its temporaries: all of them, or with `size` those in buffers of exactly
    that many bytes (0 where this process has not loaded the library)."""
    library = library_if_loaded()
    return 0 if library is None else int(library.vitlab_block_scratch_bytes(size))


def release_scratch() -> int:
    """Free the temporaries block.c keeps between calls (but those of a call in progress); returns the bytes freed."""
    library = library_if_loaded()
    return 0 if library is None else int(library.vitlab_block_release_scratch())


def run(function: str, sizes: BlockSizes, block: ctypes.Structure) -> None:
    """Call the library's `function` (vitlab_block_forward, …) on the block's sizes and tensors."""
    if getattr(loaded_library(), function)(ctypes.byref(sizes), ctypes.byref(block)):
        raise MemoryError("the block kernel could not allocate its temporary buffers")


def run_forward(sizes: BlockSizes, block: BlockForward) -> None:
    run("vitlab_block_forward", sizes, block)


def run_backward(sizes: BlockSizes, block: BlockBackward) -> None:
    run("vitlab_block_backward", sizes, block)


def run_first_token_forward(sizes: BlockSizes, block: FirstTokenForward) -> None:
    run("vitlab_first_token_block_forward", sizes, block)


def run_first_token_backward(sizes: BlockSizes, block: FirstTokenBackward) -> None:
    run("vitlab_first_token_block_backward", sizes, block)
