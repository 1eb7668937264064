"""vitlab's training speed against common practice, side by side in one run.

For each seed configuration it alternates two trainers, each for a fixed number of steps after a
warm-up, and reports images/s, the ratio, achieved model TFLOP/s (FLOPs counted with
torch.utils.flop_counter) and that as a share of this machine's bf16 matmul peak, measured in the
same run.

- reference: what the seeds do. The models as seed 002's code writes them (reference_models.py:
  explicit-softmax attention, nn.Dropout), eager fp32, torchvision DataLoader with per-image PIL
  transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize; num_workers=2 as
  in seed 002), AdamW, and seed 002's loop (loss.item() and the accuracy count every step).
- vitlab: the Runner's own training step on its device-resident uint8 data with batched
  augmentation, at the chosen precision (default: what `--precision auto` picks), SDPA attention.

Usage: python benchmarks/bench.py [--steps 30] [--rounds 2] [--configs cnn-small,vit-seed001] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
import torchvision
from reference_models import build_reference
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from vitlab.config import TrainConfig
from vitlab.data import MEAN, STD, DeviceBatches, load_cifar10, locate_cifar10
from vitlab.models import build_model
from vitlab.models.flops import train_flops_per_image
from vitlab.presets import PRESETS
from vitlab.train.trainer import Runner

CONFIGS = {
    "cnn-small": ("cnn-small", {}),
    "cnn": ("cnn", {}),
    "vit-seed001": ("vit", PRESETS["vit-seed001"].model_config),  # p4 d64 L4 h4
    "vit-seed002": ("vit", PRESETS["vit-seed002"].model_config),  # p4 d128 L6 h4, dropout 0.1
    "vit-seed000": ("vit", PRESETS["vit-seed000"].model_config),  # p2 d64 L10 h4
}


def with_dropout(model_name: str, model_config: dict, dropout: float | None) -> dict:
    """A ViT config whose dropout sits where seed 002 puts it (embeddings, attention probabilities, MLP),
    which vitlab needs `attention_dropout` for (vitlab also drops after the attention projection)."""
    if model_name != "vit":
        return model_config
    dropout = model_config.get("dropout", 0.0) if dropout is None else dropout
    return {**model_config, "dropout": dropout, "attention_dropout": dropout}


def matmul_peak(dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    """Best-of-`repeats` TFLOP/s of one square matmul on the CPU."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def reference_loader(root: str, batch_size: int) -> DataLoader:
    augment = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD),
    ])
    dataset = torchvision.datasets.CIFAR10(root=root, train=True, download=False, transform=augment)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=2, drop_last=True, persistent_workers=True)


def images_per_second(run_step, steps: int, warmup: int, synchronize=lambda: None) -> float:
    """Call `run_step()` (which trains on one batch and returns its size) warmup + steps times; time the last steps."""
    for _ in range(warmup):
        run_step()
    synchronize()
    start, seen = time.perf_counter(), 0
    for _ in range(steps):
        seen += run_step()
    synchronize()
    return seen / (time.perf_counter() - start)


def endless(batches):
    while True:
        yield from batches


def time_reference(model: nn.Module, loader: DataLoader, steps: int, warmup: int) -> float:
    """Seed 002's training loop on one of reference_models' modules."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    batches = endless(loader)
    totals = {"loss": 0.0, "correct": 0}

    def run_step() -> int:
        images, labels = next(batches)
        optimizer.zero_grad()
        outputs = model(images)
        outputs = outputs[0] if isinstance(outputs, tuple) else outputs  # a ViT returns (logits, attention)
        loss = F.cross_entropy(outputs, labels)
        loss.backward()
        optimizer.step()
        totals["loss"] += loss.item()
        totals["correct"] += outputs.max(1)[1].eq(labels).sum().item()
        return len(labels)

    return images_per_second(run_step, steps, warmup)


def vitlab_step(model: nn.Module, data, config: TrainConfig) -> tuple[Runner, callable]:
    """The Runner and a function that trains one step on the next device-resident batch (returns its size)."""
    runner = Runner(model, config)
    optimizer = runner.make_optimizer()
    batches = endless(DeviceBatches(data.train_images, data.train_labels, config.batch_size, train=True, device=runner.device,
                                    memory_format=runner.memory_format))

    def run_step() -> int:
        images, labels = next(batches)
        runner.train_step(images, labels, optimizer)
        return len(labels)

    return runner, run_step


def time_vitlab(model: nn.Module, data, config: TrainConfig, steps: int, warmup: int) -> tuple[float, str]:
    runner, run_step = vitlab_step(model, data, config)
    synchronize = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    return images_per_second(run_step, steps, warmup, synchronize), runner.precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of reference and vitlab per config")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="vitlab side with torch.compile")
    parser.add_argument("--vit-dropout", type=float, default=None,
                        help="every ViT on both sides with this dropout (seed 002's ViT class defaults to 0.1); "
                             "default: the preset's (0.1 for vit-seed002, else 0)")
    parser.add_argument("--skip-reference", action="store_true", help="time vitlab only")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()
    unknown = [name for name in args.configs.split(",") if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown config '{unknown[0]}'; choose from {', '.join(CONFIGS)}")

    root = str(locate_cifar10(args.data_dir, download_if_missing=False).parent)
    data = load_cifar10(root)
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"measured matmul peak: bf16 {peak_bf16:.3f} TFLOP/s, fp32 {peak_fp32:.3f} TFLOP/s (4096², best of 5)")
    loader = None if args.skip_reference else reference_loader(root, args.batch_size)
    config = TrainConfig(batch_size=args.batch_size, precision=args.precision, device="cpu", progress=False, compile=args.compile)
    rows = []
    for name in args.configs.split(","):
        model_name, model_config = CONFIGS[name]
        model_config = with_dropout(model_name, model_config, args.vit_dropout)
        torch.manual_seed(0)
        flops = train_flops_per_image(build_model(model_name, **model_config))
        reference, ours, precision = [], [], ""
        for _ in range(args.rounds):
            if loader is not None:
                torch.manual_seed(0)
                reference.append(time_reference(build_reference(model_name, model_config), loader, args.steps, args.warmup))
            torch.manual_seed(0)
            speed, precision = time_vitlab(build_model(model_name, **model_config), data, config, args.steps, args.warmup)
            ours.append(speed)
        row = {
            "config": name, "params": build_model(model_name, **model_config).num_parameters,
            "reference_params": sum(p.numel() for p in build_reference(model_name, model_config).parameters()),
            "dropout": model_config.get("dropout", 0.0),
            "train_mflop_per_image": flops / 1e6, "reference_img_s": max(reference) if reference else None,
            "vitlab_img_s": max(ours), "vitlab_precision": precision, "speedup": max(ours) / max(reference) if reference else None,
            "vitlab_tflop_s": max(ours) * flops / 1e12,
        }
        row["share_of_bf16_peak"] = row["vitlab_tflop_s"] / peak_bf16
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n| config | params | train MFLOP/img | reference img/s | vitlab img/s | speed-up | vitlab TFLOP/s | % of bf16 peak ({peak_bf16:.2f}) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        reference = f"{row['reference_img_s']:,.0f}" if row["reference_img_s"] else "-"
        speedup = f"{row['speedup']:.1f}×" if row["speedup"] else "-"
        label = row["config"] + (f" (dropout {row['dropout']:g})" if row["dropout"] else "")
        print(f"| {label} | {row['params']:,} | {row['train_mflop_per_image']:,.1f} | {reference} | "
              f"{row['vitlab_img_s']:,.0f} ({row['vitlab_precision']}) | {speedup} | {row['vitlab_tflop_s']:.3f} | "
              f"{100 * row['share_of_bf16_peak']:.1f}% |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"peak_bf16_tflop_s": peak_bf16, "peak_fp32_tflop_s": peak_fp32, "rows": rows,
                       "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args)}, handle, indent=2)


if __name__ == "__main__":
    main()
