"""A linear layer's weight and bias gradients: vitlab's kernel against PyTorch's way under CPU bf16 autocast, alone.

PyTorch's way is what autocast's backward computes: the bf16 matmul of the output gradient's transpose (a view) with
the input, cast to fp32, and the bias gradient as a separate fp32 sum. The kernel is `kernels/weight_gradient.c`
(on the AMX tiles where the CPU has them, else `vdpbf16ps`); shapes it does not take on this machine are marked.
Both sides alternate in rounds and the best round of each is reported, so the machine's slow spells hit both.

Usage: python benchmarks/weight_gradient_shapes.py [--rows 8320] [--threads 2] [--rounds 5]. Time it alone; the
figures are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from vitlab.kernels import weight_gradient as weight_gradient_kernel

# (out, in) of the layers: width 64 (vit-seed001/000, vit-pure) and 128 (vit-seed002), then wider ones
LAYERS = [(192, 64), (64, 64), (256, 64), (64, 256), (384, 128), (128, 128), (512, 128), (128, 512),
          (512, 512), (1024, 256), (256, 1024), (768, 768), (3072, 768)]


def best_ms(run, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8320, help="token rows of a batch (8,320: 128 images × 65 tokens)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.rows:,} rows")
    print("| out × in | PyTorch (ms) | kernel (ms) | kernel TFLOP/s | PyTorch / kernel |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for outs, ins in LAYERS:
        grad_out = torch.randn(args.rows, outs).to(torch.bfloat16)
        x = torch.randn(args.rows, ins).to(torch.bfloat16)
        flops = 2 * args.rows * outs * ins
        repeats = max(1, int(2e9 / flops))

        def pytorch(grad_out=grad_out, x=x):
            return (grad_out.t() @ x).float(), grad_out.sum(0, dtype=torch.float32)

        def kernel(grad_out=grad_out, x=x):
            return weight_gradient_kernel.weight_gradient(grad_out, x, bias_gradient=True)

        takes = weight_gradient_kernel.kernel_supports(ins, outs, True)
        pytorch_ms, kernel_ms = [], []
        for _ in range(args.rounds):
            pytorch_ms.append(best_ms(pytorch, repeats))
            if takes:
                kernel_ms.append(best_ms(kernel, repeats))
        if takes:
            print(f"| {outs} × {ins} | {min(pytorch_ms):.3f} | {min(kernel_ms):.3f} | "
                  f"{flops / min(kernel_ms) / 1e9:.3f} | {min(pytorch_ms) / min(kernel_ms):.2f} |")
        else:
            print(f"| {outs} × {ins} | {min(pytorch_ms):.3f} | not taken here | | |")


if __name__ == "__main__":
    main()
