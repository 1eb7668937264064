"""ctypes bindings of attention.c: self-attention of short sequences straight from the QKV projection's output."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from vitlab.kernels.build import compiled_library, library_capabilities, loaded_library


class WeightBuffers:
    """Memory for the attention weights that forward keeps for backward, reused from step to step.

    At 257 tokens a batch of 128 images and 4 heads keeps 68 MB of weights per block. glibc hands allocations that
    large (above its 32 MB ceiling for reusing freed memory) fresh pages from the kernel every time, and faulting them
    in took longer than the attention itself. Every buffer handed out is a view of a flat buffer this pool holds; a
    flat buffer is handed out again only once no tensor but the pool's own refers to its storage (autograd has freed
    the saved weights after backward, or the graph was dropped), so a graph kept with retain_graph keeps its weights.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: list[tuple[torch.Tensor, int]] = []  # (flat bf16 buffer, its storage's use count when idle)

    @staticmethod
    def _use_count(buffer: torch.Tensor) -> int | None:
        count = getattr(torch._C, "_storage_Use_Count", None)
        return None if count is None else count(buffer.untyped_storage()._cdata)

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised bf16 CPU tensor of `shape`, from an idle buffer if one is large enough."""
        needed = 1
        for size in shape:
            needed *= size
        with self._lock:
            idle = [buffer for buffer, idle_count in self._buffers
                    if buffer.numel() >= needed and self._use_count(buffer) == idle_count]
            if idle:
                return min(idle, key=torch.Tensor.numel)[:needed].view(shape)
            buffer = torch.empty(needed, dtype=torch.bfloat16, device=torch.device("cpu"))
            idle_count = self._use_count(buffer)
            if idle_count is None:  # a PyTorch without the count: no reuse
                return buffer.view(shape)
            self._buffers.append((buffer, idle_count))
            return buffer[:needed].view(shape)

    def release(self) -> int:
        """Free the idle buffers (those in use stay until their graphs are gone); returns the bytes freed."""
        with self._lock:
            idle = [self._use_count(buffer) == count for buffer, count in self._buffers]
            freed = sum(buffer.numel() * buffer.element_size() for (buffer, _), free in zip(self._buffers, idle, strict=True) if free)
            self._buffers = [entry for entry, free in zip(self._buffers, idle, strict=True) if not free]
            return freed

    def held_bytes(self) -> int:
        with self._lock:
            return sum(buffer.numel() * buffer.element_size() for buffer, _ in self._buffers)


weight_buffers = WeightBuffers()


def shape_supported(qkv: torch.Tensor, library) -> bool:
    """Whether the library's attention kernel can take this (B, T, 3, H, Dh) tensor: bf16 on the CPU, at most its
    tokens, heads of a multiple of 16 up to its limit, and a CPU and compiler with AVX-512 BF16."""
    if qkv.device.type != "cpu" or qkv.dtype != torch.bfloat16 or qkv.dim() != 5 or qkv.shape[2] != 3:
        return False
    batch, tokens, _, heads, head_size = qkv.shape
    return sizes_supported(batch, tokens, heads, head_size, library)


def sizes_supported(batch: int, tokens: int, heads: int, head_size: int, library) -> bool:
    """Whether the library's attention kernel takes a bf16 CPU qkv of (batch, tokens, 3, heads, head_size)."""
    capabilities = library_capabilities(library)
    return (capabilities.attention and batch > 0 and heads > 0 and 0 < tokens <= capabilities.attention_max_tokens
            and head_size % 16 == 0 and 0 < head_size <= capabilities.attention_max_head_size)


def kernel_supports(qkv: torch.Tensor) -> bool:
    """Whether `attention_forward` will take `qkv` (see shape_supported) with the kernels switched on."""
    library = compiled_library()
    return library is not None and shape_supported(qkv, library)


def kernel_supports_sizes(batch: int, tokens: int, heads: int, head_size: int) -> bool:
    """`kernel_supports` for a bf16 CPU qkv of these sizes, before it exists."""
    library = compiled_library()
    return library is not None and sizes_supported(batch, tokens, heads, head_size, library)


@dataclass(frozen=True)
class AttentionDropout:
    """Dropout of the attention weights inside the kernel: a weight whose 15-bit SplitMix64 number under `key` is below
    `threshold` (of 32768) is dropped, the others are multiplied by `scale`. Backward takes the forward's, whose key
    regenerates the mask."""

    threshold: int
    scale: float
    key: int


NO_DROPOUT = AttentionDropout(threshold=0, scale=1.0, key=0)


def attention_forward(qkv: torch.Tensor, scales: torch.Tensor, mask_diagonal: bool, keep_weights: bool = True,
                      dropout: AttentionDropout = NO_DROPOUT) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qkv (B, T, 3, H, Dh) bf16 on the CPU, scales (H,) → (out (B, T, H, Dh), weights (B, H, T, T) or None), bf16.

    out = dropout(softmax(scale_h · Q Kᵀ [diagonal left out])) V per image and head h, the query rounded to bf16
    after scaling; weights are the softmax's output before the dropout, which backward needs (not written without
    keep_weights): a view of rows padded to a multiple of 16 tokens (see padded_weights)."""
    if not shape_supported(qkv, loaded_library()):
        raise ValueError(f"the attention kernel cannot take a {qkv.dtype} tensor of shape {tuple(qkv.shape)} on {qkv.device}")
    cpu = torch.device("cpu")  # explicit: a default device set with torch.set_default_device must not apply here
    qkv, scales = qkv.contiguous(), scales.to(cpu, torch.float32).contiguous()
    batch, tokens, _, heads, head_size = qkv.shape
    if scales.shape != (heads,):
        raise ValueError(f"scales must have one value per head ({heads}), got shape {tuple(scales.shape)}")
    out = torch.empty(batch, tokens, heads, head_size, dtype=qkv.dtype, device=cpu)
    padded = weight_buffers.take((batch, heads, tokens, padded_tokens(tokens))) if keep_weights else None
    loaded_library().vitlab_attention_forward(qkv.data_ptr(), out.data_ptr(), 0 if padded is None else padded.data_ptr(), batch,
                                              tokens, heads, head_size, scales.data_ptr(), int(mask_diagonal), *dropout_arguments(dropout),
                                              torch.get_num_threads())
    return out, None if padded is None else padded[..., :tokens]


def dropout_arguments(dropout: AttentionDropout) -> tuple[int, float, int]:
    """The kernel's threshold, scale and key arguments, checked."""
    if not 0 <= dropout.threshold < 1 << 15 or not 0 <= dropout.key < 1 << 64:
        raise ValueError(f"attention dropout needs a threshold in [0, 32768) and a 64-bit key, got {dropout}")
    return dropout.threshold, dropout.scale, dropout.key


def padded_tokens(tokens: int) -> int:
    """The row length of the kernel's weights: tokens rounded up to a multiple of 16."""
    return -(-tokens // 16) * 16


def padded_weights(weights: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) weights in the kernel's layout (B, H, T, PADDED(T)), each row followed by zeros: a view of the
    kernel's own output as it is, a padded copy of any other tensor."""
    batch, heads, tokens, _ = weights.shape
    padded = padded_tokens(tokens)
    if weights.stride() == (heads * tokens * padded, tokens * padded, padded, 1) and weights.storage_offset() == 0:
        return weights  # the kernel's output (its padding zeros are in the storage beyond each row)
    return torch.nn.functional.pad(weights, (0, padded - tokens)).contiguous()


def attention_backward(qkv: torch.Tensor, out: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor,
                       scales: torch.Tensor, dropout: AttentionDropout = NO_DROPOUT) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `attention_forward` (given the forward's dropout): (grad_qkv (B, T, 3, H, Dh) bf16,
    grad_scale_sums (B, H) fp32), where grad_scale_sums[b, h] is image b's share of the gradient of scales[h]."""
    cpu = torch.device("cpu")
    qkv, out = qkv.contiguous(), out.contiguous()
    scales = scales.to(cpu, torch.float32).contiguous()
    grad_out = grad_out.to(cpu, torch.bfloat16).contiguous()
    batch, tokens, _, heads, head_size = qkv.shape
    expected = {"out": (out, (batch, tokens, heads, head_size)), "weights": (weights, (batch, heads, tokens, tokens)),
                "grad_out": (grad_out, (batch, tokens, heads, head_size))}
    for name, (tensor, shape) in expected.items():
        if tensor.shape != shape or tensor.dtype != torch.bfloat16 or tensor.device != cpu:
            raise ValueError(f"{name} must be a bf16 CPU tensor of shape {shape}, got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
    weights = padded_weights(weights)  # (B, H, T, PADDED(T)), or its view (B, H, T, T) as forward returned it
    grad_qkv = torch.empty_like(qkv)
    grad_scale_sums = torch.empty(batch, heads, dtype=torch.float32, device=cpu)
    loaded_library().vitlab_attention_backward(qkv.data_ptr(), out.data_ptr(), weights.data_ptr(), grad_out.data_ptr(),
                                               grad_qkv.data_ptr(), grad_scale_sums.data_ptr(), batch, tokens, heads, head_size,
                                               scales.data_ptr(), *dropout_arguments(dropout), torch.get_num_threads())
    return grad_qkv, grad_scale_sums
