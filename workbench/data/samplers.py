"""Epoch-indexed shuffling: the order of epoch ``e`` depends only on ``(seed, e)``.

A resumed run (or a DDP rank) reproduces exactly the batches an uninterrupted run would have seen,
which a ``RandomSampler`` driven by a stateful generator cannot do. ``fit`` calls ``set_epoch``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    def __init__(self, length: int, seed: int = 0) -> None:
        self.length, self.seed, self.epoch = int(length), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class DistributedEpochSampler(Sampler[int]):
    """This rank's share of each *global* batch of an :class:`EpochShuffleSampler` order.

    Rank ``r`` of ``world_size`` takes positions ``[r*b, (r+1)*b)`` of every global batch of
    ``global_batch = world_size * b`` samples, so the union over ranks of step ``k``'s batches is
    exactly the batch a single process with the same seed and batch ``global_batch`` sees at step
    ``k``: a DDP run with synchronised BN statistics is then numerically comparable to one process.
    The trailing incomplete global batch is dropped (as ``drop_last`` would).
    """

    def __init__(self, length: int, global_batch: int, world_size: int, rank: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, {world_size})")
        self.length, self.global_batch, self.world_size, self.rank = int(length), global_batch, world_size, rank
        self.local_batch = global_batch // world_size
        self.order = EpochShuffleSampler(length, seed) if shuffle else None

    def set_epoch(self, epoch: int) -> None:
        if self.order is not None:
            self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        order = list(self.order) if self.order is not None else list(range(self.length))
        out = []
        for start in range(0, len(order) - self.global_batch + 1, self.global_batch):
            offset = start + self.rank * self.local_batch
            out.extend(order[offset:offset + self.local_batch])
        return iter(out)

    def __len__(self) -> int:
        return (self.length // self.global_batch) * self.local_batch
