"""Which samples form each training batch: a seeded permutation per epoch, sharded by rank, resumable.

One `DataLoader` serves a whole run (`training_loader`): its worker processes stay alive and prefetch
while the model computes. Workers hold their own copy of the dataset, so each index carries its epoch
(`EpochBatches` tags it, `EpochIndexed` reads it): a sample depends only on (seed, epoch, index), in any
worker, which keeps `--resume` exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochBatches", "EpochIndexed", "EpochSampler", "training_loader"]


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded by rank, that can start mid-epoch (for exact resume).

    Every rank draws the same permutation of `size` indices (seed + epoch), padded by wrapping to a
    multiple of `world_size`, and takes every `world_size`-th index from `rank` on.
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use the permutation of `epoch` and leave out this rank's first `skip` indices."""
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        per_rank = math.ceil(self.size / self.world_size)
        order += order[: per_rank * self.world_size - self.size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip :])

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size) - self.skip


class EpochBatches(Sampler[list[int]]):
    """Batches of `EpochSampler`'s indices, epoch after epoch without end, each index tagged with its
    epoch (`epoch * size + index`); the last incomplete batch of an epoch is dropped."""

    def __init__(self, sampler: EpochSampler, batch_size: int, size: int, epoch: int, batch: int) -> None:
        self.sampler, self.batch_size, self.size = sampler, batch_size, size
        self.start = (epoch, batch)
        sampler.set_epoch(epoch, skip=0)
        self.per_epoch = len(sampler) // batch_size

    def __iter__(self) -> Iterator[list[int]]:
        epoch, batch = self.start
        while True:
            self.sampler.set_epoch(epoch, skip=batch * self.batch_size)
            order = list(self.sampler)
            for first in range(0, len(order) - self.batch_size + 1, self.batch_size):
                yield [epoch * self.size + index for index in order[first : first + self.batch_size]]
            epoch, batch = epoch + 1, 0


class EpochIndexed(Dataset):
    """A dataset read with epoch-tagged indices (`EpochBatches`): sets its epoch, then returns the sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.epoch = dataset, None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, tagged: int) -> Any:
        epoch, index = divmod(tagged, len(self.dataset))
        if epoch != self.epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.epoch = epoch
        return self.dataset[index]


def _loader_workers(configured: int | None, device: torch.device) -> int:
    """`data.num_workers`, or by default one worker on CPU (the cores compute) and two on a GPU."""
    if configured is not None:
        return configured
    return 1 if device.type == "cpu" else 2


def _one_thread(worker_id: int) -> None:
    """Data workers compute on one thread each: the model's step has the cores."""
    torch.set_num_threads(1)


def training_loader(dataset: Dataset, batches: EpochBatches, workers: int | None, device: torch.device) -> DataLoader:
    """The run's one loader: `workers` processes (None: `_loader_workers`) each prefetching two batches."""
    workers = _loader_workers(workers, device)
    return DataLoader(EpochIndexed(dataset), batch_sampler=batches, num_workers=workers, persistent_workers=workers > 0,
                      prefetch_factor=2 if workers else None, worker_init_fn=_one_thread if workers else None)  # fmt: skip
