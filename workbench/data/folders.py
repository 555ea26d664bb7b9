"""Datasets from folders of images: classification in torchvision's ``ImageFolder`` layout and
segmentation from images and masks paired by file stem (layouts: :mod:`workbench.data.folder_scan`).

Every image is converted to ``channels`` channels (3 by default: grayscale repeated, alpha dropped,
so every workbench model takes it), resized to ``size`` and normalised with per-channel statistics of
the training split, computed once and cached beside the data (:mod:`workbench.data.folder_stats`).
A folder is scanned and validated before anything is loaded: any problem raises ``ValueError``
naming the file and what was expected.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from ._validate import check_bool, check_choice, check_hw
from .folder_scan import FOLDER_SPLIT_SEED, FOLDER_SPLITS, FolderScan, scan_folder
from .folder_stats import cached_channel_stats, stats_key
from .transforms import segmentation_transform

FOLDER_OPTIONS = {
    "size": "32 (classification) / 64 (segmentation): working size, an int (square) or (h, w)",
    "channels": "3: 3 (grayscale repeated, alpha dropped) or 1 (grayscale)",
    "augment": "False: classification a random shift (pad size//16, crop); segmentation random scale, crop, flip",
    "normalize": "True: per-channel mean/std of the training split (cached in <root>/.workbench-stats.json)",
}
_MODES = {1: "L", 3: "RGB"}


def load_image(path: str | Path, channels: int = 3) -> Image.Image:
    """A PIL image with ``channels`` channels (``L`` or ``RGB``)."""
    with Image.open(path) as image:
        return image.convert(_MODES[channels])


def _to_tensor(size: tuple[int, int]) -> v2.Compose:
    return v2.Compose([v2.PILToTensor(), v2.Resize(list(size), antialias=True)])


def open_scan(root: str | Path, task: str | None = None) -> FolderScan:
    """The scan of ``root``, refused with its first problem, or when it holds another ``task``."""
    scan = scan_folder(root)
    scan.raise_if_invalid()
    if task is not None and scan.task != task:
        raise ValueError(f"{scan.root}: holds a {scan.task} dataset; expected a {task} folder here")
    return scan


class _ScannedImageFolder(ImageFolder):
    """torchvision's ImageFolder with the class list fixed by the scan (a test folder may lack classes)."""

    def __init__(self, root: Path, classes: tuple[str, ...], keep: set[str], **kwargs: Any) -> None:
        self._fixed_classes = list(classes)
        super().__init__(str(root), allow_empty=True, **kwargs)
        self.samples = [s for s in self.samples if s[0] in keep]
        self.imgs = self.samples
        self.targets = [t for _, t in self.samples]

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._fixed_classes, {c: i for i, c in enumerate(self._fixed_classes)}


class _FolderBase(Dataset):
    """Options and normalisation shared by the two folder datasets."""

    default_size = 32

    def __init__(self, root: str | Path, split: str, size: Any, channels: int, augment: bool,
                 normalize: bool) -> None:
        self.split = check_choice("split", split, FOLDER_SPLITS)
        self.image_size = check_hw("size", self.default_size if size is None else size, minimum=8)
        self.in_channels = check_choice("channels", channels, tuple(_MODES))
        self.augment = check_bool("augment", augment)
        self.normalize = check_bool("normalize", normalize)
        self.scan = open_scan(root, self.task)
        self.root = self.scan.root
        self.name = str(self.root)
        self.classes = self.scan.classes
        self.num_classes = self.scan.num_classes or len(self.classes)
        if self.normalize:
            key = stats_key(self.task, self.image_size, self.in_channels, FOLDER_SPLIT_SEED, self.scan.fingerprint)
            images = [item[0] for item in self.scan.items["train"]]
            self.mean, self.std = cached_channel_stats(self.root, key, images, self._stats_image)
        else:
            self.mean, self.std = (0.0,) * self.in_channels, (1.0,) * self.in_channels

    def _stats_image(self, path: Path) -> torch.Tensor:
        x = _to_tensor(self.image_size)(load_image(path, self.in_channels))
        return x.to(torch.float32) / 255.0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"size={self.image_size}, channels={self.in_channels}, augment={self.augment})")


class ImageFolderDataset(_FolderBase):
    """Classification from a folder in ``ImageFolder`` layout; items ``(float32 (C, H, W), label)``.

    ``classes`` are the train split's class folders in sorted order (``ImageFolder``'s indices);
    ``samples``/``targets`` follow ``ImageFolder``. With ``augment`` each access applies a random
    shift (pad ``size // 16`` by edge replication, random crop back), drawn from torch's global RNG.
    """

    task = "classification"
    ignore_index = None

    def __init__(self, root: str | Path, split: str = "train", size: Any = None, channels: int = 3,
                 augment: bool = False, normalize: bool = True) -> None:
        super().__init__(root, split, size, channels, augment, normalize)
        steps: list[Any] = [v2.PILToTensor(), v2.Resize(list(self.image_size), antialias=True)]
        if self.augment:
            pad = max(1, min(self.image_size) // 16)
            steps.append(v2.RandomCrop(list(self.image_size), padding=pad, padding_mode="edge"))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))]
        items = self.scan.items[self.split]
        split_dir = items[0][0].parent.parent if items else self.root
        self.folder = _ScannedImageFolder(split_dir, self.classes, {str(p) for p, _ in items},
                                          loader=functools.partial(load_image, channels=self.in_channels),
                                          transform=v2.Compose(steps))
        self.samples = self.folder.samples
        self.targets = torch.tensor(self.folder.targets, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.folder[index]


class MaskFolderDataset(_FolderBase):
    """Segmentation from images and masks paired by stem; items ``(float32 (C, H, W), int64 (H, W))``.

    ``num_classes``, ``ignore_index`` and ``classes`` come from ``dataset.yaml``. Masks are resized
    by nearest neighbour (never blended into a value that is no class).
    """

    task = "segmentation"
    default_size = 64

    def __init__(self, root: str | Path, split: str = "train", size: Any = None, channels: int = 3,
                 augment: bool = False, normalize: bool = True) -> None:
        super().__init__(root, split, size, channels, augment, normalize)
        self.ignore_index = self.scan.ignore_index
        self.pairs = list(self.scan.items[self.split])
        self.transform = segmentation_transform(
            self.augment, resize=self.image_size, crop_size=self.image_size if self.augment else None,
            scale=(0.75, 1.25), flip=True, mean=self.mean, std=self.std, ignore_index=self.ignore_index)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = tv_tensors.Image(v2.functional.pil_to_tensor(load_image(image_path, self.in_channels)))
        with Image.open(mask_path) as m:
            mask = tv_tensors.Mask(torch.from_numpy(np.asarray(m).astype(np.int64))[None])
        image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)[0]


def open_folder_dataset(root: str | Path, split: str, **options: Any) -> Dataset:
    """The dataset in folder ``root`` for ``split``: classification or segmentation by its layout."""
    unknown = sorted(set(options) - set(FOLDER_OPTIONS))
    if unknown:
        raise ValueError(f"option(s) {', '.join(unknown)} not valid for folder dataset {str(root)!r}; "
                         f"allowed: {', '.join(FOLDER_OPTIONS)}")
    scan = scan_folder(root)
    scan.raise_if_invalid()
    cls = MaskFolderDataset if scan.task == "segmentation" else ImageFolderDataset
    return cls(root, split, **options)
