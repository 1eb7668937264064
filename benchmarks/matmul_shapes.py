"""bf16 TFLOP/s of the ViTs' own matmul shapes against a 2048³ matmul, at one thread count, on the CPU.

Shows how close a whole training step could come to the matmul peak if nothing but matmuls took time:
a width-64 ViT's matmuls have an inner dimension of 64 or 256 and cannot run at the 2048³ rate.

Usage: python benchmarks/matmul_shapes.py [--threads 2]. Time it alone; the figures are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import time

import torch

# name: (M, K, N) of an (M×K) @ (K×N) product; 8,320 = 128 images × 65 tokens.
SHAPES = {
    "2048³ (the peak's definition)": (2048, 2048, 2048),
    "width 64, qkv forward": (8320, 64, 192),
    "width 64, MLP in forward": (8320, 64, 256),
    "width 64, MLP out forward": (8320, 256, 64),
    "width 64, qkv weight gradient": (192, 8320, 64),
    "width 128, qkv forward": (8320, 128, 384),
    "width 128, MLP in forward": (8320, 128, 512),
    "width 128, MLP out forward": (8320, 512, 128),
}


def tflop_s(m: int, k: int, n: int, repeats: int = 10, rounds: int = 5) -> float:
    """Best of `rounds` rates over `repeats` products, in TFLOP/s."""
    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, repeats * 2 * m * k * n / (time.perf_counter() - start))
    return best / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rates = {name: tflop_s(*shape) for name, shape in SHAPES.items()}
    peak = next(iter(rates.values()))
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| product | M × K × N | TFLOP/s | share of 2048³ |")
    print("| --- | --- | ---: | ---: |")
    for name, rate in rates.items():
        print(f"| {name} | {' × '.join(map(str, SHAPES[name]))} | {rate:.3f} | {100 * rate / peak:.0f}% |")


if __name__ == "__main__":
    main()
