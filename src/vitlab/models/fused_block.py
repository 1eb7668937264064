"""A pre-norm transformer block on vitlab's C kernels as one autograd node.

On the kernel path (CPU bf16 autocast) a pre-norm block is eight autograd Functions: the first norm (with the previous
block's deferred MLP output added, models/norms.py), the QKV projection, attention, the output projection, the residual
add with the second norm, the MLP's first layer, GELU with that layer's bias, and its last layer. At the seeds' sizes
each Function's Python and autograd bookkeeping took about as long as its kernel (docs/performance.md, "A block as one
autograd node"). `BlockOnKernels` runs the same kernels, in the same order, on the same inputs — the same bits — as
one Function, its parts' checks made once per block (`Block.runs_as_one_node` in models/vit.py). Where every product
runs in matmul.c (AVX-512 BF16 without AMX), the whole block is one call into C (kernels/block.c): the same kernels
again, without Python between them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch

from vitlab.kernels import block as block_kernel
from vitlab.kernels import gelu as gelu_kernel
from vitlab.kernels import layer_norm as layer_norm_kernel
from vitlab.kernels import single_query as single_query_kernel
from vitlab.kernels.attention import dropout_arguments, padded_tokens, weight_buffers
from vitlab.kernels.build import loaded_library, pointer
from vitlab.models.base import ThreadSwitch
from vitlab.models.layers import (
    SavedAttention,
    kernel_attention_backward,
    kernel_attention_dropout,
    kernel_attention_forward,
    per_head_scales,
    scale_gradient,
)
from vitlab.models.linear import SavedLinear, linear_backward, linear_forward, refuse_double_backward

_separate = ThreadSwitch()
_in_python = ThreadSwitch()


def blocks_as_separate_nodes():
    """Within it, blocks on this thread run as their parts' own autograd Functions (for comparisons and tests)."""
    return _separate.on()


def blocks_may_fuse() -> bool:
    """Whether `blocks_as_separate_nodes` is off on this thread."""
    return not _separate.is_on()


def blocks_from_python():
    """Within it, fused blocks on this thread call their kernels from Python, not in one call into C (for comparisons
    and tests)."""
    return _in_python.on()


# Whether a profiler records (a private PyTorch function, looked up once; without it, never: the parts go unnamed).
profiler_running = getattr(torch.autograd, "_profiler_enabled", lambda: False)


def part(name: str, profiling: bool):
    """While a profiler runs, a range named as the part's own autograd Function (and its backward) is named, so that a
    profile (benchmarks/bench.py's breakdown) shows the block's parts as it shows them unfused."""
    return torch.profiler.record_function(name) if profiling else contextlib.nullcontext()


def first_norm_forward(tokens: torch.Tensor, addend: torch.Tensor | None, addend_bias: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float, profiling: bool) -> tuple[torch.Tensor, ...]:
    """A block's first norm: (the stream (tokens, or tokens + addend (+ addend_bias) when an addend is given), its norm in
    bf16, mean, rstd)."""
    if addend is None:
        with part("KernelLayerNorm", profiling):
            return tokens, *layer_norm_kernel.layer_norm_forward(tokens, weight, bias, eps)
    with part("KernelResidualNorm", profiling):
        return layer_norm_kernel.residual_layer_norm_forward(tokens, addend, addend_bias, weight, bias, eps)


def first_norm_backward(grad_normalised: torch.Tensor, grad_stream: torch.Tensor, tokens: torch.Tensor, stream: torch.Tensor,
                        weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, has_addend: bool, tokens_gradient: bool,
                        addend_bias_gradient: bool, profiling: bool) -> tuple[torch.Tensor | None, ...]:
    """`first_norm_forward`'s gradients, given its norm's and its stream's (the stream also reaches the residual add):
    (grad_tokens, grad_addend, grad_addend_bias, grad_weight, grad_bias), None where there is no such input."""
    if has_addend:
        with part("KernelResidualNormBackward", profiling):
            grad_tokens, grad_addend, grad_weight, grad_bias, grad_addend_bias = layer_norm_kernel.residual_layer_norm_backward(
                grad_normalised, stream, weight, mean, rstd, grad_stream, addend_bias_gradient)
        return grad_tokens, grad_addend, grad_addend_bias, grad_weight, grad_bias
    with part("KernelLayerNormBackward", profiling):  # the kernel adds the residual's gradient (as autograd would)
        grad_tokens, _, grad_weight, grad_bias, _ = layer_norm_kernel.run_backward(
            grad_normalised, tokens, weight, mean, rstd, grad_stream if tokens_gradient else None, column_sums=False,
            input_gradient=tokens_gradient)
    return grad_tokens, None, None, grad_weight, grad_bias


def mlp_forward(x: torch.Tensor, first_weight: torch.Tensor, first_bias: torch.Tensor, last_weight: torch.Tensor,
                last_bias: torch.Tensor | None, profiling: bool) -> tuple[torch.Tensor, SavedLinear, torch.Tensor, SavedLinear]:
    """A block's MLP on its normalised input x (..., D) bf16: (its output (..., D) bf16, with the last bias unless None;
    what the first layer's backward needs; GELU's derivative; what the last layer's backward needs)."""
    with part("KernelLinear", profiling):
        hidden, first_saved = linear_forward(x, first_weight, None, input_gradient=True)  # (..., M) bf16
    with part("KernelGELU", profiling):
        activated, slope = gelu_kernel.gelu_forward(hidden, first_bias)  # GELU(hidden + bias), GELU'
    with part("KernelLinear", profiling):
        out, last_saved = linear_forward(activated, last_weight, last_bias, input_gradient=True)  # (..., D) bf16
    return out, first_saved, slope, last_saved


def mlp_backward(grad_out: torch.Tensor, first_saved: SavedLinear, slope: torch.Tensor, last_saved: SavedLinear,
                 needs: tuple[bool, ...], profiling: bool) -> tuple[torch.Tensor | None, ...]:
    """`mlp_forward`'s gradients: (grad_x, grad_first_weight, grad_first_bias, grad_last_weight, grad_last_bias), given
    whether the first weight, first bias, last weight and last bias each need one (`needs`). Each intermediate gradient
    is freed once used, as the unfused nodes free theirs."""
    first_weight_needed, first_bias_needed, last_weight_needed, last_bias_needed = needs
    with part("KernelLinearBackward", profiling):
        grad_activated, grad_last_weight, grad_last_bias = linear_backward(last_saved, grad_out, True, last_weight_needed,
                                                                           last_bias_needed)
    with part("KernelGELUBackward", profiling):
        grad_hidden, grad_first_bias = gelu_kernel.gelu_backward(grad_activated, slope, bias_gradient=first_bias_needed)
    del grad_activated
    with part("KernelLinearBackward", profiling):
        grad_x, grad_first_weight, _ = linear_backward(first_saved, grad_hidden, True, first_weight_needed, False)
    return grad_x, grad_first_weight, grad_first_bias, grad_last_weight, grad_last_bias


@dataclass(frozen=True)
class BlockLayout:
    """What the block's Function needs besides tensors."""

    heads: int
    attention_eps: float  # the first norm's epsilon
    mlp_eps: float  # the second norm's
    mask_self: bool  # LSA's diagonal mask
    attention_dropout: float  # on the attention weights, inside the kernel (0 when not training)


class BlockOnKernels(torch.autograd.Function):
    """A pre-norm block on the kernels: (stream after attention (B, T, D) fp32, the MLP's output (B, T, D) bf16, with
    its last bias unless that is None). The first norm adds `addend` (+ `addend_bias`) to `tokens` first when given (a
    previous block's deferred MLP output); without it the attention's residual is `tokens` itself."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, addend: torch.Tensor | None, addend_bias: torch.Tensor | None, scale: torch.Tensor | float,
                attention_norm_weight: torch.Tensor, attention_norm_bias: torch.Tensor, qkv_weight: torch.Tensor,
                qkv_bias: torch.Tensor | None, projection_weight: torch.Tensor, projection_bias: torch.Tensor,
                mlp_norm_weight: torch.Tensor, mlp_norm_bias: torch.Tensor, first_weight: torch.Tensor, first_bias: torch.Tensor,
                last_weight: torch.Tensor, last_bias: torch.Tensor | None, layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
        batch, count, width = tokens.shape  # (B, T, D) fp32
        profiling = profiler_running()
        ctx.set_materialize_grads(False)  # an output that reaches no loss gets None: its layers then get no gradient, as unfused
        ctx.has_addend, ctx.has_qkv_bias, ctx.has_last_bias = addend is not None, qkv_bias is not None, last_bias is not None
        # a profiler names the parts, which only the Python path shows
        ctx.one_call = (not profiling and not _in_python.is_on()
                        and block_kernel.layers_fit(width, layout.heads, qkv_weight, projection_weight, first_weight, last_weight)
                        and block_kernel.sizes_supported(batch * count, width, first_weight.shape[0], loaded_library()))
        if ctx.one_call:
            return forward_in_one_call(ctx, tokens, addend, addend_bias, scale, attention_norm_weight, attention_norm_bias, qkv_weight,
                                       qkv_bias, projection_weight, projection_bias, mlp_norm_weight, mlp_norm_bias, first_weight,
                                       first_bias, last_weight, last_bias, layout)
        stream, normalised, attention_mean, attention_rstd = first_norm_forward(
            tokens, addend, addend_bias, attention_norm_weight, attention_norm_bias, layout.attention_eps, profiling)  # bf16
        with part("KernelLinear", profiling):
            qkv, qkv_saved = linear_forward(normalised, qkv_weight, qkv_bias, input_gradient=True)  # (B, T, 3D) bf16
        with part("KernelSelfAttention", profiling):
            mixed, attention_saved = kernel_attention_forward(qkv.view(batch, count, 3, layout.heads, -1), scale, layout.mask_self,
                                                              keep_weights=True, dropout=layout.attention_dropout)  # (B, T, H, Dh)
        with part("KernelLinear", profiling):
            projected, projection_saved = linear_forward(mixed.view(batch, count, width), projection_weight, None, input_gradient=True)
        with part("KernelResidualNorm", profiling):
            after_attention, mlp_input, mlp_mean, mlp_rstd = layer_norm_kernel.residual_layer_norm_forward(
                stream, projected, projection_bias, mlp_norm_weight, mlp_norm_bias, layout.mlp_eps)  # (B, T, D) fp32, bf16
        out, first_saved, slope, last_saved = mlp_forward(mlp_input, first_weight, first_bias, last_weight, last_bias, profiling)
        ctx.save_for_backward(tokens if addend is None else None, stream, attention_norm_weight, attention_mean, attention_rstd,
                              qkv_saved.x, qkv_saved.weight, attention_saved.qkv, attention_saved.out, attention_saved.weights,
                              attention_saved.scales,
                              projection_saved.x, projection_saved.weight, after_attention, mlp_norm_weight, mlp_mean, mlp_rstd,
                              first_saved.x, first_saved.weight, slope, last_saved.x, last_saved.weight)
        ctx.packed = (qkv_saved.packed, projection_saved.packed, first_saved.packed, last_saved.packed)
        ctx.attention = (attention_saved.dropout, attention_saved.scale_shape, attention_saved.scale_dtype)
        return after_attention, out

    @staticmethod
    def backward(ctx, grad_after_attention: torch.Tensor | None, grad_out: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        refuse_double_backward()
        saved, needs = ctx.saved_tensors, ctx.needs_input_grad
        # in one call where the forward made one and every gradient it computes is wanted (a frozen layer: Python)
        if ctx.one_call and grad_out is not None and all(needs[index] for index in (0, 6, 8, 12, 14)) and not profiler_running():
            return backward_in_one_call(ctx, saved, grad_after_attention, grad_out)
        (tokens, stream, attention_norm_weight, attention_mean, attention_rstd, normalised, qkv_pairs, qkv, mixed, weights, scales,
         projection_input, projection_pairs, after_attention, mlp_norm_weight, mlp_mean, mlp_rstd, mlp_input, first_pairs, slope,
         activated, last_pairs) = saved
        qkv_packed, projection_packed, first_packed, last_packed = ctx.packed
        batch, count, width = after_attention.shape
        profiling = profiler_running()
        grad_first_weight = grad_first_bias = grad_last_weight = grad_last_bias = None
        if grad_out is None:  # the MLP's output reached no loss: its layers get no gradient, its norm a zero one
            grad_mlp_input = torch.zeros(batch, count, width, dtype=torch.bfloat16)
        else:
            grad_mlp_input, grad_first_weight, grad_first_bias, grad_last_weight, grad_last_bias = mlp_backward(
                grad_out, SavedLinear(mlp_input, first_pairs, first_packed, False), slope,
                SavedLinear(activated, last_pairs, last_packed, ctx.has_last_bias), needs[12:16], profiling)
        with part("KernelResidualNormBackward", profiling):
            grad_stream, grad_projected, grad_mlp_norm_weight, grad_mlp_norm_bias, grad_projection_bias = (
                layer_norm_kernel.residual_layer_norm_backward(grad_mlp_input, after_attention, mlp_norm_weight, mlp_mean, mlp_rstd,
                                                               grad_after_attention, needs[9]))
        del grad_mlp_input
        with part("KernelLinearBackward", profiling):
            grad_mixed, grad_projection_weight, _ = linear_backward(
                SavedLinear(projection_input, projection_pairs, projection_packed, False), grad_projected, True, needs[8], False)
        del grad_projected
        with part("KernelSelfAttentionBackward", profiling):
            attention_saved = SavedAttention(qkv, mixed, weights, scales, *ctx.attention)
            grad_qkv, grad_scale = kernel_attention_backward(attention_saved, grad_mixed.view(mixed.shape), needs[3])
        del grad_mixed
        with part("KernelLinearBackward", profiling):
            grad_normalised, grad_qkv_weight, grad_qkv_bias = linear_backward(
                SavedLinear(normalised, qkv_pairs, qkv_packed, ctx.has_qkv_bias), grad_qkv.view(batch, count, -1), True, needs[6],
                needs[7])
        del grad_qkv
        grad_tokens, grad_addend, grad_addend_bias, grad_attention_norm_weight, grad_attention_norm_bias = first_norm_backward(
            grad_normalised, grad_stream, tokens, stream, attention_norm_weight, attention_mean, attention_rstd, ctx.has_addend,
            needs[0], needs[2], profiling)
        return (grad_tokens, grad_addend, grad_addend_bias, grad_scale, grad_attention_norm_weight, grad_attention_norm_bias,
                grad_qkv_weight, grad_qkv_bias, grad_projection_weight, grad_projection_bias, grad_mlp_norm_weight, grad_mlp_norm_bias,
                grad_first_weight, grad_first_bias, grad_last_weight, grad_last_bias, None)


def forward_in_one_call(ctx, tokens: torch.Tensor, addend: torch.Tensor | None, addend_bias: torch.Tensor | None,
                        scale: torch.Tensor | float, attention_norm_weight: torch.Tensor, attention_norm_bias: torch.Tensor,
                        qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None, projection_weight: torch.Tensor,
                        projection_bias: torch.Tensor, mlp_norm_weight: torch.Tensor, mlp_norm_bias: torch.Tensor,
                        first_weight: torch.Tensor, first_bias: torch.Tensor, last_weight: torch.Tensor, last_bias: torch.Tensor | None,
                        layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockOnKernels.forward in one call into C (kernels/block.c): the same kernels on the same inputs, keeping the same
    tensors for backward (which either path can then take)."""
    batch, count, width = tokens.shape
    hidden, heads, rows = first_weight.shape[0], layout.heads, batch * count
    bf16 = torch.bfloat16
    # every tensor the C side reads, contiguous and kept alive here until it returns
    tokens = tokens.contiguous()
    addend = None if addend is None else addend.contiguous()
    inputs = [None if tensor is None else tensor.detach().contiguous() for tensor in (
        addend_bias, attention_norm_weight, attention_norm_bias, mlp_norm_weight, mlp_norm_bias, qkv_weight, qkv_bias,
        projection_weight, projection_bias, first_weight, first_bias, last_weight, last_bias)]
    (addend_bias, attention_norm_weight, attention_norm_bias, mlp_norm_weight, mlp_norm_bias, qkv_weight, qkv_bias, projection_weight,
     projection_bias, first_weight, first_bias, last_weight, last_bias) = inputs
    scales = per_head_scales(scale, heads).contiguous()  # (H,)
    drop = kernel_attention_dropout(layout.attention_dropout, tokens.device)
    # the backward pairs of each layer's weight (outs / 2, ins), kept for the input gradients
    qkv_pairs, projection_pairs, first_pairs, last_pairs = (torch.empty(outs // 2, ins, dtype=torch.int32) for outs, ins in (
        (3 * width, width), (width, width), (hidden, width), (width, hidden)))
    stream = None if addend is None else torch.empty(batch, count, width)  # fp32
    normalised, mixed_rows = torch.empty(batch, count, width, dtype=bf16), torch.empty(batch, count, width, dtype=bf16)
    qkv = torch.empty(batch, count, 3, heads, width // heads, dtype=bf16)
    weights = weight_buffers.take((batch, heads, count, padded_tokens(count)))  # (B, H, T, P) bf16
    after_attention, mlp_input = torch.empty(batch, count, width), torch.empty(batch, count, width, dtype=bf16)
    activated, slope = torch.empty(batch, count, hidden, dtype=bf16), torch.empty(batch, count, hidden, dtype=bf16)
    out = torch.empty(batch, count, width, dtype=bf16)
    attention_mean, attention_rstd, mlp_mean, mlp_rstd = (torch.empty(rows) for _ in range(4))
    sizes = block_kernel.BlockSizes(batch, count, width, heads, hidden, layout.attention_eps, layout.mlp_eps, int(layout.mask_self),
                                    *dropout_arguments(drop), torch.get_num_threads())
    block = block_kernel.BlockForward(
        pointer(tokens), pointer(addend), pointer(addend_bias), pointer(scales), pointer(attention_norm_weight),
        pointer(attention_norm_bias), pointer(mlp_norm_weight), pointer(mlp_norm_bias),
        *(block_kernel.LinearWeights(pointer(weight), pointer(bias), pointer(pairs)) for weight, bias, pairs in (
            (qkv_weight, qkv_bias, qkv_pairs), (projection_weight, projection_bias, projection_pairs), (first_weight, first_bias, first_pairs),
            (last_weight, last_bias, last_pairs))),
        pointer(stream), pointer(normalised), pointer(attention_mean), pointer(attention_rstd), pointer(qkv), pointer(mixed_rows),
        pointer(weights), pointer(after_attention), pointer(mlp_input), pointer(mlp_mean), pointer(mlp_rstd), pointer(activated),
        pointer(slope), pointer(out))
    block_kernel.run_forward(sizes, block)
    mixed = mixed_rows.view(batch, count, heads, width // heads)  # (B, T, H, Dh), as the attention kernel's output
    ctx.save_for_backward(tokens if addend is None else None, stream if addend is not None else tokens, attention_norm_weight,
                          attention_mean, attention_rstd, normalised, qkv_pairs, qkv, mixed, weights[..., :count], scales,
                          mixed_rows, projection_pairs, after_attention, mlp_norm_weight, mlp_mean, mlp_rstd, mlp_input, first_pairs,
                          slope, activated, last_pairs)
    ctx.packed = (True, True, True, True)
    ctx.attention = (drop, scale.shape if isinstance(scale, torch.Tensor) else None,
                     scale.dtype if isinstance(scale, torch.Tensor) else None)
    return after_attention, out


@dataclass(frozen=True)
class BlockGradients:
    """A block's gradients, allocated for block.c to write (its backward structures end with them, in this order); None
    where there is no such input or none is wanted."""

    tokens: torch.Tensor  # (B, T, D) fp32
    addend: torch.Tensor | None  # (B, T, D) bf16
    addend_bias: torch.Tensor | None
    attention_norm_weight: torch.Tensor
    attention_norm_bias: torch.Tensor
    mlp_norm_weight: torch.Tensor
    mlp_norm_bias: torch.Tensor
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    projection_weight: torch.Tensor
    projection_bias: torch.Tensor | None
    first_weight: torch.Tensor
    first_bias: torch.Tensor | None
    last_weight: torch.Tensor
    last_bias: torch.Tensor | None
    scale_sums: torch.Tensor  # (B, H): each image's share of each head's scale gradient

    @classmethod
    def allocate(cls, ctx, batch: int, count: int, width: int, hidden: int, heads: int, has_projection_bias: bool) -> BlockGradients:
        needs, vector = ctx.needs_input_grad, torch.empty
        return cls(torch.empty(batch, count, width), torch.empty(batch, count, width, dtype=torch.bfloat16) if ctx.has_addend else None,
                   vector(width) if ctx.has_addend and needs[2] else None, vector(width), vector(width), vector(width), vector(width),
                   torch.empty(3 * width, width), vector(3 * width) if ctx.has_qkv_bias and needs[7] else None,
                   torch.empty(width, width), vector(width) if has_projection_bias and needs[9] else None,
                   torch.empty(hidden, width), vector(hidden) if needs[13] else None,
                   torch.empty(width, hidden), vector(width) if ctx.has_last_bias and needs[15] else None, torch.empty(batch, heads))

    def pointers(self) -> list[int | None]:
        return [pointer(getattr(self, field.name)) for field in fields(self)]

    def for_autograd(self, scale_wanted: bool, scale_shape: torch.Size | None, scale_dtype: torch.dtype | None) -> tuple[torch.Tensor | None, ...]:
        """The block Functions' gradients, in their inputs' order: the scale's from its sums where it is a tensor (of
        `scale_shape`; None for a float) whose gradient is wanted."""
        grad_scale = scale_gradient(self.scale_sums, scale_shape, scale_dtype) if scale_shape is not None and scale_wanted else None
        return (self.tokens, self.addend, self.addend_bias, grad_scale, self.attention_norm_weight, self.attention_norm_bias,
                self.qkv_weight, self.qkv_bias, self.projection_weight, self.projection_bias, self.mlp_norm_weight, self.mlp_norm_bias,
                self.first_weight, self.first_bias, self.last_weight, self.last_bias, None)


def backward_in_one_call(ctx, saved: tuple[torch.Tensor | None, ...], grad_after_attention: torch.Tensor | None,
                         grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """BlockOnKernels.backward in one call into C (kernels/block.c), every weight's gradient wanted."""
    (tokens, stream, attention_norm_weight, attention_mean, attention_rstd, normalised, qkv_pairs, qkv, mixed, weights, scales,
     projection_input, projection_pairs, after_attention, mlp_norm_weight, mlp_mean, mlp_rstd, mlp_input, first_pairs, slope,
     activated, last_pairs) = saved
    batch, count, width = after_attention.shape
    hidden, heads = slope.shape[-1], qkv.shape[3]
    grad_out = grad_out.to(torch.bfloat16).contiguous()
    grad_after_attention = None if grad_after_attention is None else grad_after_attention.to(torch.float32).contiguous()
    gradients = BlockGradients.allocate(ctx, batch, count, width, hidden, heads, has_projection_bias=True)
    sizes = block_kernel.BlockSizes(batch, count, width, heads, hidden, 0.0, 0.0, 0, *dropout_arguments(ctx.attention[0]),
                                    torch.get_num_threads())
    block = block_kernel.BlockBackward(*(pointer(tensor) for tensor in (
        tokens if not ctx.has_addend else None, stream if ctx.has_addend else None, normalised, qkv, mixed, weights, mlp_input,
        activated, slope, attention_norm_weight, attention_mean, attention_rstd, mlp_norm_weight, mlp_mean, mlp_rstd, after_attention,
        scales, qkv_pairs, projection_pairs, first_pairs, last_pairs, grad_after_attention, grad_out)), *gradients.pointers())
    block_kernel.run_backward(sizes, block)
    return gradients.for_autograd(ctx.needs_input_grad[3], *ctx.attention[1:])


class FirstTokenBlockOnKernels(torch.autograd.Function):
    """The last block under CLS pooling, computing the first token alone (Block.first_token) on the kernels: (its output
    (B, 1, D) fp32). The first norm runs over every token (with `addend` (+ `addend_bias`) added first when given); the
    first token's query attends to every token's key and value (the single-query kernel); the rest acts on that token."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, addend: torch.Tensor | None, addend_bias: torch.Tensor | None, scale: torch.Tensor | float,
                attention_norm_weight: torch.Tensor, attention_norm_bias: torch.Tensor, qkv_weight: torch.Tensor,
                qkv_bias: torch.Tensor | None, projection_weight: torch.Tensor, projection_bias: torch.Tensor | None,
                mlp_norm_weight: torch.Tensor, mlp_norm_bias: torch.Tensor, first_weight: torch.Tensor, first_bias: torch.Tensor,
                last_weight: torch.Tensor, last_bias: torch.Tensor | None, layout: BlockLayout) -> torch.Tensor:
        batch, count, width = tokens.shape  # (B, T, D) fp32
        profiling = profiler_running()
        ctx.has_addend, ctx.has_qkv_bias = addend is not None, qkv_bias is not None
        ctx.has_projection_bias, ctx.has_last_bias = projection_bias is not None, last_bias is not None
        ctx.heads = layout.heads
        ctx.scale_shape, ctx.scale_dtype = (scale.shape, scale.dtype) if isinstance(scale, torch.Tensor) else (None, None)
        ctx.one_call = (not profiling and not _in_python.is_on()
                        and block_kernel.layers_fit(width, layout.heads, qkv_weight, projection_weight, first_weight, last_weight)
                        and block_kernel.first_token_sizes_supported(batch, count, width, first_weight.shape[0], loaded_library()))
        if ctx.one_call:
            return first_token_forward_in_one_call(ctx, tokens, addend, addend_bias, scale, attention_norm_weight, attention_norm_bias,
                                                   qkv_weight, qkv_bias, projection_weight, projection_bias, mlp_norm_weight,
                                                   mlp_norm_bias, first_weight, first_bias, last_weight, last_bias, layout)
        stream, normalised, attention_mean, attention_rstd = first_norm_forward(
            tokens, addend, addend_bias, attention_norm_weight, attention_norm_bias, layout.attention_eps, profiling)  # bf16
        query_bias, key_value_bias = (None, None) if qkv_bias is None else (qkv_bias[:width], qkv_bias[width:])
        with part("KernelLinear", profiling):
            query, query_saved = linear_forward(normalised[:, 0].contiguous(), qkv_weight[:width], query_bias, input_gradient=True)
            key_value, key_value_saved = linear_forward(normalised, qkv_weight[width:], key_value_bias, input_gradient=True)
        with part("KernelSingleQueryAttention", profiling):
            scales = per_head_scales(scale, layout.heads)
            mixed, weights = single_query_kernel.single_query_forward(query, key_value, scales, layout.heads, layout.mask_self)  # (B, D)
        with part("KernelLinear", profiling):
            projected, projection_saved = linear_forward(mixed.view(batch, 1, width), projection_weight, projection_bias, True)
        first = stream[:, :1] + projected  # (B, 1, D) fp32
        with part("KernelLayerNorm", profiling):
            mlp_input, mlp_mean, mlp_rstd = layer_norm_kernel.layer_norm_forward(first, mlp_norm_weight, mlp_norm_bias, layout.mlp_eps)
        out, first_saved, slope, last_saved = mlp_forward(mlp_input, first_weight, first_bias, last_weight, last_bias, profiling)
        ctx.save_for_backward(tokens if addend is None else None, stream, attention_norm_weight, attention_mean, attention_rstd,
                              query_saved.x, query_saved.weight,
                              normalised, key_value_saved.weight, query, key_value, scales, weights, projection_saved.x,
                              projection_saved.weight, first, mlp_norm_weight, mlp_mean, mlp_rstd, mlp_input, first_saved.weight,
                              slope, last_saved.x, last_saved.weight)
        ctx.packed = (query_saved.packed, key_value_saved.packed, projection_saved.packed, first_saved.packed, last_saved.packed)
        return first + out

    @staticmethod
    def backward(ctx, grad_result: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        refuse_double_backward()
        saved, needs = ctx.saved_tensors, ctx.needs_input_grad
        if ctx.one_call and all(needs[index] for index in (0, 6, 8, 12, 14)) and not profiler_running():
            return first_token_backward_in_one_call(ctx, saved, grad_result)
        (tokens, stream, attention_norm_weight, attention_mean, attention_rstd, query_input, query_pairs, normalised, key_value_pairs,
         query, key_value, scales, weights, projection_input, projection_pairs, first, mlp_norm_weight, mlp_mean, mlp_rstd, mlp_input,
         first_pairs, slope, activated, last_pairs) = saved
        query_packed, key_value_packed, projection_packed, first_packed, last_packed = ctx.packed
        batch, count, width = normalised.shape
        profiling = profiler_running()
        grad_mlp_input, grad_first_weight, grad_first_bias, grad_last_weight, grad_last_bias = mlp_backward(
            grad_result.to(torch.bfloat16), SavedLinear(mlp_input, first_pairs, first_packed, False), slope,
            SavedLinear(activated, last_pairs, last_packed, ctx.has_last_bias), needs[12:16], profiling)
        with part("KernelLayerNormBackward", profiling):
            grad_first, grad_mlp_norm_weight, grad_mlp_norm_bias = layer_norm_kernel.layer_norm_backward(
                grad_mlp_input, first, mlp_norm_weight, mlp_mean, mlp_rstd)
        grad_first = grad_result + grad_first  # the first token reaches the output and the norm (autograd adds the two)
        with part("KernelLinearBackward", profiling):
            grad_mixed, grad_projection_weight, grad_projection_bias = linear_backward(
                SavedLinear(projection_input, projection_pairs, projection_packed, ctx.has_projection_bias),
                grad_first.to(torch.bfloat16), True, needs[8], needs[9])
        with part("KernelSingleQueryAttentionBackward", profiling):
            grad_query, grad_key_value, grad_scale_sums = single_query_kernel.single_query_backward(
                query, key_value, scales, weights, grad_mixed.view(batch, width), ctx.heads)
            grad_scale = None
            if ctx.scale_shape is not None and needs[3]:
                grad_scale = scale_gradient(grad_scale_sums, ctx.scale_shape, ctx.scale_dtype)
        with part("KernelLinearBackward", profiling):
            grad_query_input, grad_query_weight, grad_query_bias = linear_backward(
                SavedLinear(query_input, query_pairs, query_packed, ctx.has_qkv_bias), grad_query, True, needs[6], needs[7])
            grad_normalised, grad_key_value_weight, grad_key_value_bias = linear_backward(
                SavedLinear(normalised, key_value_pairs, key_value_packed, ctx.has_qkv_bias), grad_key_value, True, needs[6], needs[7])
        grad_normalised[:, 0] += grad_query_input  # the first token's row also made the query (autograd adds the two)
        grad_stream = torch.zeros_like(stream)
        grad_stream[:, :1] = grad_first  # only the first token's stream reached the output
        grad_tokens, grad_addend, grad_addend_bias, grad_attention_norm_weight, grad_attention_norm_bias = first_norm_backward(
            grad_normalised, grad_stream, tokens, stream, attention_norm_weight, attention_mean, attention_rstd, ctx.has_addend,
            needs[0], needs[2], profiling)
        grad_qkv_weight = torch.cat([grad_query_weight, grad_key_value_weight]) if needs[6] else None
        grad_qkv_bias = torch.cat([grad_query_bias, grad_key_value_bias]) if needs[7] and ctx.has_qkv_bias else None
        return (grad_tokens, grad_addend, grad_addend_bias, grad_scale, grad_attention_norm_weight, grad_attention_norm_bias,
                grad_qkv_weight, grad_qkv_bias, grad_projection_weight, grad_projection_bias, grad_mlp_norm_weight, grad_mlp_norm_bias,
                grad_first_weight, grad_first_bias, grad_last_weight, grad_last_bias, None)


def first_token_forward_in_one_call(ctx, tokens: torch.Tensor, addend: torch.Tensor | None, addend_bias: torch.Tensor | None,
                                    scale: torch.Tensor | float, attention_norm_weight: torch.Tensor, attention_norm_bias: torch.Tensor,
                                    qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None, projection_weight: torch.Tensor,
                                    projection_bias: torch.Tensor | None, mlp_norm_weight: torch.Tensor, mlp_norm_bias: torch.Tensor,
                                    first_weight: torch.Tensor, first_bias: torch.Tensor, last_weight: torch.Tensor,
                                    last_bias: torch.Tensor | None, layout: BlockLayout) -> torch.Tensor:
    """FirstTokenBlockOnKernels.forward in one call into C (kernels/block.c), keeping what its Python path keeps."""
    batch, count, width = tokens.shape
    hidden, heads, rows = first_weight.shape[0], layout.heads, batch * count
    bf16 = torch.bfloat16
    tokens = tokens.contiguous()
    addend = None if addend is None else addend.contiguous()
    (addend_bias, attention_norm_weight, attention_norm_bias, mlp_norm_weight, mlp_norm_bias, qkv_weight, qkv_bias, projection_weight,
     projection_bias, first_weight, first_bias, last_weight, last_bias) = (None if tensor is None else tensor.detach().contiguous() for tensor in (
        addend_bias, attention_norm_weight, attention_norm_bias, mlp_norm_weight, mlp_norm_bias, qkv_weight, qkv_bias, projection_weight,
        projection_bias, first_weight, first_bias, last_weight, last_bias))
    scales = per_head_scales(scale, heads).contiguous()  # (H,)
    query_pairs, key_value_pairs, projection_pairs, first_pairs, last_pairs = (torch.empty(outs // 2, ins, dtype=torch.int32) for outs, ins in (
        (width, width), (2 * width, width), (width, width), (hidden, width), (width, hidden)))
    stream = None if addend is None else torch.empty(batch, count, width)  # fp32
    normalised, key_value = torch.empty(batch, count, width, dtype=bf16), torch.empty(batch, count, 2 * width, dtype=bf16)
    query_input, query, mixed = (torch.empty(batch, width, dtype=bf16) for _ in range(3))
    weights = torch.empty(batch, heads, count)  # fp32
    first, result = torch.empty(batch, 1, width), torch.empty(batch, 1, width)  # fp32
    mlp_input = torch.empty(batch, 1, width, dtype=bf16)
    activated, slope = torch.empty(batch, 1, hidden, dtype=bf16), torch.empty(batch, 1, hidden, dtype=bf16)
    attention_mean, attention_rstd, mlp_mean, mlp_rstd = torch.empty(rows), torch.empty(rows), torch.empty(batch), torch.empty(batch)
    sizes = block_kernel.BlockSizes(batch, count, width, heads, hidden, layout.attention_eps, layout.mlp_eps, int(layout.mask_self), 0, 1.0,
                                    0, torch.get_num_threads())
    query_bias, key_value_bias = (None, None) if qkv_bias is None else (qkv_bias[:width], qkv_bias[width:])
    block = block_kernel.FirstTokenForward(
        pointer(tokens), pointer(addend), pointer(addend_bias), pointer(scales), pointer(attention_norm_weight),
        pointer(attention_norm_bias), pointer(mlp_norm_weight), pointer(mlp_norm_bias),
        *(block_kernel.LinearWeights(pointer(weight), pointer(bias), pointer(pairs)) for weight, bias, pairs in (
            (qkv_weight[:width], query_bias, query_pairs), (qkv_weight[width:], key_value_bias, key_value_pairs),
            (projection_weight, projection_bias, projection_pairs), (first_weight, first_bias, first_pairs),
            (last_weight, last_bias, last_pairs))),
        pointer(stream), pointer(normalised), pointer(attention_mean), pointer(attention_rstd), pointer(query_input), pointer(query),
        pointer(key_value), pointer(mixed), pointer(weights), pointer(first), pointer(mlp_input), pointer(mlp_mean), pointer(mlp_rstd),
        pointer(activated), pointer(slope), pointer(result))
    block_kernel.run_first_token_forward(sizes, block)
    ctx.save_for_backward(tokens if addend is None else None, stream if addend is not None else tokens, attention_norm_weight,
                          attention_mean, attention_rstd, query_input, query_pairs, normalised, key_value_pairs, query, key_value,
                          scales, weights, mixed.view(batch, 1, width), projection_pairs, first, mlp_norm_weight, mlp_mean, mlp_rstd,
                          mlp_input, first_pairs, slope, activated, last_pairs)
    ctx.packed = (True,) * 5
    return result


def first_token_backward_in_one_call(ctx, saved: tuple[torch.Tensor | None, ...],
                                     grad_result: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """FirstTokenBlockOnKernels.backward in one call into C (kernels/block.c), every weight's gradient wanted."""
    (tokens, stream, attention_norm_weight, attention_mean, attention_rstd, query_input, query_pairs, normalised, key_value_pairs,
     query, key_value, scales, weights, projection_input, projection_pairs, first, mlp_norm_weight, mlp_mean, mlp_rstd, mlp_input,
     first_pairs, slope, activated, last_pairs) = saved
    batch, count, width = normalised.shape
    hidden, heads = slope.shape[-1], ctx.heads
    grad_result = grad_result.to(torch.float32).contiguous()
    gradients = BlockGradients.allocate(ctx, batch, count, width, hidden, heads, ctx.has_projection_bias)
    sizes = block_kernel.BlockSizes(batch, count, width, heads, hidden, 0.0, 0.0, 0, 0, 1.0, 0, torch.get_num_threads())
    block = block_kernel.FirstTokenBackward(*(pointer(tensor) for tensor in (
        tokens if not ctx.has_addend else None, stream if ctx.has_addend else None, query_input, normalised, query, key_value,
        projection_input, mlp_input, activated, slope, weights, first, scales, attention_norm_weight, attention_mean, attention_rstd,
        mlp_norm_weight, mlp_mean, mlp_rstd, query_pairs, key_value_pairs, projection_pairs, first_pairs, last_pairs, grad_result)),
        *gradients.pointers())
    block_kernel.run_first_token_backward(sizes, block)
    return gradients.for_autograd(ctx.needs_input_grad[3], ctx.scale_shape, ctx.scale_dtype)
