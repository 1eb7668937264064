"""Data-parallel training through `torch.distributed`, launched by `torchrun`.

    torchrun --nproc_per_node 4 -m vitlab train --model vit --batch_size 512 ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; vitlab then joins the process group
(NCCL on GPUs, gloo on CPUs), puts each process on its own GPU (cuda:LOCAL_RANK), gives it a
contiguous 1/WORLD_SIZE slice of every global batch (`--batch_size` is the global batch), averages
gradients through DistributedDataParallel, all-reduces the training metrics, and lets only rank 0
write files. Without those variables nothing here does anything.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vitlab.errors import VitlabError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def context_from_environment(device_choice: str = "auto") -> DistContext:
    """Join the process group torchrun describes (once per process); a single process gets SINGLE."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    context = DistContext(rank=int(os.environ["RANK"]), world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_choice in ("auto", "cuda")
        if use_cuda:
            if context.local_rank >= torch.cuda.device_count():
                raise VitlabError(f"LOCAL_RANK {context.local_rank} but only {torch.cuda.device_count()} GPUs; "
                                  "lower --nproc_per_node to the number of GPUs")
            torch.cuda.set_device(context.local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return context


def no_gradient_sync(train_forward: torch.nn.Module):
    """A context in which backward passes through `train_forward` accumulate gradients without averaging them over
    the processes (DistributedDataParallel's no_sync, also through torch.compile's wrapper); a no-op for a plain model."""
    wrapped = getattr(train_forward, "_orig_mod", train_forward)
    return wrapped.no_sync() if hasattr(wrapped, "no_sync") else contextlib.nullcontext()


def all_reduce_sum(values: torch.Tensor, context: DistContext) -> torch.Tensor:
    """The sum over ranks of `values` (a new tensor; the input is untouched)."""
    total = values.clone()
    if context.enabled:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def barrier(context: DistContext) -> None:
    if context.enabled:
        dist.barrier()


def any_rank(flag: bool, context: DistContext, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any (so all ranks stop at the same step)."""
    if not context.enabled:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device), context).item() > 0)


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
