"""torch.distributed glue for ``torchrun``: one process per device, rank 0 does all the writing.

Under ``torchrun --nproc_per_node N stages/train.py ...`` every process gets
RANK/WORLD_SIZE/LOCAL_RANK in its environment. Each rank holds the whole
(small) split on its device, draws the same seeded permutation, and trains on
its own slice of every global batch; DDP averages the gradients, so a step sees
exactly the global batch that single-process training would see. Without those
variables everything here is a no-op and training is single-process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mnistlab.errors import MnistlabError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` (world 1 = not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise MnistlabError("RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun)") from None
    return Dist(rank, world, local)


def init(d: Dist, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); return this rank's device."""
    if not d.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return device


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_sum(d: Dist, *tensors: torch.Tensor) -> None:
    """In-place sum across ranks (epoch totals only: once per epoch, never per step)."""
    if d.enabled:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_object(d: Dist, obj):
    """Rank 0's ``obj`` on every rank (e.g. the MLflow run id)."""
    if not d.enabled:
        return obj
    box = [obj if d.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


SINGLE = Dist()  # a plain single-process run (the default everywhere)
