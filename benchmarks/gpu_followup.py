"""A short GPU session's follow-up to the suite (docs/gpu/): what the first H200 session left open.

    python benchmarks/gpu_followup.py --stage sdpa  --out OUT          # SDPA backends on ViT shapes, bf16
    python benchmarks/gpu_followup.py --stage probe --out OUT          # img/s of the vit-best candidates alone
    python benchmarks/gpu_followup.py --stage train --out OUT --study STUDY --budget 470
    python benchmarks/gpu_followup.py --dry-run --out OUT              # no GPU: prints every command

- sdpa: forward and backward of `F.scaled_dot_product_attention` in bf16 with each CUDA backend
  (cuDNN, FlashAttention, memory-efficient, math) on the token counts vitlab's ViTs use (64 without a
  class token, 65 with one), against an fp32 reference: non-finite gradients and the largest error.
- train, side by side until --budget seconds: the rest of the seeds' 20-epoch patch study (resumed from
  the folder of the first session), `vit-fast` (now `vit-cct`) for 3 seeds with vitlab's SDPA backends and 2 seeds with
  PyTorch's own choice (cuDNN allowed: the control for the NaN of the first session), and two
  candidates for `vit-best`, their epochs chosen from the probed speed so they end before the deadline.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gpu_suite import Job, log, step_images_per_second, stop_all, vitlab_command, write_json  # noqa: E402

from vitlab.errors import run_script

# The two vit-best candidates: a pure ViT (vit-best's architecture without its always-on MixUp/CutMix)
# and a hybrid with vit-cct's (then vit-fast's) convolutional tokenizer, wider and deeper.
CANDIDATES = {
    "vit-best-pure": {
        "model": ("vit", {"patch_size": 4, "hidden_size": 384, "num_heads": 12, "num_blocks": 7, "mlp_ratio": 1.0}),
        # vit-best's recipe of that session (it has since become the hybrid below) without its MixUp/CutMix
        "flags": ["--model", "vit", "--patch_size", "4", "--hidden_size", "384", "--num_heads", "12", "--num_blocks", "7",
                  "--mlp_ratio", "1", "--batch_size", "256", "--lr", "1e-3", "--warmup_epochs", "5", "--weight_decay", "0.05",
                  "--grad_clip", "1.0", "--trivial_augment", "true"],
    },
    "vit-best-hybrid": {
        "model": ("vit", {"patch_size": 4, "hidden_size": 256, "num_heads": 8, "num_blocks": 6, "mlp_ratio": 2.0,
                          "stem": "conv-pool", "pool": "seq"}),
        "flags": ["--model", "vit", "--patch_size", "4", "--hidden_size", "256", "--num_heads", "8", "--num_blocks", "6",
                  "--mlp_ratio", "2", "--stem", "conv-pool", "--pool", "seq", "--batch_size", "256", "--lr", "1.5e-3",
                  "--warmup_epochs", "5", "--weight_decay", "0.05", "--grad_clip", "1.0", "--trivial_augment", "true"],
    },
}
BATCH = 256
SLOWDOWN = 1.5  # sharing the GPU with the other jobs, TrivialAugment and validation, over the probed speed alone


def sdpa_check(out: Path) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for tokens in (64, 65, 256):
        for trial in range(3):
            generator = torch.Generator(device="cuda").manual_seed(trial)
            shape = (128, 4, tokens, 32)
            # Query/key scales grow during training; the larger trials put logits in the tens.
            query, key, value = (torch.randn(shape, device="cuda", generator=generator) * (1 + 3 * trial) for _ in range(3))
            grad_out = torch.randn(shape, device="cuda", generator=generator)
            reference = [t.detach().clone().requires_grad_() for t in (query, key, value)]
            with sdpa_kernel(SDPBackend.MATH):
                F.scaled_dot_product_attention(*reference).backward(grad_out)
            for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
                inputs = [t.detach().to(torch.bfloat16).requires_grad_() for t in (query, key, value)]
                row = {"tokens": tokens, "trial": trial, "backend": backend.name}
                try:
                    with sdpa_kernel(backend):
                        F.scaled_dot_product_attention(*inputs).backward(grad_out.to(torch.bfloat16))
                    grads = [t.grad.float() for t in inputs]
                    row["nonfinite_grads"] = int(sum((~torch.isfinite(g)).sum().item() for g in grads))
                    row["max_grad_error"] = max(float((g - r.grad).abs().nan_to_num(math.inf).max()) for g, r in zip(grads, reference, strict=True))
                except RuntimeError as error:
                    row["error"] = str(error).splitlines()[0][:200]
                rows.append(row)
                log(json.dumps(row))
    write_json(out / "sdpa.json", {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                                   "gpu": torch.cuda.get_device_name(), "rows": rows})


def probe(out: Path) -> None:
    speeds = {}
    for name, candidate in CANDIDATES.items():
        model_name, model_config = candidate["model"]
        speeds[name] = step_images_per_second(model_name, model_config, BATCH, steps=30, warmup=10)
        log(f"{name}: {speeds[name]:.0f} img/s alone (synthetic batches, no TrivialAugment)")
    write_json(out / "probe.json", speeds)


def candidate_epochs(images_per_second: float, seconds: float) -> int:
    epoch_seconds = 40_000 / images_per_second * SLOWDOWN
    return int(max(10, min(200, seconds / epoch_seconds)))


def control_command(*args: str) -> list[str]:
    """vitlab with PyTorch's own SDPA backend choice (cuDNN attention allowed)."""
    code = ("import runpy, sys; import vitlab.models.layers as layers; layers.CUDA_SDPA_BACKENDS = None; "
            "sys.argv = ['vitlab', *sys.argv[1:]]; runpy.run_module('vitlab', run_name='__main__')")
    return [sys.executable, "-c", code, *args]


def plan(out: Path, study: Path, speeds: dict, seconds: float) -> dict[str, list[str]]:
    runs = out / "runs"
    commands = {}
    for name, candidate in CANDIDATES.items():
        epochs = candidate_epochs(speeds.get(name, 12_000), seconds)
        commands[f"{name}-{epochs}ep"] = vitlab_command("train", *candidate["flags"], "--epochs", str(epochs), "--progress", "false",
                                                        "--out", str(runs / f"{name}-{epochs}ep"))
    commands["seed-study"] = vitlab_command("compare", "cnn-small", "vit:patch_size=2", "vit:patch_size=4", "vit:patch_size=6",
                                            "vit:patch_size=8", "mlp", "--budget", "gpu", "--seeds", "3", "--jobs", "5", "--out", str(study))
    for seed in (0, 1, 2):
        commands[f"vit-fast-seed{seed}"] = vitlab_command("train", "--preset", "vit-cct", "--seed", str(seed), "--progress", "false",
                                                          "--out", str(runs / f"vit-fast-seed{seed}"))
    for seed in (0, 1):
        commands[f"vit-fast-cudnn-seed{seed}"] = control_command("train", "--preset", "vit-cct", "--seed", str(seed), "--progress", "false",
                                                                 "--out", str(runs / f"vit-fast-cudnn-seed{seed}"))
    return commands


def train(out: Path, study: Path, budget: float, probe_file: Path) -> None:
    start = time.time()
    speeds = json.loads(probe_file.read_text()) if probe_file.is_file() else {}
    commands = plan(out, study, speeds, budget - 40)
    jobs = [Job(name, argv, out, env={"OMP_NUM_THREADS": "1"}) for name, argv in commands.items()]
    while time.time() < start + budget and not all([job.poll() for job in jobs]):  # a list: poll every job
        write_json(out / "jobs.json", {"speeds": speeds, "jobs": [job.record() for job in jobs]})
        time.sleep(2)
    stop_all(jobs)
    write_json(out / "jobs.json", {"speeds": speeds, "jobs": [job.record() for job in jobs]})


def dry_run(out: Path, study: Path, budget: float) -> dict[str, list[str]]:
    """Without a GPU: every command of the train stage parses, and both candidates' models build."""
    from vitlab.cli import build_parser
    from vitlab.models import build_model

    commands = plan(out, study, {}, budget - 40)
    parser = build_parser()
    for name, argv in commands.items():
        args = parser.parse_args(argv[3:])  # after 'python -m vitlab' or 'python -c CODE'
        print(name, args.command, " ".join(argv[3:]))
    for candidate in CANDIDATES.values():
        model_name, model_config = candidate["model"]
        build_model(model_name, **model_config)
    return commands


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", choices=["sdpa", "probe", "train"], default="train")
    parser.add_argument("--study", default="seed-study", help="the seeds' 20-epoch patch study folder to resume")
    parser.add_argument("--budget", type=float, default=470, help="seconds for the train stage")
    parser.add_argument("--probe", default="probe.json", help="img/s of the candidates alone (from --stage probe)")
    parser.add_argument("--dry-run", action="store_true", help="print the train stage's commands, without a GPU")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        dry_run(out, Path(args.study), args.budget)
        return
    {"sdpa": lambda: sdpa_check(out), "probe": lambda: probe(out),
     "train": lambda: train(out, Path(args.study), args.budget, Path(args.probe))}[args.stage]()


if __name__ == "__main__":
    run_script(main)
