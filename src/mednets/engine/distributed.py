"""Distributed data parallel through `torchrun`: process-group set-up and cross-rank reductions.

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them training
runs as a single process. CPU uses the gloo backend, CUDA nccl.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mednets.devices import resolve_device

__all__ = ["DistributedContext", "init_distributed", "all_reduce_sum", "barrier", "shutdown_distributed"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank, the number of processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group when launched by `torchrun` (WORLD_SIZE > 1); else a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device, source="train.device", local_rank=local_rank)
    if world_size > 1 and not dist.is_initialized():
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum `tensor` over all processes (a no-op in a single process); returns the summed tensor."""
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(context: DistributedContext) -> None:
    """Wait for every process."""
    if context.enabled:
        dist.barrier()


def broadcast_from_main(value: Any, context: DistributedContext) -> Any:
    """The main process's `value` in every process (JSON-like data; a no-op in a single process)."""
    if not context.enabled:
        return value
    box = [value if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
