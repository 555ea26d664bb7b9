"""Cityscapes semantic segmentation (fine annotations) in torchvision's layout.

``<root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and
``<root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`` (leftImg8bit_trainvaltest.zip
and gtFine_trainvaltest.zip from cityscapes-dataset.com, unzipped into ``<root>``). The 34 label
ids map to the 19 evaluation train ids with torchvision's class table; everything else becomes 255.
Files are listed sorted (os.listdir order differs between file systems) and every image's label
file is checked at construction, so a broken tree fails before training starts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import Cityscapes

from ._validate import check_bool, check_choice, check_float, check_hw, check_int
from .paths import ROOT_HINT
from .transforms import IMAGENET_MEAN, IMAGENET_STD, segmentation_transform

CITYSCAPES_SPLITS = ("train", "val", "test")
CITYSCAPES_IGNORE_INDEX = 255
CITYSCAPES_LAYOUT = ("<root>/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
                     "<root>/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png "
                     "(leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
                     "https://www.cityscapes-dataset.com, unzipped into <root>)")

_EVAL_CLASSES = sorted((c for c in Cityscapes.classes if 0 <= c.train_id < 255), key=lambda c: c.train_id)
CITYSCAPES_CLASSES = tuple(c.name for c in _EVAL_CLASSES)


def label_id_to_train_id() -> torch.Tensor:
    """Lookup table (256,) uint8: Cityscapes label id -> train id 0..18, 255 for ignored ids."""
    lut = torch.full((256,), CITYSCAPES_IGNORE_INDEX, dtype=torch.uint8)
    for c in _EVAL_CLASSES:
        lut[c.id] = c.train_id
    return lut


_LUT = label_id_to_train_id()


def cityscapes_dir(root: Path) -> Path:
    """``root`` itself (torchvision's convention) or, when it holds one, ``root/cityscapes``, so the
    shared data root works for Cityscapes as it does for CIFAR."""
    nested = root / "cityscapes"
    return nested if not (root / "leftImg8bit").is_dir() and nested.is_dir() else root


def cityscapes_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Sorted ``(image, labelIds)`` paths of ``split``; ``FileNotFoundError`` names what is missing."""
    hint = (f"Expected layout: {CITYSCAPES_LAYOUT.format(split=split)}. Nothing is downloaded "
            f"automatically; <root> is the Cityscapes folder or a folder holding cityscapes/; {ROOT_HINT}.")
    if not root.is_dir():
        raise FileNotFoundError(f"cityscapes data root {root} does not exist. {hint}")
    images_dir, labels_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"cityscapes split {split!r}: folder {folder} is missing. {hint}")
    images = sorted(images_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise FileNotFoundError(f"cityscapes split {split!r}: no */*_leftImg8bit.png under {images_dir}. {hint}")
    pairs = []
    missing = []
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        label = labels_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"
        (pairs if label.is_file() else missing).append((image, label))
    if missing:
        raise FileNotFoundError(f"cityscapes split {split!r}: {len(missing)} label file(s) missing, first "
                                f"{missing[0][1]} (for {missing[0][0]}). {hint}")
    return pairs


class CityscapesDataset(Dataset):
    """Cityscapes fine semantic segmentation: items ``(image float32 (3,H,W), mask int64 (H,W))``.

    Mask values are train ids 0..18 and 255 (ignore). Options: ``augment`` (default: ``split ==
    "train"``) enables random ``scale`` (default (0.5, 2.0); ``None`` disables), a random crop
    of ``crop_size`` (default: the working size, so batches stack) padded with 0 / 255, and a
    horizontal ``flip``; ``resize`` (int = shorter side, or (h, w)) sets a lower working resolution
    for every split first (bilinear image, nearest mask). Images are normalised with ImageNet
    statistics (``normalize=False`` leaves them in [0, 1]). Random draws use torch's global RNG.
    """

    name = "cityscapes"
    task = "segmentation"
    classes = CITYSCAPES_CLASSES
    num_classes = len(CITYSCAPES_CLASSES)
    in_channels = 3
    ignore_index = CITYSCAPES_IGNORE_INDEX

    def __init__(
        self,
        split: str,
        root: str | Path,
        augment: bool | None = None,
        resize: int | tuple[int, int] | None = None,
        crop_size: int | tuple[int, int] | None = None,
        scale: tuple[float, float] | None = (0.5, 2.0),
        flip: bool = True,
        normalize: bool = True,
    ) -> None:
        self.split = check_choice("split", split, CITYSCAPES_SPLITS)
        self.augment = split == "train" if augment is None else check_bool("augment", augment)
        if isinstance(resize, int) and not isinstance(resize, bool):
            resize = check_int("resize", resize, minimum=1)
        elif resize is not None:
            resize = check_hw("resize", resize)
        self.resize = resize
        self.crop_size = None if crop_size is None else check_hw("crop_size", crop_size)
        if scale is not None:
            if not isinstance(scale, tuple | list) or len(scale) != 2:
                raise ValueError(f"scale={scale!r} must be None or a (low, high) pair")
            lo, hi = (check_float("scale", s, minimum=1e-3) for s in scale)
            if lo > hi:
                raise ValueError(f"scale={scale!r} must have low <= high")
            scale = (lo, hi)
        self.scale = scale
        self.flip = check_bool("flip", flip)
        self.normalize = check_bool("normalize", normalize)
        self.root = cityscapes_dir(Path(root))
        self.pairs = cityscapes_pairs(self.root, split)
        self.mean = IMAGENET_MEAN if normalize else (0.0, 0.0, 0.0)
        self.std = IMAGENET_STD if normalize else (1.0, 1.0, 1.0)
        crop = self.crop_size
        if self.augment and crop is None and (scale is not None):
            # crop back to the working size so every sample of a batch has the same shape
            crop = self._working_size()
        self.transform = segmentation_transform(
            self.augment, resize=resize,
            crop_size=crop, scale=scale, flip=flip,
            mean=IMAGENET_MEAN if normalize else None, std=IMAGENET_STD if normalize else None,
            ignore_index=self.ignore_index)

    def _working_size(self) -> tuple[int, int]:
        if isinstance(self.resize, tuple):
            return self.resize
        h, w = self._read(0)[0].shape[-2:]
        if self.resize is None:
            return int(h), int(w)
        short = self.resize
        # v2.Resize(int) scales the shorter side to it and keeps the aspect ratio (floor)
        return (short, int(short * w / h)) if h <= w else (int(short * h / w), short)

    def __len__(self) -> int:
        return len(self.pairs)

    def _read(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image_path, label_path = self.pairs[index]
        # PIL: torchvision.io's decoders are deprecated as of 0.29
        with Image.open(image_path) as f:
            image = torch.from_numpy(np.asarray(f.convert("RGB")).copy()).permute(2, 0, 1)
        with Image.open(label_path) as f:
            if f.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"{label_path}: label ids must be a single-channel PNG, got mode {f.mode!r}")
            label_ids = torch.from_numpy(np.asarray(f).astype(np.int64))
        if label_ids.shape != image.shape[1:]:
            raise ValueError(f"{label_path}: label size {tuple(label_ids.shape)} differs from image size "
                             f"{tuple(image.shape[1:])} of {image_path}")
        if int(label_ids.min()) < 0 or int(label_ids.max()) > 255:
            raise ValueError(f"{label_path}: label ids outside 0..255")
        return tv_tensors.Image(image), tv_tensors.Mask(_LUT[label_ids][None])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.transform(*self._read(index))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)[0]

    def __repr__(self) -> str:
        return (f"CityscapesDataset(split={self.split!r}, root={str(self.root)!r}, n={len(self)}, "
                f"augment={self.augment}, resize={self.resize}, crop_size={self.crop_size}, scale={self.scale})")
