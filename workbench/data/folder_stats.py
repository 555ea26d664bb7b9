"""Per-channel normalisation statistics of a folder's training split, computed once and cached
beside the data in ``<root>/.workbench-stats.json`` (written atomically).

An entry is keyed by everything that changes the numbers: the task, the working size, the channel
count, the split seed and the fingerprint of the files (names, sizes, modification times), so
editing the data or asking for another size computes fresh statistics instead of reusing stale ones.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from workbench.io import write_json_atomic

STATS_FILE = ".workbench-stats.json"
_MIN_STD = 1e-3  # a constant channel would divide by zero; it is left centred, not scaled up


def stats_key(task: str, size: tuple[int, int], channels: int, split_seed: int, fingerprint: str) -> str:
    """The cache entry's name: everything the statistics depend on."""
    return f"{task}|size={size[0]}x{size[1]}|channels={channels}|split_seed={split_seed}|files={fingerprint}"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def channel_stats(images: Sequence[Path], load: Callable[[Path], torch.Tensor],
                  progress: bool = True) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std per channel over every pixel of ``images``; ``load`` gives a float (C, H, W) image."""
    from tqdm.auto import tqdm

    total = squares = None
    pixels = 0
    for path in tqdm(images, desc="normalisation statistics", disable=not progress or len(images) < 500):
        x = load(path).to(torch.float64)
        flat = x.reshape(x.shape[0], -1)
        total = flat.sum(1) if total is None else total + flat.sum(1)
        squares = flat.square().sum(1) if squares is None else squares + flat.square().sum(1)
        pixels += flat.shape[1]
    mean = total / pixels
    std = (squares / pixels - mean.square()).clamp_min(0).sqrt().clamp_min(_MIN_STD)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def cached_channel_stats(root: Path, key: str, images: Sequence[Path],
                         load: Callable[[Path], torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`channel_stats` of ``images``, read from ``root/.workbench-stats.json`` when ``key`` is
    there, else computed and added to it. A folder that cannot be written to (read-only data) is
    used all the same; the statistics are then computed in every process."""
    path = root / STATS_FILE
    cache = _read_cache(path)
    entry = cache.get(key)
    if isinstance(entry, dict) and "mean" in entry and "std" in entry:
        return tuple(entry["mean"]), tuple(entry["std"])
    mean, std = channel_stats(images, load)
    cache[key] = {"mean": list(mean), "std": list(std), "images": len(images)}
    try:
        write_json_atomic(path, cache)
    except OSError as exc:
        warnings.warn(f"{path}: normalisation statistics not cached ({exc.strerror}); they are recomputed "
                      "in each process", stacklevel=2)
    return mean, std
