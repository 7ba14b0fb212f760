"""DistributedDataParallel plumbing for ``torchrun`` (NCCL on GPU, gloo on CPU). One process logs.

Each process holds only its share of the data (MONAI's BraTS DDP tutorial):

* training: ``partition`` -- a seeded shuffle of the training cases cut into ``world_size`` equal parts, fixed for
  the run; each process caches and samples only its part (``cache: memory`` costs the RAM of one part, not of the
  data set);
* validation: ``shard`` -- every ``world_size``-th case from the process's rank; each process validates its cases,
  ``gather`` collects the per-case results and ``unshard`` puts them back in case order, so the epoch's validation
  metrics equal a single process's for the same weights.

For one process ``partition`` and ``shard`` return every case in its order, and ``gather`` returns ``[obj]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from monai.data import partition_dataset

from medseg_diff.runtime import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank), device


def mean_across(value: float, info: DistInfo, device: torch.device) -> float:
    """The mean of ``value`` over all processes (identity for one process)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """``obj`` of every process, in rank order (``[obj]`` for one process); picklable objects only."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def partition(items: Sequence[T], info: DistInfo, seed: int) -> list[T]:
    """This process's part of the training cases: ``items`` shuffled with ``seed`` (the same order on every
    process) and cut into ``world_size`` parts of equal length, the short ones padded with cases from the start
    (``monai.data.partition_dataset(..., shuffle=True, even_divisible=True)``), so that every process runs the same
    number of steps per epoch. With fewer cases than processes each process gets one case, some the same."""
    if not info.enabled:
        return list(items)
    items = list(items)
    if items and len(items) < info.world_size:  # partition_dataset refuses that: one case per process
        items = (items * info.world_size)[:info.world_size]
    return partition_dataset(items, num_partitions=info.world_size, shuffle=True, seed=seed,
                             even_divisible=True)[info.rank]


def shard(items: Sequence[T], info: DistInfo) -> list[T]:
    """This process's validation cases: every ``world_size``-th from its rank, as
    ``monai.data.DistributedSampler(shuffle=False, even_divisible=False)`` picks them: no case twice, none left
    out, shares differing by at most one case (a process may have none)."""
    return list(items[info.rank::info.world_size])


def unshard(shares: Sequence[Sequence[T]]) -> list[T]:
    """The items of every process's ``shard`` (``shares[rank]``, as ``gather`` returns them) in their order."""
    longest = max((len(s) for s in shares), default=0)
    return [s[j] for j in range(longest) for s in shares if j < len(s)]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
