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
