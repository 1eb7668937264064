"""A GPU session for the records: `vit-best` to the end of its schedule for 3 seeds, and `cnn-fast` on CUDA
for ten seeds (written for the third GPU session; docs/gpu/README.md says what came of each).

    python benchmarks/gpu_records.py --stage check --out OUT    # no data needed: CUDA tests of the newer paths, a speed probe
    python benchmarks/gpu_records.py --stage train --out OUT --probe OUT/probe.json --budget 500
    python benchmarks/gpu_records.py --dry-run --out OUT        # no GPU: every command parses, the probe's step runs on the CPU

- check: the tests of Muon, the batch augmentations and the ViT techniques with CUDA visible (time-limited),
  then the speed of one `vit-best` training step (with its preset's augmentation) alone and with three processes sharing
  the GPU, which sets the number of epochs the train stage can afford.
- train: `cnn-fast` seed 0 alone (its time is a record), then `vit-best` seeds 0/1/2 side by side with, one
  after another beside them, `cnn-fast` seeds 1-9; everything stops by --budget seconds. The runs' results,
  curves and logs come back as one archive (the device returns at most 8 files).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_suite import Job, gpu_environment, log, stop_all, vitlab_command, write_json  # noqa: E402

from vitlab.config import TrainConfig  # noqa: E402
from vitlab.data import DeviceBatches  # noqa: E402
from vitlab.errors import run_script
from vitlab.models import build_model  # noqa: E402
from vitlab.presets import PRESETS, build_run_config  # noqa: E402
from vitlab.train.trainer import Runner  # noqa: E402

EPOCH_OVERHEAD = 1.2  # validation of 10,000 images and the epoch's own work, over the probed step speed
CUDA_TESTS = ["tests/train/test_muon.py", "tests/test_augment.py", "tests/models/test_vit_techniques.py"]


def vit_best_step_speed(steps: int = 100, warmup: int = 10, start_at: float = 0.0) -> float:
    """img/s of vit-best's training step on device-resident synthetic uint8 batches, with its preset's TrivialAugment;
    the timed steps begin at `start_at` (a time.time()), so processes started together time the same span."""
    preset = PRESETS["vit-best"]
    torch.manual_seed(0)
    model = build_model(preset.model, **preset.model_config)
    batch_size = preset.train["batch_size"]
    runner = Runner(model, TrainConfig(**{**preset.train, "progress": False}))
    optimizer = runner.make_optimizer()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size * 8, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (batch_size * 8,), generator=generator)
    batches = DeviceBatches(images, labels, batch_size, train=True, device=runner.device, memory_format=runner.memory_format,
                            trivial_augment=preset.data.get("trivial_augment", False))
    order = batches.new_order()
    synchronize = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    time.sleep(max(0.0, start_at - time.time()))
    for step in range(warmup + steps):
        if step == warmup:
            synchronize()
            start = time.perf_counter()
        batch_images, batch_labels = batches.batch(step % len(batches), order)
        runner.train_step(batch_images, batch_labels, optimizer)
    synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def probe(out: Path) -> dict:
    alone = vit_best_step_speed()
    log(f"vit-best alone: {alone:.0f} img/s")
    worker = [sys.executable, __file__, "--stage", "speed", "--out", str(out), "--start-at", str(time.time() + 30)]
    processes = [subprocess.Popen(worker, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [process.communicate()[0].strip().splitlines() for process in processes]
    if not all(outputs):
        raise SystemExit("a speed worker printed nothing (see its error above); no probe.json written")
    shared = [float(lines[-1]) for lines in outputs]
    log(f"vit-best, three processes at once: {', '.join(f'{speed:.0f}' for speed in shared)} img/s")
    result = {"environment": gpu_environment(), "vit_best_alone": alone, "vit_best_three_at_once": shared}
    write_json(out / "probe.json", result)
    return result


def run_cuda_tests(out: Path, seconds: int = 75) -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "4", *CUDA_TESTS]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=seconds)
        text, code = completed.stdout + completed.stderr, completed.returncode
    except subprocess.TimeoutExpired as stopped:
        text, code = f"{stopped.stdout or ''}\nstopped after {seconds} s", None
    (out / "cuda_tests.log").write_text(text)
    log(f"CUDA tests ({' '.join(CUDA_TESTS)}): exit {code}; {text.strip().splitlines()[-1] if text.strip() else ''}")




def train_images(preset_name: str) -> int:
    """Images per epoch: all 50,000 when the preset trains on the validation images too, else the 40,000-image split."""
    return 50_000 if PRESETS[preset_name].data.get("train_on_validation") else 40_000


def vit_best_epochs(seconds: float, images_per_second: float) -> int:
    """The preset's epochs, or as many as `seconds` allow at `images_per_second` (at least 10)."""
    affordable = seconds * images_per_second / (train_images("vit-best") * EPOCH_OVERHEAD)
    return int(max(10, min(PRESETS["vit-best"].train["epochs"], affordable)))


def plan(out: Path, epochs: int) -> dict[str, list[str]]:
    runs = out / "runs"

    def preset_run(name: str, preset: str, seed: int, *extra: str) -> list[str]:
        return vitlab_command("train", "--preset", preset, "--seed", str(seed), *extra, "--progress", "false",
                              "--out", str(runs / f"{name}-seed{seed}"))

    return {"cnn-fast-seed0": preset_run("cnn-fast", "cnn-fast", 0),
            **{f"vit-best-seed{seed}": preset_run("vit-best", "vit-best", seed, "--epochs", str(epochs)) for seed in (0, 1, 2)},
            **{f"cnn-fast-seed{seed}": preset_run("cnn-fast", "cnn-fast", seed) for seed in range(1, 10)}}


def wait(jobs: list[Job], deadline: float, out: Path, extra: dict) -> None:
    while time.time() < deadline and not all([job.poll() for job in jobs]):  # a list: poll every job
        write_json(out / "jobs.json", {**extra, "jobs": [job.record() for job in jobs]})
        time.sleep(1)


def train(out: Path, budget: float, probe_file: Path, archive: Path) -> None:
    start = time.time()
    deadline = start + budget
    speeds = json.loads(probe_file.read_text())
    shared = min(speeds["vit_best_three_at_once"])
    jobs: list[Job] = []
    commands = plan(out, 0)
    cnn_first = Job("cnn-fast-seed0", commands["cnn-fast-seed0"], out)
    jobs.append(cnn_first)
    wait([cnn_first], min(deadline, time.time() + 120), out, {"speeds": speeds})
    epochs = vit_best_epochs(deadline - time.time() - 45, shared)  # 45 s: start-up, the test set, TTA
    log(f"vit-best: {epochs} epochs at {shared:.0f} img/s per process (three at once)")
    commands = plan(out, epochs)
    vit_jobs = [Job(name, commands[name], out) for name in ("vit-best-seed0", "vit-best-seed1", "vit-best-seed2")]
    jobs += vit_jobs
    record = {"speeds": speeds, "vit_best_epochs": epochs}
    for name in [name for name in commands if name.startswith("cnn-fast") and name != "cnn-fast-seed0"]:
        job = Job(name, commands[name], out)
        jobs.append(job)
        wait([job], deadline, out, record)
    wait(jobs, deadline, out, record)
    stop_all(jobs)
    write_json(out / "jobs.json", {**record, "jobs": [job.record() for job in jobs], "seconds": time.time() - start})
    archive.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive / "runs.tgz", "w:gz") as bundle:
        for path in sorted((out / "runs").rglob("*")):
            if path.is_file() and path.suffix in (".json", ".jsonl", ".png", ".md"):
                bundle.add(path, arcname=str(path.relative_to(out)))
        bundle.add(out / "logs", arcname="logs")
        bundle.add(out / "jobs.json", arcname="jobs.json")


def dry_run(out: Path) -> None:
    from vitlab.cli import build_parser

    parser = build_parser()
    for name, argv in plan(out, vit_best_epochs(400, 9000)).items():
        args = parser.parse_args(argv[3:])
        build_run_config(None, args.preset, {"epochs": 1})
        log(f"{name}: parses ({' '.join(argv[3:])})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", choices=["check", "speed", "train"], default="check")
    parser.add_argument("--budget", type=float, default=500, help="seconds for the train stage, all of it")
    parser.add_argument("--probe", default="probe.json", help="the check stage's probe.json")
    parser.add_argument("--archive", help="train stage: write runs.tgz (results, curves, logs) here (default: --out)")
    parser.add_argument("--start-at", type=float, default=0.0, help="speed stage: begin timing at this time.time()")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        dry_run(out)
    elif args.stage == "speed":
        print(vit_best_step_speed(steps=200, start_at=args.start_at), flush=True)
    elif args.stage == "check":
        run_cuda_tests(out)
        probe(out)
    else:
        train(out, args.budget, Path(args.probe), Path(args.archive or out))


if __name__ == "__main__":
    run_script(main)
