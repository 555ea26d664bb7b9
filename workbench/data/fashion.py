"""Fashion-MNIST: 70,000 real 28x28 greyscale photos of clothing in 10 classes (Zalando Research, MIT).

Two subsets of the official train (60,000) / test (10,000) split:

- ``"quick"`` -- a stratified sample that ships with the project in ``data/fashion-mnist-quick/``
  (500 train and 100 test images per class, drawn with a fixed seed by
  ``scripts/make_fashion_subset.py``), verified against its SHA-256 manifest at load. Always there.
- ``"full"`` -- the whole set, read from the first folder holding the four official files
  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``: ``<root>/fashion-mnist/``, ``<root>``
  itself, ``<root>/FashionMNIST/raw/`` (torchvision's layout), then Debian's
  ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist/``). Nothing is downloaded.

Images are normalised with the mean and std of the full train set (fixed constants), so the quick
subset and the full set see the same input scale.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from ._validate import check_bool, check_choice, check_int
from .checksums import verify_manifest
from .idx import read_idx
from .in_memory import InMemoryImageDataset
from .paths import DATA_ENV_VAR, ROOT_HINT, implicit_data_root, resolve_root, shipped_data_dir

FASHION_SPLITS = ("train", "test")
FASHION_SUBSETS = ("quick", "full")
FASHION_FITS = ("resize", "pad")
FASHION_CHANNELS = (1, 3)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# mean and std of the 60,000 full-set train images at 28x28, intensities in [0, 1]
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_FULL_SIZES = {"train": 60_000, "test": 10_000}
FASHION_QUICK_DIR = "fashion-mnist-quick"
FASHION_QUICK_INDICES = "source-indices.json"
SYSTEM_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_APT_HINT = "sudo apt-get install dataset-fashion-mnist"
_NATIVE = 28


def quick_subset_dir() -> Path:
    """The folder of the shipped quick subset (``<repo>/data/fashion-mnist-quick`` in a checkout)."""
    return shipped_data_dir() / FASHION_QUICK_DIR


def full_set_candidates(root: Path) -> list[Path]:
    """The folders searched for the full set, in order."""
    return [root / "fashion-mnist", root, root / "FashionMNIST" / "raw", SYSTEM_FASHION_DIR]


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def locate_full_set(root: Path) -> Path:
    """The first of :func:`full_set_candidates` holding all four files; ``FileNotFoundError`` listing
    every place looked at, the expected layout and how to install Debian's copy otherwise.

    A data root someone named (``root=`` or ``$WORKBENCH_DATA``) must exist: a mistyped path is
    refused rather than silently replaced by the system copy."""
    if not root.is_dir() and root != implicit_data_root():
        raise FileNotFoundError(f"fashion-mnist subset='full': data root {root} does not exist (from root= "
                                f"or ${DATA_ENV_VAR}); it should hold fashion-mnist/"
                                f"{{{', '.join(s for pair in FASHION_FILES.values() for s in pair)}}}.gz")
    stems = [stem for pair in FASHION_FILES.values() for stem in pair]
    for folder in full_set_candidates(root):
        if all(_idx_file(folder, stem) for stem in stems):
            return folder
    looked = ", ".join(str(p) for p in full_set_candidates(root))
    raise FileNotFoundError(
        f"fashion-mnist subset='full': the four files {{{', '.join(stems)}}}[.gz] are in none of: "
        f"{looked}. Install Debian's copy with `{FASHION_APT_HINT}`, or put the official "
        f"files in <root>/fashion-mnist/ ({ROOT_HINT}). "
        f"subset='quick' needs no files.")


@functools.lru_cache(maxsize=4)
def _read_split(folder: Path, split: str, expected: int | None) -> tuple[np.ndarray, np.ndarray]:
    image_stem, label_stem = FASHION_FILES[split]
    image_path, label_path = _idx_file(folder, image_stem), _idx_file(folder, label_stem)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (_NATIVE, _NATIVE):
        raise ValueError(f"{image_path}: images of shape {images.shape[1:]}, expected (28, 28)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{label_path}: {labels.shape} labels for {len(images)} images in {image_path}")
    if expected is not None and len(images) != expected:
        raise ValueError(f"{image_path}: {len(images)} images, expected {expected} for the {split} split")
    if len(labels) and int(labels.max()) >= len(FASHION_CLASSES):
        raise ValueError(f"{label_path}: label {int(labels.max())} outside 0..{len(FASHION_CLASSES) - 1}")
    labels = labels.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=1)
def _quick_indices(folder: Path) -> dict[str, np.ndarray]:
    # verified once per process: a corrupt shipped file stops everything before any work
    verify_manifest(folder, hint=f"Restore it with `git checkout -- data/{FASHION_QUICK_DIR}` or rebuild "
                                 f"it from the full set with scripts/make_fashion_subset.py.")
    content = json.loads((folder / FASHION_QUICK_INDICES).read_text())
    indices = {split: np.asarray(content[split], dtype=np.int64) for split in FASHION_SPLITS}
    for array in indices.values():
        array.setflags(write=False)
    return indices


def fashion_arrays(split: str, subset: str = "quick", root: Path | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images uint8 (N,28,28), labels int64 (N,), indices)`` of one split, read-only.

    ``indices`` index the official file of the split (train or t10k) the images come from.
    ``root`` is only read for ``subset="full"`` (``None``: the default data root).
    """
    check_choice("split", split, FASHION_SPLITS)
    check_choice("subset", subset, FASHION_SUBSETS)
    if subset == "quick":
        folder = quick_subset_dir()
        if not folder.is_dir():
            raise FileNotFoundError(f"fashion-mnist subset='quick': {folder} is missing; it ships with the "
                                    f"project (data/{FASHION_QUICK_DIR} in a checkout)")
        indices = _quick_indices(folder)[split]
        images, labels = _read_split(folder, split, len(indices))
    else:
        folder = locate_full_set(resolve_root(root))
        images, labels = _read_split(folder, split, FASHION_FULL_SIZES[split])
        indices = np.arange(len(labels))
        indices.setflags(write=False)
    return images, labels, indices


@functools.lru_cache(maxsize=4)
def fashion_split(split: str, subset: str = "quick", root: Path | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`fashion_arrays` with images as float32 intensities in [0, 1] (the scenes' items).

    Cached and read-only: scenes look their items up once per rendered scene."""
    images, labels, indices = fashion_arrays(split, subset, root)
    images = images.astype(np.float32) / 255.0
    images.setflags(write=False)
    return images, labels, indices


def stratified_head(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Sorted positions of the first ``per_class`` items of every class; ``ValueError`` if a class has fewer."""
    counts = np.bincount(labels, minlength=len(FASHION_CLASSES))
    if per_class > counts.min():
        raise ValueError(f"per_class={per_class} exceeds the {int(counts.min())} images the smallest class "
                         f"has here; allowed: 1..{int(counts.min())} or None (all)")
    keep = [np.flatnonzero(labels == c)[:per_class] for c in range(len(FASHION_CLASSES))]
    return np.sort(np.concatenate(keep))


def _fit(x: torch.Tensor, size: int, fit: str) -> torch.Tensor:
    """(N,1,28,28) in [0,1] to (N,1,size,size): bilinear (antialiased when shrinking) or centred zero padding."""
    if size == _NATIVE:
        return x
    if fit == "pad":
        before = (size - _NATIVE) // 2
        after = size - _NATIVE - before
        return F.pad(x, (before, after, before, after), value=0.0)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < _NATIVE)


class FashionMNISTDataset(InMemoryImageDataset):
    """Fashion-MNIST at ``size`` x ``size`` with ``channels`` (1 or 3 identical) channels.

    ``subset``: ``"quick"`` (shipped, 500/100 per class) or ``"full"`` (60,000/10,000, from ``root``
    or Debian's package, see the module docstring). ``fit``: how 28x28 becomes ``size``: ``"resize"``
    (bilinear) or ``"pad"`` (centred, background value; needs ``size >= 28``, the LeNet way to 32).
    ``normalize``: subtract 0.2860 and divide by 0.3530 (full train set statistics) or keep [0, 1].
    ``per_class``: keep only the first ``per_class`` images of each class (stratified, in stored
    order, which for ``"quick"`` is already a seeded random sample). ``augment``: each access pads by
    ``size // 16`` (background value), crops back at random and flips horizontally with p = 0.5,
    drawing from torch's global RNG. Items are ``(image float32 (channels, size, size), label int)``.
    """

    name = "fashion-mnist"
    task = "classification"
    num_classes = len(FASHION_CLASSES)
    classes = FASHION_CLASSES
    ignore_index = None

    def __init__(self, split: str = "train", subset: str = "quick", size: int = 28, channels: int = 3,
                 fit: str = "resize", normalize: bool = True, per_class: int | None = None,
                 augment: bool = False, root: Path | None = None) -> None:
        self.split = check_choice("split", split, FASHION_SPLITS)
        self.subset = check_choice("subset", subset, FASHION_SUBSETS)
        self.size = check_int("size", size, minimum=8)
        self.in_channels = check_choice("channels", channels, FASHION_CHANNELS)
        self.fit = check_choice("fit", fit, FASHION_FITS)
        if fit == "pad" and size < _NATIVE:
            raise ValueError(f"size={size} with fit='pad' must be >= {_NATIVE}; use fit='resize' to shrink")
        self.normalize = check_bool("normalize", normalize)
        self.per_class = None if per_class is None else check_int("per_class", per_class, minimum=1)
        self.augment = check_bool("augment", augment)
        images, labels, indices = fashion_arrays(split, subset, root)
        keep = np.arange(len(labels)) if per_class is None else stratified_head(labels, per_class)
        mean, std = (FASHION_MEAN, FASHION_STD) if normalize else (0.0, 1.0)
        x = torch.from_numpy(images[keep]).unsqueeze(1).float().div_(255.0)
        # stored with one channel; items and tensors() expand to 3 without copying per channel
        self.images = _fit(x, size, fit).sub_(mean).div_(std)
        self.targets = torch.from_numpy(labels[keep])
        self.source_indices = torch.from_numpy(indices[keep])
        self.mean, self.std = (mean,) * channels, (std,) * channels
        self.image_size = (size, size)
        self.background_value = -mean / std
        self._augment = v2.Compose([v2.RandomCrop(size, padding=max(1, size // 16), fill=self.background_value),
                                    v2.RandomHorizontalFlip()]) if augment else None

    def __repr__(self) -> str:
        return (f"FashionMNISTDataset(split={self.split!r}, subset={self.subset!r}, size={self.size}, "
                f"channels={self.in_channels}, fit={self.fit!r}, augment={self.augment}, n={len(self)})")
