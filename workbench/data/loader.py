"""A thin, seeded wrapper around ``DataLoader`` so shuffling is reproducible from one integer."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ._validate import check_bool, check_int
from .samplers import EpochShuffleSampler


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random are not, and
    # would otherwise repeat the same draws in every worker
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool | None = None,
    pin_memory: bool = False,
    persistent_workers: bool | None = None,
) -> DataLoader:
    """``DataLoader`` over ``dataset``: shuffled per epoch from ``(seed, epoch)`` when ``train``.

    ``drop_last=None`` drops the last incomplete batch when training and the dataset holds at
    least one full batch (a trailing batch of one sample breaks BatchNorm in training mode),
    and keeps everything for evaluation. Worker processes get numpy/random seeded from the
    loader's seed, so the same ``seed`` gives the same batches with or without workers.
    """
    check_int("batch_size", batch_size, minimum=1)
    check_bool("train", train)
    check_int("seed", seed, minimum=0)
    check_int("num_workers", num_workers, minimum=0)
    if drop_last is None:
        drop_last = train and len(dataset) >= batch_size
    check_bool("drop_last", drop_last)
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed) if train else None,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
    )
