"""What a training round needs to run under torch DDP: its rank, sharding, and agreed decisions.

Every collective here is reached by all ranks the same number of times: ranks get equally many
work items (short shards are padded by cycling), and a decision that depends on a rank's own
clock or results (stop for time, a validation cut short) is agreed on before anyone acts on it.
With one process every method is a plain local operation.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class Rank:
    """This process's place in the process group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Rank":
        """The initialised process group's rank and size, or a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every rank gets ``ceil(n / world)`` of them (cycling when short)."""
        if not self.distributed or not items:
            return list(items)
        per_rank = -(-len(items) // self.world)
        return [items[(self.rank + k * self.world) % len(items)] for k in range(per_rank)]

    def all_agree(self, flag: bool) -> bool:
        """True only when ``flag`` is true on every rank."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def gather(self, obj: T) -> list[T]:
        """``obj`` from every rank, in rank order."""
        if not self.distributed:
            return [obj]
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` under DistributedDataParallel (parameters taken from rank 0), or as it is.

        Unused parameters are allowed: SAM's decoder computes an IoU head and extra mask tokens that
        the losses here do not use.
        """
        if not self.distributed:
            return module
        device = next(module.parameters()).device
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


def exit_rank() -> NoReturn:
    """End a spawned rank whose work returned normally, after ``dist.destroy_process_group()``: flush and leave at
    once. A normal interpreter exit can abort there (SIGABRT, "terminate called without an active exception") while
    the process group's threads are torn down, and the launcher then reports a rank that finished as failed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
