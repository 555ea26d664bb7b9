"""Segmentation scenes composed from classification items: ``digit-scenes`` and ``fashion-scenes``.

Each scene is a textured background with a few items (digits, or Fashion-MNIST photos) pasted at
random, non-overlapping positions. Pixels whose (resized) item intensity exceeds ``threshold`` take
the item's label ``class + 1``; all other pixels are background ``0``. Compositing is hard-masked,
so every labelled pixel is a pasted item pixel and every background pixel is untouched background:
image/label alignment is exact. Scenes are rendered on the fly from a generator seeded by
``(seed, split, index)``: the same triple always gives the same scene, in any process.
Train scenes use only train-split items and test scenes only test-split items.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ._validate import check_choice, check_float, check_int
from .digits import DIGITS_CLASSES, digit_split
from .fashion import FASHION_CLASSES, FASHION_SUBSETS, fashion_split

SCENE_SPLITS = ("train", "test")
SCENE_CLASSES = ("background", *DIGITS_CLASSES)
FASHION_SCENE_CLASSES = ("background", *FASHION_CLASSES)
SCENE_SOURCES = ("digits", "fashion-mnist")
SCENE_DEFAULT_LENGTH = {"train": 512, "test": 128}
_SPLIT_CODE = {"train": 0, "test": 1}
_STATS_SCENES = 64


@dataclass(frozen=True)
class SceneSource:
    """Where a scene's items come from: ``"digits"``, or ``"fashion-mnist"`` with its subset and root."""

    dataset: str = "digits"
    subset: str = "quick"
    root: Path | None = None

    def __post_init__(self) -> None:
        check_choice("source", self.dataset, SCENE_SOURCES)
        check_choice("subset", self.subset, FASHION_SUBSETS)

    def items(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(images float (N,h,w) in [0,1], labels (N,), indices into the source)`` of ``split``."""
        if self.dataset == "digits":
            return digit_split(split)
        return fashion_split(split, self.subset, self.root)


@dataclass(frozen=True)
class SceneGeometry:
    """Everything that shapes a scene apart from the seed, split and index (hashable: a cache key)."""

    size: int
    min_items: int
    max_items: int
    min_item_size: int
    max_item_size: int
    threshold: float
    source: SceneSource = field(default_factory=SceneSource)


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a (..., h, w) float array to (..., size, size)."""
    # a copy: items may be read-only views of a shared cache, which torch will not wrap
    t = torch.tensor(array, dtype=torch.float32)
    lead = t.shape[:-2]
    t = t.reshape(-1, 1, *t.shape[-2:])
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, size, size).numpy()


def scene_geometry(size: int, min_items: int, max_items: int, min_item_size: int | None,
                   max_item_size: int | None, threshold: float, source: SceneSource,
                   noun: str = "item") -> SceneGeometry:
    """Validate scene options (named ``min_<noun>s``, ``min_<noun>_size``, ... in errors) into a geometry.

    Item sizes default to ``size // 4 .. size * 7 // 16`` (16..28 at 64)."""
    check_int("size", size, minimum=64)
    check_int(f"min_{noun}s", min_items, minimum=1)
    check_int(f"max_{noun}s", max_items, minimum=min_items)
    lo = size // 4 if min_item_size is None else check_int(f"min_{noun}_size", min_item_size, minimum=8)
    hi = (size * 7 // 16 if max_item_size is None
          else check_int(f"max_{noun}_size", max_item_size, minimum=lo, maximum=size))
    if lo > hi:
        raise ValueError(f"min_{noun}_size={lo} must be <= max_{noun}_size={hi}")
    threshold = check_float("threshold", threshold, minimum=0.0, maximum=0.99)
    return SceneGeometry(size, min_items, max_items, lo, hi, threshold, source)


class ComposedScenesDataset(Dataset):
    """Segmentation scenes of ``size`` x ``size`` pixels holding ``min_items..max_items`` pasted items.

    Items are ``(image float32 (3, size, size), mask int64 (size, size))`` with mask values in
    ``0..num_classes - 1`` (0 = background, ``c + 1`` = an item of class ``c``). Pasted items are
    ``min_item_size..max_item_size`` pixels square, each placed uniformly among the positions where
    its square overlaps no earlier item's square; an item with no such position left is skipped, so a
    crowded scene may hold fewer than ``min_items`` (never zero). Images are normalised with
    per-channel mean/std of the first 64 train scenes of seed 0 with the same geometry, so train and
    test share the same normalisation. Subclasses fix the item source and the class names.
    """

    task = "segmentation"
    in_channels = 3
    # no pixel is ever unlabelled here; the value is present so segmentation code is uniform
    ignore_index = 255

    def __init__(self, split: str, geometry: SceneGeometry, length: int | None, seed: int) -> None:
        self.split = check_choice("split", split, SCENE_SPLITS)
        self.length = (SCENE_DEFAULT_LENGTH[split] if length is None
                       else check_int("length", length, minimum=1))
        self.seed = check_int("seed", seed, minimum=0)
        self.geometry = geometry
        self.size = geometry.size
        self.threshold = geometry.threshold
        self.image_size = (geometry.size, geometry.size)
        mean, std = _scene_stats(self.geometry)
        self.mean, self.std = mean, std
        self._mean = torch.tensor(mean).view(3, 1, 1)
        self._std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> dict[str, Any]:
        """Render scene ``index`` un-normalised: ``image`` (3,S,S) in [0,1], ``mask`` (S,S) int64,
        ``background`` (3,S,S) (the image before pasting) and ``placements`` (one dict per item:
        ``label`` (mask value), ``class_index``, ``source_index`` into the item source's split (see
        :meth:`SceneSource.items`), ``top``, ``left``, ``size``, ``pixels`` (bool (size,size) footprint))."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes")
        return render_scene(self.geometry, self.split, self.seed, index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += self.length
        s = self.scene(index)
        return (s["image"] - self._mean) / self._std, s["mask"]

    def tensors(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All scenes as ``(X (N,3,S,S) float32, masks (N,S,S) int64)`` (about 25 MB at 512x64x64)."""
        items = [self[i] for i in range(self.length)]
        x = torch.stack([i[0] for i in items])
        y = torch.stack([i[1] for i in items])
        if device is not None:
            x, y = x.to(device), y.to(device)
        return x, y

    def __repr__(self) -> str:
        g = self.geometry
        return (f"{type(self).__name__}(split={self.split!r}, size={self.size}, length={self.length}, "
                f"seed={self.seed}, items={g.min_items}..{g.max_items}, "
                f"item_size={g.min_item_size}..{g.max_item_size})")


class DigitScenesDataset(ComposedScenesDataset):
    """``digit-scenes``: :class:`ComposedScenesDataset` of the embedded digits, mask ``d + 1`` = digit ``d``.

    ``min_digits`` / ``max_digits`` / ``min_digit_size`` / ``max_digit_size`` are the item counts and
    sizes; placements also carry ``digit`` (= ``class_index``), and ``source_index`` indexes
    ``load_digits()``.
    """

    name = "digit-scenes"
    num_classes = len(SCENE_CLASSES)
    classes = SCENE_CLASSES

    def __init__(self, split: str = "train", size: int = 64, length: int | None = None, seed: int = 0,
                 min_digits: int = 2, max_digits: int = 4, min_digit_size: int | None = None,
                 max_digit_size: int | None = None, threshold: float = 0.3) -> None:
        geometry = scene_geometry(size, min_digits, max_digits, min_digit_size, max_digit_size, threshold,
                                  SceneSource("digits"), noun="digit")
        super().__init__(split, geometry, length, seed)
        self.min_digits, self.max_digits = geometry.min_items, geometry.max_items
        self.digit_size_range = (geometry.min_item_size, geometry.max_item_size)


class FashionScenesDataset(ComposedScenesDataset):
    """``fashion-scenes``: :class:`ComposedScenesDataset` of Fashion-MNIST photos, mask ``c + 1`` = class ``c``.

    ``subset`` picks the items' source (``"quick"``: the shipped subset; ``"full"``: the whole set
    from ``root`` or Debian's package). The default ``threshold`` is 0.1, lower than the digits'
    0.3: dark garments have many faint pixels inside their outline (about 10% of an image's pixels
    lie in (0, 0.3], 5% in (0, 0.1]) that would otherwise become holes labelled background.
    """

    name = "fashion-scenes"
    num_classes = len(FASHION_SCENE_CLASSES)
    classes = FASHION_SCENE_CLASSES

    def __init__(self, split: str = "train", subset: str = "quick", size: int = 64, length: int | None = None,
                 seed: int = 0, min_items: int = 2, max_items: int = 4, min_item_size: int | None = None,
                 max_item_size: int | None = None, threshold: float = 0.1, root: Path | None = None) -> None:
        source = SceneSource("fashion-mnist", subset, None if subset == "quick" else root)
        geometry = scene_geometry(size, min_items, max_items, min_item_size, max_item_size, threshold, source)
        super().__init__(split, geometry, length, seed)
        self.subset = subset


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    # smooth colour blotches (coarse noise, upsampled) plus fine grain: texture a net must
    # learn to ignore, darker on average than the pasted items but overlapping in range
    base = rng.uniform(0.1, 0.4, size=(3, 1, 1))
    coarse = _resize(rng.standard_normal((3, 8, 8)), size) * 0.1
    fine = rng.standard_normal((3, size, size)) * 0.04
    return np.clip(base + coarse + fine, 0.0, 1.0).astype(np.float32)


def _free_positions(occupied: np.ndarray, s: int) -> np.ndarray:
    """``(k, 2)`` top-left corners where an ``s`` x ``s`` box touches no occupied pixel."""
    sat = np.zeros((occupied.shape[0] + 1, occupied.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = occupied.cumsum(0).cumsum(1)
    n = occupied.shape[0] - s + 1
    box_sums = sat[s:s + n, s:s + n] - sat[:n, s:s + n] - sat[s:s + n, :n] + sat[:n, :n]
    return np.argwhere(box_sums == 0)


def render_scene(geometry: SceneGeometry, split: str, seed: int, index: int) -> dict[str, Any]:
    """Scene ``index`` of ``split`` for ``seed`` (see ``ComposedScenesDataset.scene``); a pure function."""
    check_choice("split", split, SCENE_SPLITS)
    items, item_labels, item_source = geometry.source.items(split)
    size, threshold = geometry.size, geometry.threshold
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], index]))
    background = _background(rng, size)
    image = background.copy()
    mask = np.zeros((size, size), dtype=np.int64)
    count = int(rng.integers(geometry.min_items, geometry.max_items + 1))
    occupied = np.zeros((size, size), dtype=bool)
    placements = []
    for _ in range(count):
        j = int(rng.integers(len(items)))
        s = int(rng.integers(geometry.min_item_size, geometry.max_item_size + 1))
        colour = rng.uniform(0.65, 1.0, size=(3, 1, 1)).astype(np.float32)
        free = _free_positions(occupied, s)
        if len(free) == 0:
            continue
        top, left = (int(v) for v in free[rng.integers(len(free))])
        occupied[top:top + s, left:left + s] = True
        intensity = np.clip(_resize(items[j], s), 0.0, 1.0)
        pixels = intensity > threshold
        label = int(item_labels[j]) + 1
        region = image[:, top:top + s, left:left + s]
        region[:, pixels] = (colour * (0.55 + 0.45 * intensity))[:, pixels]
        mask[top:top + s, left:left + s][pixels] = label
        placements.append({"label": label, "class_index": label - 1, "source_index": int(item_source[j]),
                           "top": top, "left": left, "size": s, "pixels": pixels})
        if geometry.source.dataset == "digits":
            placements[-1]["digit"] = label - 1
    return {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask),
            "background": torch.from_numpy(background), "placements": placements}


@functools.lru_cache(maxsize=16)
def _scene_stats(geometry: SceneGeometry) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = torch.stack([render_scene(geometry, "train", 0, i)["image"] for i in range(_STATS_SCENES)])
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
