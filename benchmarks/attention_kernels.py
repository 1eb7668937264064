"""Forward + backward time of one attention call on the CPU: PyTorch's fused kernel (upcast to fp32, vitlab's
choice for long sequences) against the softmax written out in bf16 (its choice up to
`vitlab.models.layers.CPU_EXPLICIT_MAX_TOKENS` tokens), at the shapes of vitlab's ViTs.

Usage: python benchmarks/attention_kernels.py [--threads 2] [--shapes 128,4,65,16 128,4,257,16 ...]
(each shape is batch,heads,tokens,head_size). Time it alone on the machine; the figures are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vitlab.errors import run_script
from vitlab.models.layers import CPU_EXPLICIT_MAX_TOKENS

DEFAULT_SHAPES = ["128,4,65,16", "128,4,64,32", "128,8,65,16", "128,4,101,16", "128,4,129,16", "128,4,145,32", "128,4,257,16"]


def fused_in_fp32(query, key, value):
    return F.scaled_dot_product_attention(query.float(), key.float(), value.float()).to(query.dtype)


def explicit(query, key, value):
    scores = (query * query.shape[-1] ** -0.5) @ key.transpose(-2, -1)  # (B, H, T, T)
    return scores.softmax(dim=-1) @ value  # (B, H, T, Dh)


def forward_backward_ms(kernel, shape: tuple[int, ...], repeats: int = 5, rounds: int = 3) -> float:
    """Best of `rounds` averages over `repeats` calls of forward + backward, in milliseconds."""
    query, key, value = (torch.randn(shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    upstream = torch.randn(shape, dtype=torch.bfloat16)
    for _ in range(3):
        kernel(query, key, value).backward(upstream)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            kernel(query, key, value).backward(upstream)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="batch,heads,tokens,head_size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; vitlab writes attention out up to {CPU_EXPLICIT_MAX_TOKENS} tokens")
    print("| B, H, T, Dh | fused, fp32 (ms) | explicit, bf16 (ms) | fused / explicit |")
    print("| --- | ---: | ---: | ---: |")
    for text in args.shapes:
        shape = tuple(int(part) for part in text.split(","))
        fused, written_out = forward_backward_ms(fused_in_fp32, shape), forward_backward_ms(explicit, shape)
        print(f"| {text} | {fused:.2f} | {written_out:.2f} | {fused / written_out:.2f}× |", flush=True)


if __name__ == "__main__":
    run_script(main)
