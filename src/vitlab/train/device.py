"""Choosing the device and the numeric precision."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from vitlab.config import TrainConfig
from vitlab.errors import VitlabError
from vitlab.kernels import switch_kernels
from vitlab.train.distributed import SINGLE, DistContext
from vitlab.train.host_memory import keep_freed_memory


def pick_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA, then Apple MPS, then the CPU; a named device must exist."""
    mps_available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise VitlabError("--device cuda was asked for but no CUDA GPU is visible; use --device auto or cpu")
    if name == "mps" and not mps_available:
        raise VitlabError("--device mps was asked for but Apple MPS is not available; use --device auto or cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX-512 BF16 units, where bf16 matmuls beat fp32 (docs/performance.md)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn 'auto' into 'bf16' or 'fp32' for this device, and refuse bf16 where it cannot run."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_has_native_bf16(device) else "fp32"
        if device.type == "cpu":
            return "bf16" if cpu_has_fast_bf16() else "fp32"
        return "fp32"
    if precision == "bf16" and device.type == "cuda" and not cuda_has_native_bf16(device):
        raise VitlabError(f"{torch.cuda.get_device_name(device)} has no native bf16 (it needs compute capability 8.0, Ampere or "
                          "newer; older GPUs only emulate it, slowly, and cuDNN has no bf16 convolutions there); use --precision fp32")
    return precision


def cuda_has_native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores: compute capability 8.0 or newer. `torch.cuda.is_bf16_supported()` is also True
    where bf16 is only emulated (T4, V100), so it is not the test."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def autocast(device: torch.device, precision: str):
    """bf16 autocast for matmuls and convolutions; weights, optimizer state and losses stay fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format_for(model: nn.Module, config: TrainConfig) -> torch.memory_format:
    """channels_last for models with real convolutions when the config asks for it (it helps them in bf16,
    docs/performance.md); a ViT's patchify conv (kernel = stride) gains nothing."""
    has_convolutions = any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in model.modules())
    return torch.channels_last if config.channels_last and has_convolutions else torch.contiguous_format


@dataclass
class Placement:
    """A model on its training device, with how it runs there."""

    model: nn.Module
    device: torch.device
    precision: str  # 'bf16' or 'fp32', resolved
    memory_format: torch.memory_format
    forward: nn.Module  # what evaluation calls: the model, or its compiled wrapper
    train_forward: nn.Module  # what training calls: the above, wrapped in DDP under torchrun


def place_model(model: nn.Module, config: TrainConfig, distributed: DistContext = SINGLE) -> Placement:
    """Move `model` to its device and memory format and wrap it for compilation and data parallelism."""
    device = pick_device(config.device)
    if distributed.enabled and device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch
    precision = resolve_precision(config.precision, device)
    switch_kernels(config.cpu_kernels)
    if device.type == "cpu":
        keep_freed_memory()  # a step's large activations reused by the next, not faulted in again
    if device.type == "cuda":
        # Fixed shapes every step: let cuDNN pick the fastest convolution once; TF32 for fp32 matmuls.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    memory_format = memory_format_for(model, config)
    model = model.to(device, memory_format=memory_format)
    if distributed.enabled:  # every rank drew the same initial weights; now each draws its own dropout masks
        torch.manual_seed(config.seed + 100_003 * distributed.rank)
    if config.compile and distributed.enabled and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        raise VitlabError("--compile with several processes and BatchNorm (SyncBatchNorm) is a combination PyTorch does not "
                          "compile; drop --compile or train with one process")
    # The compiled wrapper shares its parameters with the model, which is what gets saved.
    forward = torch.compile(model) if config.compile else model
    train_forward = forward
    if distributed.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        train_forward = torch.compile(ddp) if config.compile else ddp
    return Placement(model, device, precision, memory_format, forward, train_forward)
