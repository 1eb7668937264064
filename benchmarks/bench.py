"""vitlab's training speed as a share of the machine's own limits, and against the seeds' way, in one run.

For each configuration it alternates two trainers, each for a fixed number of steps after a warm-up,
and reports images/s, achieved model TFLOP/s (FLOPs counted with torch.utils.flop_counter) as a share of
the bf16 matmul peak measured in the same run (the definition of ../shared/tools/matmul_peak.py:
2048³, best of 5 rounds of 5) — once at the start and again just before and after each measurement, since a shared
machine's peak moved by up to 2.9× within minutes (docs/performance.md) — and on the CPU the round trip of a cache line
between the two threads' cores at the same moments (tens of ns where they share an L3, hundreds where they do not,
which on the AMD EPYC machine changed from minute to minute and moved training steps: docs/performance.md), the speed-up over
the seeds' way, and where the step's time goes that is not matrix multiplication (torch.profiler, self time by
operator). It splits each step's wall time into vitlab's C kernels (every call timed), PyTorch's own operators
(profiler self time) and the rest, outside any operator (Python and autograd's bookkeeping between them), and it
reports the bytes the step's operators read and write per second against a copy bandwidth measured in the same run;
where every kernel's bytes are counted (the CNNs), it also gives the step's arithmetic intensity (FLOPs per byte)
against the ridge point peak / copy bandwidth, which says whether the compute peak or the memory bounds the step.

- reference: what the seeds do. The models as seed 002's code writes them (reference_models.py:
  explicit-softmax attention, nn.Dropout), eager fp32, torchvision DataLoader with per-image PIL
  transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize; num_workers=2 as
  in seed 002), AdamW, and seed 002's loop (loss.item() and the accuracy count every step).
- vitlab: the Runner's own training step on its device-resident uint8 data with batched
  augmentation, at the chosen precision (default: what `--precision auto` picks), SDPA attention.

Usage: python benchmarks/bench.py [--steps 30] [--rounds 2] [--configs cnn-small,vit-seed001] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from reference_models import build_reference
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from vitlab.config import TrainConfig
from vitlab.data import MEAN, STD, DeviceBatches, load_cifar10, locate_cifar10
from vitlab.errors import run_script
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
    "vit-pure": ("vit", PRESETS["vit-pure"].model_config),
    "vit-fast": ("vit", PRESETS["vit-fast"].model_config),  # airbench's conv groups as tokenizer, 64 tokens of width 256
    "vit-cct": ("vit", PRESETS["vit-cct"].model_config),  # CCT's tokenizer, 64 tokens of width 128 (vit-fast until 2026-11-27)
}
# Configurations the seeds never wrote (no reference side): their techniques (SPT, LSA, conv tokenizer) have no seed version.
WITHOUT_REFERENCE = {"vit-pure", "vit-fast", "vit-cct"}
MATMUL_OPS = ("mm", "addmm", "bmm", "matmul", "linear", "convolution", "conv2d", "mkldnn_convolution", "_convolution",
              "convolution_backward", "scaled_dot_product", "flash_attention", "baddbmm", "_efficient_attention", "mkldnn_rnn",
              "mkldnn_matmul", "onednn")


def with_dropout(model_name: str, model_config: dict, dropout: float | None) -> dict:
    """A ViT config whose dropout sits where seed 002 puts it (embeddings, attention probabilities, MLP),
    which vitlab needs `attention_dropout` for (vitlab also drops after the attention projection)."""
    if model_name != "vit":
        return model_config
    dropout = model_config.get("dropout", 0.0) if dropout is None else dropout
    return {**model_config, "dropout": dropout, "attention_dropout": dropout}


def synchronizer(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 2048) -> float:
    """TFLOP/s of a size³ matmul: best of 5 rounds of 5 after 3 warm-ups (../shared/tools/matmul_peak.py)."""
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    sync = synchronizer(device)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        sync()
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        sync()
        best = max(best, 5 * 2 * size**3 / (time.perf_counter() - start))
    return best / 1e12


def copy_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """GB/s of a large tensor copy, counting the bytes read and written (best of 5)."""
    source = torch.ones(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    sync = synchronizer(device)
    best = 0.0
    for _ in range(6):
        sync()
        start = time.perf_counter()
        target.copy_(source)
        sync()
        best = max(best, 2 * source.numel() * 4 / (time.perf_counter() - start))
    return best / 1e9


# Operators that move no data: views (a new shape or stride over the same memory) and allocations not yet written.
NO_TRAFFIC = {"_unsafe_view", "alias", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
# Gathers read only what they pick from their source (its size is the output's), not the whole source.
GATHERS = {"index", "index_select", "gather", "embedding", "take"}


class ByteCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of every tensor each operator reads and writes (an upper bound on traffic: caches ignored), views and
    allocations left out, a gather's source counted as what it picks. vitlab's C kernels registered as PyTorch
    operators (max-pool, with the ReLU or without) are counted the same way; the others are plain function calls, whose traffic is not
    counted."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in NO_TRAFFIC:
            return output
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, output)) if isinstance(t, torch.Tensor)]
        if name in GATHERS and isinstance(output, torch.Tensor):  # the source as much as was picked, the indices, the output
            source = args[0] if name != "embedding" else args[1]
            tensors = [t for t in tensors if t is not source] + [output]
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return output


def bytes_per_step(run_step) -> int:
    with ByteCounter() as counter:
        run_step()
    return counter.bytes


# torch.compile's generated kernels (the fused glue between matmuls) show up in the profile under this name, not as aten ops.
COMPILED_KERNELS = "## Call CompiledFxGraph"


# vitlab's C kernels (vitlab/kernels) appear in the profile under their autograd Functions' names, forward and backward,
# or, for those registered as PyTorch operators, under the operators' names.
C_KERNELS = {"KernelSelfAttention": "C attention", "KernelSoftmax": "C softmax", "KernelDropout": "C dropout",
             "KernelLayerNorm": "C layer norm", "KernelResidualNorm": "C residual add + layer norm", "KernelGELU": "C GELU",
             "KernelLinear": "C linear layer", "vitlab::relu_max_pool2d": "C ReLU + max-pool",
             "vitlab::max_pool2d": "C max-pool", "vitlab::relu_max_pool2d_backward": "C max-pool backward (ReLU's or not)",
             "KernelBatchNorm": "C batch norm (+ ReLU)", "KernelSingleQueryAttention": "C single-query attention",
             "vitlab::shifted_patches": "C shifted patches", "vitlab::patches": "C patches"}
# ... of which these are matrix multiplication (a linear layer's products, its weight gradient and its weight casts).
MATMUL_C_KERNELS = {"KernelLinear"}


def matmul_event(key: str) -> bool:
    return any(op in key for op in MATMUL_OPS) or key.removesuffix("Backward") in MATMUL_C_KERNELS


def operator_name(key: str) -> str:
    if key.startswith(COMPILED_KERNELS):
        return "compiled fused kernels"
    return C_KERNELS.get(key.removesuffix("Backward"), key.removeprefix("aten::"))


def counted_event(key: str) -> bool:
    """aten operators, compiled graphs and vitlab's C kernels: together every operator's time, each counted once."""
    return key.startswith(("aten::", COMPILED_KERNELS)) or key.removesuffix("Backward") in C_KERNELS


def c_kernel_event(key: str) -> bool:
    return key.removesuffix("Backward") in C_KERNELS


def non_matmul_breakdown(run_step, steps: int = 5, rows: int = 6) -> tuple[float, list[tuple[str, float]], float]:
    """Share of the step's operator self time that is matrix multiplication, the largest other operators as (name,
    share of the step), and the share of the profiled steps' wall time that PyTorch's own operators took (their self
    time: aten operators and compiled graphs, vitlab's C kernels not included). A compiled model's fused kernels count
    as one other operator, and so does each of vitlab's C kernels (the attention kernel's matmuls included)."""
    from torch.profiler import profile

    with profile() as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            run_step()
        wall = time.perf_counter() - start
    events = [event for event in profiler.key_averages() if counted_event(event.key)]
    total = sum(event.self_cpu_time_total for event in events) or 1.0
    matmul = sum(event.self_cpu_time_total for event in events if matmul_event(event.key))
    others: dict[str, float] = {}
    for event in events:
        if not matmul_event(event.key):
            name = operator_name(event.key)
            others[name] = others.get(name, 0.0) + event.self_cpu_time_total / total
    pytorch_operators = sum(event.self_cpu_time_total for event in events if not c_kernel_event(event.key)) / 1e6
    return matmul / total, sorted(others.items(), key=lambda item: -item[1])[:rows], min(1.0, pytorch_operators / wall)


def c_kernel_time(run_step, steps: int) -> tuple[float, frozenset[str]]:
    """(the share of `steps` steps' wall time spent inside vitlab's C kernels, every call timed; the kernels called),
    or (0, none) where the kernels are not loaded or switched off."""
    from vitlab.kernels import compiled_library
    from vitlab.kernels.timing import KernelClock

    if compiled_library() is None:
        return 0.0, frozenset()
    with KernelClock() as clock:
        start = time.perf_counter()
        for _ in range(steps):
            run_step()
        wall = time.perf_counter() - start
    return min(1.0, clock.seconds / wall), frozenset(clock.calls)


# C kernels whose bytes ByteCounter counts (registered as PyTorch operators), and the batch's augmentation, which moves a
# few bytes per image: a step that calls no other C kernel has its traffic counted, so its arithmetic intensity is known.
BYTES_COUNTED_C_FUNCTIONS = frozenset({"vitlab_crop_flip_normalize", *(f"vitlab_{kind}_{direction}_{dtype}" for kind in
                                       ("relu_max_pool", "max_pool") for direction in ("forward", "backward") for dtype in ("bf16", "f32"))})


def bound(flop_per_byte: float, ridge: float) -> str:
    """Which limit a step with this arithmetic intensity (FLOPs per byte moved) meets first on a machine whose matmul
    peak over its copy bandwidth is `ridge` FLOPs per byte: the compute peak above the ridge, the memory below."""
    return "compute" if flop_per_byte >= ridge else "memory"


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


def time_vitlab(model: nn.Module, data, config: TrainConfig, steps: int, warmup: int, profile_steps: int = 0,
                probe_peak: Callable[[], float] | None = None,
                probe_cores: Callable[[], float | None] | None = None) -> tuple[float, str, tuple[float, float] | None, dict]:
    """img/s and precision of vitlab's step; with `probe_peak`, the peak it returns just before and just after the
    timed steps (and with `probe_cores` the cores' round trip, in the details); with `profile_steps`, also the step's
    bytes and non-matmul breakdown."""
    runner, run_step = vitlab_step(model, data, config)
    before = probe_peak() if probe_peak else None
    cores_before = probe_cores() if probe_cores else None
    speed = images_per_second(run_step, steps, warmup, synchronizer(runner.device))
    cores = (cores_before, probe_cores()) if probe_cores else None
    peaks = (before, probe_peak()) if probe_peak else None
    details = step_details(run_step, profile_steps, runner.device) if profile_steps else {}
    if cores is not None:
        details["core_round_trips_ns"] = cores
    return speed, runner.precision, peaks, details


def step_details(run_step, profile_steps: int, device: torch.device = torch.device("cpu")) -> dict:
    """Bytes per step, the non-matmul breakdown of `run_step` (profiled over `profile_steps` steps) and, on the CPU,
    where its wall time goes: C kernels (timed over `profile_steps` more), PyTorch's operators, and outside any operator
    (on a GPU the host's wall time says nothing of the device's work: no split)."""
    details = {"bytes_per_step": bytes_per_step(run_step)}
    details["matmul_share"], details["non_matmul"], pytorch_share = non_matmul_breakdown(run_step, profile_steps)
    if device.type != "cpu":
        return details
    c_share, c_functions = c_kernel_time(run_step, profile_steps)
    details["step_shares"] = {"c_kernels": c_share, "pytorch_operators": pytorch_share,
                              "outside_operators": max(0.0, 1.0 - c_share - pytorch_share)}
    details["bytes_complete"] = c_functions <= BYTES_COUNTED_C_FUNCTIONS
    return details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of reference and vitlab per config")
    parser.add_argument("--profile-steps", type=int, default=5, help="steps profiled for the per-operator breakdown (0: none)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where vitlab's side runs (the reference runs on the CPU)")
    parser.add_argument("--compile", default="off", choices=["off", "on", "both"],
                        help="vitlab side with torch.compile; both: each configuration eager and compiled in the same rounds (two rows)")
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
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is visible")

    from vitlab.kernels import kernel_status
    from vitlab.kernels.cores import core_round_trip_ns
    from vitlab.provenance import cpu_description

    root = str(locate_cifar10(args.data_dir, download_if_missing=False).parent)
    data = load_cifar10(root)
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16, device), matmul_peak(torch.float32, device)
    bandwidth = copy_bandwidth(device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    # On the CPU: how far apart the threads' cores are (a shared L3 or not), which moves vitlab's steps (docs/performance.md)
    probe_cores = core_round_trip_ns if device.type == "cpu" else None
    round_trip = probe_cores() if probe_cores else None
    cores = f"; cores' cache-line round trip {round_trip:.0f} ns" if round_trip is not None else ""
    print(f"{machine}, torch {torch.__version__}, {torch.get_num_threads()} threads; same-run peaks: bf16 matmul {peak_bf16:.3f} TFLOP/s, "
          f"fp32 {peak_fp32:.3f} TFLOP/s (2048³, best of 5 × 5); copy {bandwidth:.1f} GB/s (read + write){cores}", flush=True)
    kernels = kernel_status() if device.type == "cpu" else None
    if kernels:
        print(f"vitlab's CPU kernels: {kernels}", flush=True)
    loader = None if args.skip_reference else reference_loader(root, args.batch_size)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows = []
    for name in args.configs.split(","):
        model_name, model_config = CONFIGS[name]
        model_config = with_dropout(model_name, model_config, args.vit_dropout)
        torch.manual_seed(0)
        model = build_model(model_name, **model_config)
        flops = train_flops_per_image(model)
        facts = {"config": name, "params": model.num_parameters,
                 "reference_params": None if name in WITHOUT_REFERENCE else sum(p.numel() for p in build_reference(model_name, model_config).parameters()),
                 "dropout": model_config.get("dropout", 0.0), "train_mflop_per_image": flops / 1e6}
        reference = []
        measured = {compiled: [] for compiled in modes}  # per round: (img/s, precision, peaks probed around it, details)
        for round_index in range(args.rounds):
            if loader is not None and name not in WITHOUT_REFERENCE:
                torch.manual_seed(0)
                reference.append(time_reference(build_reference(model_name, model_config), loader, args.steps, args.warmup))
            for compiled in modes:  # eager and compiled alternate within each round
                config = TrainConfig(batch_size=args.batch_size, precision=args.precision, device=args.device, progress=False, compile=compiled)
                torch.manual_seed(0)
                last = round_index == args.rounds - 1
                measured[compiled].append(time_vitlab(build_model(model_name, **model_config), data, config, args.steps, args.warmup,
                                                      profile_steps=args.profile_steps if last else 0,
                                                      probe_peak=lambda: matmul_peak(torch.bfloat16, device), probe_cores=probe_cores))
        for compiled, rounds in measured.items():
            best, precision, peaks, best_details = max(rounds, key=lambda round_: round_[0])
            details = rounds[-1][3]  # only the last round is profiled
            row = {
                **facts, "compiled": compiled, "reference_img_s": max(reference) if reference else None,
                "vitlab_img_s": best, "vitlab_precision": precision, "speedup": best / max(reference) if reference else None,
                "vitlab_tflop_s": best * flops / 1e12, "share_of_bf16_peak": best * flops / 1e12 / peak_bf16,
                # the peak probed just before and just after the best round
                "local_bf16_peaks": peaks, "share_of_local_bf16_peak": best * flops / 1e12 / (sum(peaks) / 2),
                "rounds_img_s": [round_[0] for round_ in rounds],
                # the cores' cache-line round trip just before and just after the best round (None: not probed)
                "core_round_trips_ns": best_details.get("core_round_trips_ns"),
            }
            if "bytes_per_step" in details:
                row["bandwidth_gb_s"] = details["bytes_per_step"] * best / args.batch_size / 1e9
                row["share_of_copy_bandwidth"] = row["bandwidth_gb_s"] / bandwidth
                row["matmul_share_of_op_time"] = details["matmul_share"]
                row["largest_non_matmul_ops"] = details["non_matmul"]
            if "step_shares" in details:  # of the CPU step's wall time: C kernels, PyTorch's operators, the rest (Python, autograd)
                row["step_shares"] = details["step_shares"]
                if details["bytes_complete"]:  # every kernel's traffic counted: the roofline's verdict
                    row["flop_per_byte"] = flops * args.batch_size / details["bytes_per_step"]
                    row["bound"] = bound(row["flop_per_byte"], peak_bf16 * 1e3 / bandwidth)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n| config | params | train MFLOP/img | reference img/s | vitlab img/s | speed-up | vitlab TFLOP/s | % of bf16 peak ({peak_bf16:.2f}) "
          f"| % of the peak probed around it (before / after) | cores' round trip around it (ns) "
          f"| GB/s (% of copy {bandwidth:.0f}) | FLOP/byte (ridge {peak_bf16 * 1e3 / bandwidth:.0f}): bound "
          f"| step: C kernels / PyTorch operators / outside operators | matmul share | largest other operators (share of op time) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        reference = f"{row['reference_img_s']:,.0f}" if row["reference_img_s"] else "-"
        speedup = f"{row['speedup']:.1f}×" if row["speedup"] else "-"
        label = row["config"] + (f" (dropout {row['dropout']:g})" if row["dropout"] else "") + (", compiled" if row["compiled"] else "")
        traffic = f"{row['bandwidth_gb_s']:.1f} ({100 * row['share_of_copy_bandwidth']:.0f}%)" if "bandwidth_gb_s" in row else "-"
        matmul = f"{100 * row['matmul_share_of_op_time']:.0f}%" if "matmul_share_of_op_time" in row else "-"
        roofline = f"{row['flop_per_byte']:.0f}: {row['bound']}" if "bound" in row else "-"
        shares = " / ".join(f"{100 * share:.0f}%" for share in row["step_shares"].values()) if "step_shares" in row else "-"
        others = ", ".join(f"{op} {100 * share:.0f}%" for op, share in row.get("largest_non_matmul_ops", [])[:4]) or "-"
        trips = row.get("core_round_trips_ns")
        round_trips = " / ".join(f"{trip:.0f}" for trip in trips) if trips and None not in trips else "-"
        print(f"| {label} | {row['params']:,} | {row['train_mflop_per_image']:,.1f} | {reference} | "
              f"{row['vitlab_img_s']:,.0f} ({row['vitlab_precision']}) | {speedup} | {row['vitlab_tflop_s']:.3f} | "
              f"{100 * row['share_of_bf16_peak']:.1f}% | {100 * row['share_of_local_bf16_peak']:.1f}% "
              f"({row['local_bf16_peaks'][0]:.2f} / {row['local_bf16_peaks'][1]:.2f}) | {round_trips} | {traffic} | {roofline} | {shares} "
              f"| {matmul} | {others} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "cpu_kernels": kernels, "peak_bf16_tflop_s": peak_bf16, "peak_fp32_tflop_s": peak_fp32, "copy_gb_s": bandwidth,
                       "core_round_trip_ns": round_trip,
                       "rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args)}, handle, indent=2)


if __name__ == "__main__":
    run_script(main)
