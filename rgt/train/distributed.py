"""Process-group setup from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT).

NCCL on GPUs, Gloo on CPU. One process per GPU: `batch_size_per_gpu` is per process, so the effective batch is
batch_size_per_gpu x WORLD_SIZE (x accumulate), as in BasicSR.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(num_gpu: int | str = "auto") -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick this process's device.

    num_gpu: 0 forces the CPU; "auto" uses CUDA when available.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and num_gpu != 0
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return Dist(rank, local_rank, world, device)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast(d: Dist, obj: object) -> object:
    """Rank 0's `obj` on every rank (a picklable object, e.g. a path)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(d: Dist, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over ranks (for logging)."""
    if not d.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / d.world


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
