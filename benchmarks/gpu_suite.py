"""The GPU suite: one command that exercises vitlab's CUDA paths and writes one results folder.

    python benchmarks/gpu_suite.py --out gpu-results                 # everything, within --budget seconds
    python benchmarks/gpu_suite.py --stage probe --out gpu-results   # environment + throughput table only
    python benchmarks/gpu_suite.py --dry-run --out /tmp/plan         # no GPU needed: builds every step

Stages (each writes into --out as it goes, so a suite stopped at its deadline keeps what finished):

- probe: the GPU, driver and torch versions, a bf16 matmul peak measured on the GPU (8192³), and a
  throughput table: images/s, TFLOP/s and share of that peak for every benchmark configuration,
  through the Runner's own training step (bf16 autocast, fused AdamW, channels-last, device-resident
  batches with crop/flip on the GPU) on synthetic uint8 batches (speed does not depend on the pixels).
  One configuration is also timed with torch.compile.
- train: `vit-best` (its preset's epochs, or as many as the time left allows, said in the summary),
  alone on the GPU first; the test suite on the GPU in parallel worker processes; then the seeds'
  20-epoch patch study (`vitlab compare --budget gpu --seeds 3`), `cnn-fast` and `vit-fast` for three
  seeds each, and a `--compile` run, side by side.
- summary: summary.json and summary.md from whatever finished.

With one GPU, `torchrun` cannot start two NCCL ranks on it (NCCL refuses a duplicate GPU), so the
multi-process paths (DDP, SyncBatchNorm) run only where several GPUs are present.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from vitlab.config import TrainConfig
from vitlab.data import DeviceBatches
from vitlab.errors import run_script
from vitlab.models import build_model
from vitlab.models.flops import train_flops_per_image
from vitlab.presets import PRESETS, build_run_config
from vitlab.train.trainer import Runner

VIT_BEST_MIXES = PRESETS["vit-best"].train.get("mixup", 0) > 0  # MixUp/CutMix in vit-best's throughput row
THROUGHPUT_CONFIGS = {  # name: (model, model config, batch size)
    "cnn-small": ("cnn-small", {}, 128),
    "cnn": ("cnn", {}, 128),
    "aircnn (cnn-fast)": ("aircnn", {}, 1024),
    "vit-seed001": ("vit", PRESETS["vit-seed001"].model_config, 128),
    "vit-seed002 (dropout 0.1)": ("vit", PRESETS["vit-seed002"].model_config, 128),
    "vit-seed000": ("vit", PRESETS["vit-seed000"].model_config, 128),
    "vit-fast": ("vit", PRESETS["vit-fast"].model_config, 128),
    "vit-best": ("vit", PRESETS["vit-best"].model_config, 256),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def gpu_environment() -> dict:
    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        try:
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["nvidia_smi"] = None
    return info


def gpu_matmul_peak(size: int = 8192, repeats: int = 10) -> float:
    """Mean TFLOP/s of `repeats` bf16 size³ matmuls after three warm-ups, on random data."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def step_images_per_second(model_name: str, model_config: dict, batch_size: int, steps: int, warmup: int,
                           compile_model: bool = False, mixing: bool = False) -> float:
    """The Runner's training step on device-resident synthetic uint8 batches, timed after `warmup` steps."""
    torch.manual_seed(0)
    model = build_model(model_name, **model_config)
    config = TrainConfig(batch_size=batch_size, progress=False, compile=compile_model,
                         mixup=0.8 if mixing else 0.0, cutmix=1.0 if mixing else 0.0)
    runner = Runner(model, config)
    optimizer = runner.make_optimizer()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size * 8, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (batch_size * 8,), generator=generator)
    batches = DeviceBatches(images, labels, batch_size, train=True, device=runner.device, memory_format=runner.memory_format)
    order = batches.new_order()

    def one_step(step: int) -> None:
        from vitlab.train.mixing import mix_batch

        batch_images, batch_labels = batches.batch(step % len(batches), order)
        mixed = mix_batch(batch_images, batch_labels, config.mixup, config.cutmix, batches.host_generator)
        runner.train_step(mixed.images, batch_labels, optimizer, mixed.partner_labels, mixed.weight)

    synchronize = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    for step in range(warmup):
        one_step(step)
    synchronize()
    start = time.perf_counter()
    for step in range(steps):
        one_step(step)
    synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def probe(out: Path, steps: int = 40, warmup: int = 10, compiled: tuple[str, ...] = ()) -> dict:
    environment = gpu_environment()
    log(f"environment: {environment}")
    peak = gpu_matmul_peak()
    environment["bf16_matmul_peak_tflop_s"] = peak
    log(f"bf16 matmul peak {peak:.0f} TFLOP/s")
    rows = []
    for name, (model_name, model_config, batch_size) in THROUGHPUT_CONFIGS.items():
        flops = train_flops_per_image(build_model(model_name, **model_config))
        mixing = name == "vit-best" and VIT_BEST_MIXES
        speed = step_images_per_second(model_name, model_config, batch_size, steps, warmup, mixing=mixing)
        row = {"config": name, "batch_size": batch_size, "train_mflop_per_image": flops / 1e6, "img_s": speed,
               "tflop_s": speed * flops / 1e12, "share_of_peak": speed * flops / 1e12 / peak, "compile": False, "mixup_cutmix": mixing}
        rows.append(row)
        log(json.dumps(row))
        write_json(out / "throughput.json", {"environment": environment, "rows": rows})
    for name in compiled:
        model_name, model_config, batch_size = THROUGHPUT_CONFIGS[name]
        try:
            start = time.perf_counter()
            speed = step_images_per_second(model_name, model_config, batch_size, steps, warmup, compile_model=True,
                                           mixing=name == "vit-best" and VIT_BEST_MIXES)
            flops = train_flops_per_image(build_model(model_name, **model_config))
            row = {"config": name, "batch_size": batch_size, "train_mflop_per_image": flops / 1e6, "img_s": speed,
                   "tflop_s": speed * flops / 1e12, "share_of_peak": speed * flops / 1e12 / peak, "compile": True,
                   "compile_and_time_seconds": time.perf_counter() - start, "mixup_cutmix": name == "vit-best" and VIT_BEST_MIXES}
        except Exception as error:  # the suite records a failing path instead of stopping
            row = {"config": name, "compile": True, "error": f"{type(error).__name__}: {str(error)[:500]}"}
        rows.append(row)
        log(json.dumps(row))
        write_json(out / "throughput.json", {"environment": environment, "rows": rows})
    return {"environment": environment, "rows": rows}


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    tmp.replace(path)


class Job:
    """A subprocess with its own log file and a record of how it ended."""

    def __init__(self, name: str, argv: list[str], out: Path, env: dict | None = None) -> None:
        self.name, self.argv = name, argv
        self.log_path = out / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.handle = open(self.log_path, "w")
        self.handle.write("$ " + " ".join(shlex.quote(a) for a in argv) + "\n")
        self.handle.flush()
        self.process = subprocess.Popen(argv, stdout=self.handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                        start_new_session=True)
        self.end: float | None = None
        self.returncode: int | None = None
        self.killed = False
        log(f"started {name}: {' '.join(argv)}")

    def poll(self) -> bool:
        """True once the job has ended."""
        if self.returncode is None and self.process.poll() is not None:
            self.returncode, self.end = self.process.returncode, time.time()
            self.handle.close()
            log(f"{self.name} ended with {self.returncode} after {self.end - self.start:.0f} s")
        return self.returncode is not None

    def terminate(self) -> None:
        """SIGTERM: vitlab saves a checkpoint and exits."""
        if not self.poll():
            self.killed = True
            os.killpg(self.process.pid, signal.SIGTERM)

    def kill(self) -> None:
        if not self.poll():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.poll()

    def record(self) -> dict:
        return {"name": self.name, "command": " ".join(self.argv), "returncode": self.returncode, "killed_at_deadline": self.killed,
                "seconds": (self.end or time.time()) - self.start}


def stop_all(jobs: list[Job], grace: float = 15.0) -> None:
    for job in jobs:
        job.terminate()
    end = time.time() + grace
    while time.time() < end and not all([job.poll() for job in jobs]):
        time.sleep(0.5)
    for job in jobs:
        job.kill()


def vitlab_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitlab", *args]


def train_plan(out: Path, vit_best_epochs: int) -> dict[str, list[list[str]]]:
    """The commands of the train stage, by phase."""
    runs = out / "runs"
    phase_one = {"vit-best": vitlab_command("train", "--preset", "vit-best", "--epochs", str(vit_best_epochs), "--progress", "false",
                                            "--out", str(runs / "vit-best"))}
    def preset_run(preset: str, seed: int) -> list[str]:
        return vitlab_command("train", "--preset", preset, "--seed", str(seed), "--progress", "false", "--out", str(runs / f"{preset}-seed{seed}"))

    phase_two = {
        "seed-study": vitlab_command("compare", "cnn-small", "vit:patch_size=2", "vit:patch_size=4", "vit:patch_size=6", "vit:patch_size=8", "mlp",
                                     "--budget", "gpu", "--seeds", "3", "--jobs", "5", "--out", str(out / "seed-study")),
        "cnn-fast-seed0": preset_run("cnn-fast", 0),
        "vit-fast-seed0": preset_run("vit-fast", 0),
        "vit-seed001-compile": vitlab_command("train", "--preset", "vit-seed001", "--epochs", "3", "--compile", "true", "--progress", "false",
                                              "--out", str(runs / "vit-seed001-compile")),
        "vit-seed001-eager": vitlab_command("train", "--preset", "vit-seed001", "--epochs", "3", "--progress", "false",
                                            "--out", str(runs / "vit-seed001-eager")),
        **{f"{preset}-seed{seed}": preset_run(preset, seed) for seed in (1, 2) for preset in ("cnn-fast", "vit-fast")},
    }
    return {"phase_one": phase_one, "phase_two": phase_two}


def vit_best_schedule(images_per_second: float | None, budget: float, max_share: float) -> tuple[int, float]:
    """(epochs, seconds) for vit-best alone on the GPU: its preset's epochs when they fit in `max_share` of the
    budget at the probed speed (plus 15% for validation and start-up), else as many as fit."""
    full = PRESETS["vit-best"].train["epochs"]
    if not images_per_second:
        return full, budget * max_share
    epoch_seconds = 40_000 / images_per_second * 1.15
    seconds = min(full * epoch_seconds, budget * max_share)
    return int(max(10, min(full, seconds / epoch_seconds + 1e-6))), seconds + 20


def process_weight(job_name: str) -> int:
    """Processes a phase-two job runs at once (a study trains 5 runs in parallel)."""
    return 5 if job_name == "seed-study" else 1


def train(out: Path, budget: float, vit_best_share: float, pytest_workers: int, max_processes: int = 9) -> None:
    start = time.time()
    deadline = start + budget
    throughput_file = out / "throughput.json"
    speed = None
    if throughput_file.exists():
        rows = json.loads(throughput_file.read_text())["rows"]
        speed = next((row["img_s"] for row in rows if row["config"] == "vit-best" and not row.get("compile")), None)
    epochs, alone_seconds = vit_best_schedule(speed, budget, vit_best_share)
    log(f"vit-best: {epochs} epochs, about {alone_seconds:.0f} s alone (probed {speed} img/s)")
    plan = train_plan(out, epochs)
    jobs = [Job(name, argv, out) for name, argv in plan["phase_one"].items()]
    vit_best = jobs[0]
    if pytest_workers > 0:
        jobs.append(Job("pytest", [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-n", str(pytest_workers),
                                   "--timeout", "300", f"--junitxml={out / 'pytest.xml'}", "tests"], out,
                        env={"OMP_NUM_THREADS": "2"}))
    phase_two_start = start + alone_seconds
    queue = list(plan["phase_two"].items())  # started in this order, as processes free up
    running_two: list[tuple[Job, int]] = []
    while time.time() < deadline:
        for job in jobs:
            job.poll()
        if vit_best.poll() or time.time() >= phase_two_start:
            running_two = [(job, weight) for job, weight in running_two if not job.poll()]
            while queue and sum(weight for _, weight in running_two) + process_weight(queue[0][0]) <= max_processes:
                name, argv = queue.pop(0)
                job = Job(name, argv, out, env={"OMP_NUM_THREADS": "1"})
                jobs.append(job)
                running_two.append((job, process_weight(name)))
        if not queue and all(job.poll() for job in jobs):
            break
        write_json(out / "jobs.json", {"vit_best_epochs": epochs, "jobs": [job.record() for job in jobs]})
        time.sleep(1)
    stop_all(jobs)
    write_json(out / "jobs.json", {"vit_best_epochs": epochs, "jobs": [job.record() for job in jobs]})


def summarize(out: Path) -> dict:
    """summary.json / summary.md from every results.json under --out."""
    results = []
    for path in sorted(out.rglob("results.json")):
        record = json.loads(path.read_text())
        results.append({"run": str(path.parent.relative_to(out)), **{key: record.get(key) for key in (
            "model", "preset", "test_acc", "test_loss", "best_val_acc", "epochs", "train_seconds", "images_per_second", "device",
            "precision", "params", "time_to_accuracy")}})
    unfinished = []
    for path in sorted(out.rglob("metrics.jsonl")):
        if not (path.parent / "results.json").exists():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if lines:
                unfinished.append({"run": str(path.parent.relative_to(out)), "epochs_done": len(lines), "last_val_acc": lines[-1].get("val_acc")})
    summary = {"results": results, "unfinished": unfinished}
    for name in ("throughput.json", "jobs.json"):
        if (out / name).exists():
            summary[name.removesuffix(".json")] = json.loads((out / name).read_text())
    write_json(out / "summary.json", summary)
    lines = ["# GPU suite", ""]
    if "throughput" in summary:
        env = summary["throughput"]["environment"]
        lines += [f"{env.get('gpu')} ({env.get('nvidia_smi')}), torch {env.get('torch')}, CUDA {env.get('cuda')}; "
                  f"bf16 matmul peak measured in the same run: {env.get('bf16_matmul_peak_tflop_s', 0):.0f} TFLOP/s", "",
                  "| config | batch | compile | train MFLOP/img | img/s | TFLOP/s | % of peak |", "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        for row in summary["throughput"]["rows"]:
            if "error" in row or "batch_size" not in row:
                lines.append(f"| {row['config']} | | {row.get('compile')} | | failed: {row.get('error', '?')[:80]} | | |")
                continue
            lines.append(f"| {row['config']} | {row['batch_size']} | {row['compile']} | {row['train_mflop_per_image']:,.1f} | "
                         f"{row['img_s']:,.0f} | {row['tflop_s']:.1f} | {100 * row['share_of_peak']:.1f}% |")
        lines.append("")
    lines += ["| run | test acc | epochs | train s | img/s |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in results:
        lines.append(f"| {row['run']} | {row['test_acc']:.2f}% | {row['epochs']} | {row['train_seconds']:.0f} | {row['images_per_second']:,.0f} |")
    for row in unfinished:
        lines.append(f"| {row['run']} (unfinished) | val {row['last_val_acc']} | {row['epochs_done']} done | | |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def dry_run(out: Path) -> None:
    """Without a GPU: every training command of the suite parses into a valid run config, and the
    probe's step runs on the CPU for one configuration."""
    plan = train_plan(out, 200)
    from vitlab.cli import build_parser

    parser = build_parser()
    for phase in plan.values():
        for name, argv in phase.items():
            args = parser.parse_args(argv[3:])
            log(f"{name}: parses ({args.command})")
    model_name, model_config, _ = THROUGHPUT_CONFIGS["vit-seed001"]
    torch.manual_seed(0)
    model = build_model(model_name, **model_config)
    runner = Runner(model, TrainConfig(batch_size=8, device="cpu", progress=False, mixup=0.8, cutmix=1.0))
    optimizer = runner.make_optimizer()
    images, labels = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (16,))
    batches = DeviceBatches(images, labels, 8, train=True, device=runner.device)
    batch_images, batch_labels = batches.batch(0, batches.new_order())
    runner.train_step(batch_images, batch_labels, optimizer)
    build_run_config(None, "vit-best", {"epochs": 2})
    log("dry run: every step builds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--stage", choices=["all", "probe", "train", "summary"], default="all")
    parser.add_argument("--budget", type=float, default=2400, help="seconds for the train stage")
    parser.add_argument("--vit-best-share", type=float, default=0.7, help="at most this share of the budget vit-best has the GPU alone")
    parser.add_argument("--pytest-workers", type=int, default=4, help="run the test suite on the GPU with this many workers (0: not)")
    parser.add_argument("--compile-probe", default="", help="comma-separated configs also timed with torch.compile in the probe")
    parser.add_argument("--dry-run", action="store_true", help="check that every step builds, without a GPU")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        dry_run(out)
        return
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU is visible; run with --dry-run to check the suite without one")
    if args.stage in ("all", "probe"):
        probe(out, compiled=tuple(name for name in args.compile_probe.split(",") if name))
    if args.stage in ("all", "train"):
        train(out, args.budget, args.vit_best_share, args.pytest_workers)
    if args.stage in ("all", "train", "summary"):
        summarize(out)


if __name__ == "__main__":
    run_script(main)
