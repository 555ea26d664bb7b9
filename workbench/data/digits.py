"""The embedded default dataset: scikit-learn's bundled handwritten digits, as 3x32x32 images.

1,797 real 8x8 scans (values 0..16) ship inside scikit-learn, so every notebook runs with no
download. The train/test split is fixed (stratified, ``random_state=0``) and independent of any
experiment seed: results from different seeds are then comparable on the same test images.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from ._validate import check_bool, check_choice, check_int
from .in_memory import InMemoryImageDataset

DIGITS_SPLITS = ("train", "test")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_CLASSES = tuple(str(d) for d in range(10))


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels,
        random_state=DIGITS_SPLIT_SEED)
    # sorted so the stored order is the original file order; shuffling is the loader's job
    splits = {"train": np.sort(train_idx), "test": np.sort(test_idx)}
    for array in (images, labels, *splits.values()):
        array.setflags(write=False)
    return images, labels, splits


def digit_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images, labels, indices)`` of one split at the native 8x8, intensities scaled to [0, 1].

    ``indices`` index into ``sklearn.datasets.load_digits()``. Arrays are read-only (shared cache).
    """
    check_choice("split", split, DIGITS_SPLITS)
    images, labels, splits = _load()
    idx = splits[split]
    return images[idx], labels[idx], idx


@functools.lru_cache(maxsize=4)
def _prepared(size: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float, float]:
    # upsample the whole set once: 1,797 images, a few milliseconds
    images, labels, splits = _load()
    x = F.interpolate(torch.tensor(images)[:, None], size=(size, size), mode="bilinear",
                      align_corners=False)
    train = x[torch.tensor(splits["train"])]
    mean, std = float(train.mean()), float(train.std())
    x = ((x - mean) / std).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(labels)
    xs = {s: x[torch.tensor(i)] for s, i in splits.items()}
    ys = {s: y[torch.tensor(i)] for s, i in splits.items()}
    return xs, ys, mean, std


class DigitsDataset(InMemoryImageDataset):
    """scikit-learn digits upsampled (bilinear) to ``size`` x ``size``, 3 identical channels.

    Normalised with the mean/std of the train split at that size. Items are
    ``(image float32 (3, size, size), label int)``. With ``augment=True`` each access applies a
    random shift (pad ``size // 16`` with the background value, random crop back), drawn from
    torch's global RNG: reproducible after ``seed_everything`` and, in loader workers, from the
    loader's seed.
    """

    name = "digits"
    task = "classification"
    num_classes = 10
    classes = DIGITS_CLASSES
    in_channels = 3
    ignore_index = None

    def __init__(self, split: str = "train", size: int = 32, augment: bool = False) -> None:
        self.split = check_choice("split", split, DIGITS_SPLITS)
        self.size = check_int("size", size, minimum=8)
        self.augment = check_bool("augment", augment)
        xs, ys, mean, std = _prepared(self.size)
        self.images = xs[split]
        self.targets = ys[split]
        self.source_indices = torch.tensor(_load()[2][split])
        self.mean = (mean,) * 3
        self.std = (std,) * 3
        self.image_size = (self.size, self.size)
        self.background_value = -mean / std
        self._augment = (v2.RandomCrop(self.size, padding=max(1, self.size // 16), fill=self.background_value)
                         if augment else None)

    def __repr__(self) -> str:
        return (f"DigitsDataset(split={self.split!r}, size={self.size}, augment={self.augment}, "
                f"n={len(self)})")
