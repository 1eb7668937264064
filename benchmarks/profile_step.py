"""Where vitlab's training step spends its time, for one benchmark configuration (data path included).

Usage: python benchmarks/profile_step.py CONFIG [--steps 20] [--dropout P] [--rows 25]
Prints ms per step and torch.profiler's table of operators by self CPU time.
"""

from __future__ import annotations

import argparse
import time

import bench
import torch
from torch.profiler import profile

from vitlab.config import TrainConfig
from vitlab.data import load_cifar10, locate_cifar10
from vitlab.errors import run_script
from vitlab.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", choices=sorted(bench.CONFIGS))
    parser.add_argument("--steps", type=int, default=20, help="steps timed, then the same number profiled")
    parser.add_argument("--dropout", type=float, default=None, help="a ViT's dropout (as bench.py --vit-dropout)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    model_name, model_config = bench.CONFIGS[args.config]
    model_config = bench.with_dropout(model_name, model_config, args.dropout)
    data = load_cifar10(str(locate_cifar10(args.data_dir, download_if_missing=False).parent))
    torch.manual_seed(0)
    config = TrainConfig(batch_size=args.batch_size, device="cpu", progress=False)
    runner, step = bench.vitlab_step(build_model(model_name, **model_config), data, config)

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    print(f"{args.config} ({runner.precision}): {seconds * 1e3:.2f} ms per step, {args.batch_size / seconds:,.0f} img/s")
    with profile() as profiler:
        for _ in range(args.steps):
            step()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    run_script(main)
