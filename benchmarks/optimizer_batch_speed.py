"""Training-step speed of a model for several optimisers, batch sizes and micro-batch sizes, alternating, in one run.

    .venv/bin/python benchmarks/optimizer_batch_speed.py --model aircnn --optimizers sgd,muon,sgd,muon --batch-sizes 1000,2000
    .venv/bin/python benchmarks/optimizer_batch_speed.py --optimizers muon,muon --batch-sizes 2000 --micro-batch-sizes 0,250,500,1000

Each (optimiser, batch size, micro-batch size) builds a fresh model, takes two untimed steps, then times about
`--images` images of `Runner.train_step` (the step `vitlab train` runs) on random images, and prints img/s.
Give an optimiser twice to see the run-to-run noise; time it alone on the machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from vitlab.config import TrainConfig
from vitlab.errors import run_script
from vitlab.models import build_model
from vitlab.train.optim import make_optimizer
from vitlab.train.trainer import Runner


def images_per_second(model_name: str, optimizer: str, batch_size: int, images: int, micro_batch_size: int = 0) -> float:
    torch.manual_seed(0)
    config = TrainConfig(optimizer=optimizer, lr=0.1, batch_size=batch_size, micro_batch_size=micro_batch_size, progress=False, device="cpu")
    runner = Runner(build_model(model_name), config)
    step_optimizer = make_optimizer(runner.model, config, runner.device)
    batch = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=runner.memory_format)  # (B, 3, 32, 32)
    labels = torch.randint(0, 10, (batch_size,))
    for _ in range(2):
        runner.train_step(batch, labels, step_optimizer)
    steps = max(3, images // batch_size)
    start = time.perf_counter()
    for _ in range(steps):
        runner.train_step(batch, labels, step_optimizer)
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="aircnn")
    parser.add_argument("--optimizers", default="sgd,muon", help="comma-separated; repeat one to measure noise")
    parser.add_argument("--batch-sizes", default="1000,2000")
    parser.add_argument("--micro-batch-sizes", default="0", help="comma-separated --micro_batch_size values (0: the whole batch)")
    parser.add_argument("--images", type=int, default=6000, help="images timed per measurement")
    args = parser.parse_args()
    for optimizer in args.optimizers.split(","):
        for batch_size in (int(size) for size in args.batch_sizes.split(",")):
            for micro in (int(size) for size in args.micro_batch_sizes.split(",")):
                speed = images_per_second(args.model, optimizer, batch_size, args.images, micro)
                parts = f" in micro-batches of {micro}" if micro else ""
                print(f"{args.model} {optimizer} batch {batch_size}{parts}: {speed:.0f} img/s", flush=True)


if __name__ == "__main__":
    run_script(main)
