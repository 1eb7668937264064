"""ctypes bindings of matmul.c: a linear layer's forward (x · weightᵀ + bias) and input gradient (grad_out · weight) in
bf16, with the weight packed once per forward for both."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlab.kernels.build import compiled_library, library_capabilities, loaded_library

# The deepest sum the kernel takes: up to here oneDNN sums a product's whole depth in one fp32 chain, as the kernel does
# (the same bits); beyond it oneDNN adds separately summed blocks, in an order that depends on the shape.
MAX_DEPTH = 512

# At most this many multiply-adds, PyTorch computes a bf16 product itself instead of calling oneDNN, and keeps bf16
# subnormal numbers there (oneDNN and the kernel count them as 0); so products this small stay with PyTorch.
SMALL_PRODUCT = 16 ** 3


def shape_supported(in_features: int, out_features: int, library) -> bool:
    """Whether the library's kernel takes a layer of these widths: multiples of 16 up to MAX_DEPTH (each is the depth
    of one of the two products), on a CPU with AVX-512 BF16 and without AMX."""
    return (library is not None and library_capabilities(library).matmul and 0 < in_features <= MAX_DEPTH
            and 0 < out_features <= MAX_DEPTH and in_features % 16 == 0 and out_features % 16 == 0)


def kernel_supports(in_features: int, out_features: int) -> bool:
    """Whether `pack_weight` and `matmul` will take a layer of these widths with the kernels switched on."""
    return shape_supported(in_features, out_features, compiled_library())


@dataclass(frozen=True)
class PackedWeight:
    """A bf16 weight (out_features × in_features) as the kernel's pairs: `forward` for x · weightᵀ, `backward` (None
    when not asked for) for grad_out · weight."""

    forward: torch.Tensor  # (in_features / 2, out_features) int32: (weight[o][2p], weight[o][2p+1]) as one number
    backward: torch.Tensor | None  # (out_features / 2, in_features) int32: (weight[2p][i], weight[2p+1][i])

    @property
    def out_features(self) -> int:
        return self.forward.shape[1]

    @property
    def in_features(self) -> int:
        return 2 * self.forward.shape[0]


def pack_weight(weight: torch.Tensor, backward: bool) -> PackedWeight:
    """Pack a bf16 CPU weight (out_features, in_features) for `matmul`; with `backward`, also for the input gradient."""
    if weight.dim() != 2 or weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
        raise ValueError(f"the matmul kernel packs a bf16 CPU matrix, got {weight.dtype} {tuple(weight.shape)} on {weight.device}")
    out_features, in_features = weight.shape
    if not shape_supported(in_features, out_features, loaded_library()):
        raise ValueError(f"the matmul kernel cannot take {in_features} → {out_features} features on this machine")
    weight = weight.contiguous()
    forward = torch.empty(in_features // 2, out_features, dtype=torch.int32)
    backward_pairs = torch.empty(out_features // 2, in_features, dtype=torch.int32) if backward else None
    loaded_library().vitlab_pack_linear_weight(weight.data_ptr(), forward.data_ptr(),
                                               None if backward_pairs is None else backward_pairs.data_ptr(), out_features, in_features)
    return PackedWeight(forward, backward_pairs)


def matmul(a: torch.Tensor, pairs: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (..., depth) bf16 times the matrix packed as `pairs` (depth / 2, width) → (..., width) bf16, plus a bf16 bias
    (width,) if given: each output one fp32 sum over the depth in order, rounded once, as oneDNN's bf16 product (the
    same bits; bf16 subnormal inputs count as 0 there too, unlike in PyTorch's own small products)."""
    if pairs.dtype != torch.int32 or pairs.dim() != 2 or not pairs.is_contiguous():
        raise ValueError("pairs must be a contiguous int32 matrix from pack_weight")
    depth, width = 2 * pairs.shape[0], pairs.shape[1]
    if not shape_supported(depth, width, loaded_library()):
        raise ValueError(f"the matmul kernel cannot take a product of depth {depth} and width {width} on this machine "
                         f"(multiples of 16 up to {MAX_DEPTH}, AVX-512 BF16 without AMX)")
    if a.dtype != torch.bfloat16 or a.device.type != "cpu" or a.dim() < 1 or a.shape[-1] != depth:
        raise ValueError(f"the matmul kernel takes a bf16 CPU tensor (..., {depth}), got {a.dtype} {tuple(a.shape)} on {a.device}")
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.shape != (width,) or bias.device.type != "cpu"):
        raise ValueError(f"the matmul kernel's bias must be a bf16 CPU vector of {width}, got {bias.dtype} {tuple(bias.shape)}")
    a = a.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(*a.shape[:-1], width, dtype=torch.bfloat16)
    rows = a.numel() // depth
    if rows:
        loaded_library().vitlab_matmul_pairs(a.data_ptr(), pairs.data_ptr(), None if bias is None else bias.data_ptr(),
                                             out.data_ptr(), rows, depth, width, torch.get_num_threads())
    return out
