"""Datasets: the embedded default (``digits``, ``digit-scenes``), Fashion-MNIST (``fashion-mnist``,
``fashion-scenes``; a subset ships, the full set is read from disk) plus CIFAR and Cityscapes on disk.

``get_dataset(name, split, root=None, **options)`` is the one entry point notebooks use;
``DATASET_INFO`` describes every name (task, classes, splits, options) without loading anything.
Your own data: ``register_dataset(name, factory)``, or a folder path in place of a name
(:mod:`workbench.data.registry`, layouts in :mod:`workbench.data.folder_scan`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from ._validate import check_choice
from .cifar import (
    CIFAR_MEAN,
    CIFAR_SPLITS,
    CIFAR_STD,
    CIFARDataset,
    check_cifar_files,
    cifar_layout,
    cifar_transform,
)
from .cityscapes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LAYOUT,
    CITYSCAPES_SPLITS,
    CityscapesDataset,
    cityscapes_dir,
    cityscapes_pairs,
    label_id_to_train_id,
)
from .digits import DIGITS_CLASSES, DIGITS_SPLITS, DigitsDataset, digit_split
from .fashion import FASHION_CLASSES, FASHION_MEAN, FASHION_SPLITS, FASHION_STD, FashionMNISTDataset
from .folder_scan import FOLDER_SPLIT_SEED, FOLDER_TEST_FRACTION, FolderScan, describe_scan, scan_folder
from .folders import ImageFolderDataset, MaskFolderDataset
from .loader import make_loader
from .paths import DATA_ENV_VAR, default_data_root, resolve_root
from .registry import (
    DatasetRef,
    accepted_options,
    check_dataset,
    describe_dataset,
    open_external,
    register_dataset,
    registered_datasets,
    unregister_dataset,
)
from .scenes import (
    FASHION_SCENE_CLASSES,
    SCENE_CLASSES,
    SCENE_SPLITS,
    DigitScenesDataset,
    FashionScenesDataset,
    render_scene,
)
from .synthetic import SYNTHETIC_SPLITS, SyntheticDataset
from .transforms import IMAGENET_MEAN, IMAGENET_STD, segmentation_transform


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset name provides, known without touching the data."""

    name: str
    task: str  # "classification" | "segmentation"
    num_classes: int
    in_channels: int
    splits: tuple[str, ...]
    options: dict[str, str]  # option name -> its default and meaning
    needs_download: bool
    ignore_index: int | None
    description: str
    builder: Callable[..., Dataset] = field(repr=False)


def _build_digits(split: str, root: Any, **options: Any) -> Dataset:
    # the data ships with scikit-learn; root is accepted so callers can pass it uniformly
    return DigitsDataset(split, **options)


def _build_scenes(split: str, root: Any, **options: Any) -> Dataset:
    return DigitScenesDataset(split, **options)


def _build_fashion(split: str, root: Any, **options: Any) -> Dataset:
    return FashionMNISTDataset(split, root=root, **options)


def _build_fashion_scenes(split: str, root: Any, **options: Any) -> Dataset:
    return FashionScenesDataset(split, root=root, **options)


def _build_cifar10(split: str, root: Any, **options: Any) -> Dataset:
    return CIFARDataset("cifar10", split, root, **options)


def _build_cifar100(split: str, root: Any, **options: Any) -> Dataset:
    return CIFARDataset("cifar100", split, root, **options)


def _build_synthetic(split: str, root: Any, **options: Any) -> Dataset:
    return SyntheticDataset(split, **options)


def _build_cityscapes(split: str, root: Any, **options: Any) -> Dataset:
    return CityscapesDataset(split, root, **options)


_CIFAR_OPTIONS = {
    "augment": "split == 'train': RandomCrop(32, padding=4) + RandomHorizontalFlip",
    "normalize": "True: per-channel mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010)",
    "transform": "None: callable replacing the pipeline; receives a uint8 (3,32,32) tensor",
    "verify": "False: also check the official md5 sums",
}



def _scene_options(item: str, threshold: str) -> dict[str, str]:
    """The options both scene datasets take; ``item`` is what a scene is composed of ("digit", "item")."""
    return {"size": "64: scene side (>= 64)",
            "length": "512 train / 128 test: number of scenes",
            "seed": "0: scene generator seed (scene = f(seed, split, index))",
            f"min_{item}s": "2", f"max_{item}s": "4",
            f"min_{item}_size": "size // 4", f"max_{item}_size": "size * 7 // 16",
            "threshold": f"{threshold}: {item} intensity above which a pixel is labelled as the {item}"}

DATASET_INFO: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        name="digits", task="classification", num_classes=10, in_channels=3, splits=DIGITS_SPLITS,
        options={"size": "32: side of the upsampled image",
                 "augment": "False: random shift (pad size//16, random crop)"},
        needs_download=False, ignore_index=None,
        description="scikit-learn's 1,797 8x8 handwritten digits, fixed stratified 80/20 split, "
                    "bilinear-upsampled to 32x32x3, normalised with train mean/std",
        builder=_build_digits),
    "digit-scenes": DatasetInfo(
        name="digit-scenes", task="segmentation", num_classes=len(SCENE_CLASSES), in_channels=3,
        splits=SCENE_SPLITS,
        options=_scene_options("digit", "0.3"),
        needs_download=False, ignore_index=255,
        description="textured scenes with 2..4 non-overlapping digits; mask 0 = background, "
                    "1..10 = digit + 1",
        builder=_build_scenes),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist", task="classification", num_classes=10, in_channels=3, splits=FASHION_SPLITS,
        options={"subset": "'quick': the shipped 500 train / 100 test per class; 'full': 60,000 / 10,000 "
                           "from <root>/fashion-mnist/ or Debian's dataset-fashion-mnist",
                 "size": "28: image side (28 native; 32 for the CIFAR ResNets' input size)",
                 "channels": "3: 1, or 3 identical channels",
                 "fit": "'resize': bilinear to size; 'pad': centred background padding (size >= 28)",
                 "normalize": "True: mean 0.2860, std 0.3530 (full train set); False: [0, 1]",
                 "per_class": "None: keep the first n images of each class (stratified)",
                 "augment": "False: random shift (pad size//16, random crop) + horizontal flip"},
        needs_download=False, ignore_index=None,
        description="Zalando's Fashion-MNIST (MIT): 28x28 greyscale clothing photos, 10 classes, "
                    "official train/test split; a stratified subset ships in data/fashion-mnist-quick",
        builder=_build_fashion),
    "fashion-scenes": DatasetInfo(
        name="fashion-scenes", task="segmentation", num_classes=len(FASHION_SCENE_CLASSES), in_channels=3,
        splits=SCENE_SPLITS,
        options={"subset": "'quick': items from the shipped subset; 'full': from the full set",
                 **_scene_options("item", "0.1")},
        needs_download=False, ignore_index=255,
        description="textured scenes with 2..4 non-overlapping Fashion-MNIST items; mask 0 = background, "
                    "1..10 = class + 1",
        builder=_build_fashion_scenes),
    "synthetic": DatasetInfo(
        name="synthetic", task="classification", num_classes=10, in_channels=3, splits=SYNTHETIC_SPLITS,
        options={"length": "2048 train / 512 test", "size": "32", "num_classes": "10", "seed": "0"},
        needs_download=False, ignore_index=None,
        description="Gaussian 3x32x32 images, class-dependent channel means; for timing and numerical checks",
        builder=_build_synthetic),
    "cifar10": DatasetInfo(
        name="cifar10", task="classification", num_classes=10, in_channels=3, splits=CIFAR_SPLITS,
        options=_CIFAR_OPTIONS, needs_download=True, ignore_index=None,
        description=f"CIFAR-10 python release, {cifar_layout('cifar10')}",
        builder=_build_cifar10),
    "cifar100": DatasetInfo(
        name="cifar100", task="classification", num_classes=100, in_channels=3, splits=CIFAR_SPLITS,
        options=_CIFAR_OPTIONS, needs_download=True, ignore_index=None,
        description=f"CIFAR-100 python release (fine labels), {cifar_layout('cifar100')}",
        builder=_build_cifar100),
    "cityscapes": DatasetInfo(
        name="cityscapes", task="segmentation", num_classes=len(CITYSCAPES_CLASSES), in_channels=3,
        splits=CITYSCAPES_SPLITS,
        options={"augment": "split == 'train': random scale, crop and flip",
                 "resize": "None: working resolution, int (shorter side) or (h, w)",
                 "crop_size": "None (= working size): random crop when augmenting",
                 "scale": "(0.5, 2.0): random scale range when augmenting; None disables",
                 "flip": "True: random horizontal flip when augmenting",
                 "normalize": "True: ImageNet mean/std"},
        needs_download=True, ignore_index=255,
        description=f"Cityscapes fine, 19 train ids + 255 ignore, {CITYSCAPES_LAYOUT}",
        builder=_build_cityscapes),
}


def list_datasets() -> list[str]:
    """Names accepted by ``get_dataset`` (built-in, then registered; folder paths are accepted too)."""
    return [*DATASET_INFO, *registered_datasets()]


def get_dataset(name: str, split: str, root: str | os.PathLike[str] | None = None, **options: Any) -> Dataset:
    """Build dataset ``name`` for ``split``.

    ``root`` is the folder holding on-disk datasets (default ``$WORKBENCH_DATA`` or ``<repo>/data``);
    the embedded datasets and the shipped Fashion-MNIST subset ignore it. Every returned dataset has ``name``, ``split``, ``task``,
    ``num_classes``, ``classes``, ``in_channels``, ``ignore_index``, ``mean`` and ``std``;
    classification datasets also have ``targets`` (int64 tensor). Unknown names, splits or options
    raise ``ValueError`` listing what is allowed, before anything is loaded.

    ``name`` may also be a name given to :func:`register_dataset` or a folder path (see
    :mod:`workbench.data.registry`); a folder is validated before any image is loaded.
    """
    if not isinstance(name, str) or name not in DATASET_INFO:
        return open_external(name, split, **options)
    info = DATASET_INFO[name]
    check_choice("split", split, info.splits)
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        raise ValueError(f"option(s) {', '.join(unknown)} not valid for dataset {name!r}; "
                         f"allowed: {', '.join(info.options) or '(none)'}")
    return info.builder(split, resolve_root(root), **options)


def check_data_files(name: Any, splits: tuple[str, ...] | None = None,
                     root: str | os.PathLike[str] | None = None) -> None:
    """Raise ``FileNotFoundError`` naming the first missing path and the expected on-disk layout when
    the files of CIFAR-10/100 or Cityscapes are not under ``root`` (default as in :func:`get_dataset`),
    without loading any of them; other datasets (embedded, registered, folders) pass. ``splits``
    defaults to the ones experiments read: train and test (CIFAR), train and val (Cityscapes)."""
    if name in ("cifar10", "cifar100"):
        for split in splits or CIFAR_SPLITS:
            check_cifar_files(name, split, resolve_root(root))
    elif name == "cityscapes":
        for split in splits or ("train", "val"):
            cityscapes_pairs(cityscapes_dir(resolve_root(root)), split)


__all__ = [
    "check_data_files",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CITYSCAPES_CLASSES",
    "CIFARDataset",
    "CityscapesDataset",
    "DATASET_INFO",
    "DATA_ENV_VAR",
    "DIGITS_CLASSES",
    "DatasetInfo",
    "DatasetRef",
    "FOLDER_SPLIT_SEED",
    "FOLDER_TEST_FRACTION",
    "FolderScan",
    "ImageFolderDataset",
    "MaskFolderDataset",
    "accepted_options",
    "check_dataset",
    "describe_dataset",
    "describe_scan",
    "register_dataset",
    "registered_datasets",
    "scan_folder",
    "unregister_dataset",
    "DigitScenesDataset",
    "DigitsDataset",
    "FASHION_CLASSES",
    "FASHION_MEAN",
    "FASHION_SCENE_CLASSES",
    "FASHION_STD",
    "FashionMNISTDataset",
    "FashionScenesDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SCENE_CLASSES",
    "SyntheticDataset",
    "default_data_root",
    "digit_split",
    "cifar_transform",
    "get_dataset",
    "label_id_to_train_id",
    "list_datasets",
    "make_loader",
    "render_scene",
    "segmentation_transform",
]
