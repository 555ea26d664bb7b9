"""Scanning a segmentation folder: ``dataset.yaml``, images and masks paired by stem, mask checks.

A mask must be a single-channel image of the same size as its image, holding class indices
``0..num_classes-1`` or the ignore index; every image needs a mask and every mask an image.
(Layouts: :mod:`workbench.data.folder_scan`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from .folder_scan import MASK_MODES, METADATA_FILE, FolderScan, _files, _read_header, _seeded_test

DEFAULT_IGNORE_INDEX = 255


def read_metadata(scan: FolderScan) -> bool:
    """Fill ``num_classes``, ``ignore_index`` and ``classes`` from ``dataset.yaml``; False on a problem."""
    path = scan.root / METADATA_FILE
    expected = "expected num_classes: <int >= 2>, optional ignore_index: <int> and classes: [<names>]"
    if not path.is_file():
        scan.problems.append(f"{path}: missing; {expected}")
        return False
    try:
        meta = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        scan.problems.append(f"{path}: not valid YAML ({type(exc).__name__}); {expected}")
        return False
    unknown = sorted(set(meta) - {"num_classes", "ignore_index", "classes"}) if isinstance(meta, dict) else []
    num_classes = meta.get("num_classes") if isinstance(meta, dict) else None
    ignore = meta.get("ignore_index", DEFAULT_IGNORE_INDEX) if isinstance(meta, dict) else None
    classes = meta.get("classes") if isinstance(meta, dict) else None
    if (not isinstance(meta, dict) or unknown or isinstance(num_classes, bool) or not isinstance(num_classes, int)
            or num_classes < 2 or isinstance(ignore, bool) or not isinstance(ignore, int)
            or (classes is not None and (not isinstance(classes, list) or len(classes) != num_classes))):
        scan.problems.append(f"{path}: {meta!r} is not valid; {expected} (classes as long as num_classes)")
        return False
    if 0 <= ignore < num_classes:
        scan.problems.append(f"{path}: ignore_index {ignore} is a class index (num_classes {num_classes}); "
                             f"expected a value outside 0..{num_classes - 1}, such as 255")
        return False
    scan.num_classes, scan.ignore_index = num_classes, ignore
    scan.classes = tuple(str(c) for c in classes) if classes else tuple(str(i) for i in range(num_classes))
    return True


def _by_stem(scan: FolderScan, folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in _files(folder):
        if path.stem in out:
            scan.problems.append(f"{path}: stem {path.stem!r} also used by {out[path.stem].name}; "
                                 "expected one file per stem")
        out.setdefault(path.stem, path)
    return out


def _check_mask(scan: FolderScan, image: Path, mask: Path, size: tuple[int, int]) -> bool:
    """Mode, size and values of one mask against its image; records problems and value counts."""
    try:
        with Image.open(mask) as m:
            mode, mask_size = m.mode, m.size
            values = np.unique(np.asarray(m)) if mode in MASK_MODES else None
    except Exception as exc:  # PIL raises several types for corrupt or foreign files
        scan.problems.append(f"{mask}: cannot be read as a mask ({type(exc).__name__}); expected a single-channel "
                             "PNG of class indices")
        return False
    if values is None:
        scan.problems.append(f"{mask}: mode {mode!r}; expected a single-channel mask of class indices "
                             f"(PIL mode {', '.join(MASK_MODES)})")
        return False
    if mask_size != size:
        scan.problems.append(f"{mask}: mask is {mask_size[0]}x{mask_size[1]} but its image {image.name} is "
                             f"{size[0]}x{size[1]}; expected the same size")
        return False
    bad = [int(v) for v in values if not (0 <= v < scan.num_classes or v == scan.ignore_index)]
    if bad:
        scan.problems.append(f"{mask}: value {bad[0]} is above the classes 0..{scan.num_classes - 1} and is not the "
                             f"ignore_index {scan.ignore_index}; expected class indices or {scan.ignore_index}")
        return False
    for v in values:
        scan.mask_values[int(v)] += 1
    return True


def _pairs(scan: FolderScan, base: Path) -> list[tuple[Path, Any]]:
    """Image/mask pairs of one split folder (holding images/ and masks/), after every check."""
    images, masks = _by_stem(scan, base / "images"), _by_stem(scan, base / "masks")
    for stem in sorted(set(masks) - set(images)):
        scan.problems.append(f"{masks[stem]}: no image with stem {stem!r} in {base / 'images'}; "
                             "expected every mask to have its image")
    pairs = []
    for stem, image in images.items():
        header = _read_header(image, scan)
        if header is None:
            continue
        if stem not in masks:
            scan.problems.append(f"{image}: no mask with stem {stem!r} in {base / 'masks'}; "
                                 "expected a mask for every image")
            continue
        scan.sizes[header[:2]] += 1
        scan.modes[header[2]] += 1
        if _check_mask(scan, image, masks[stem], header[:2]):
            pairs.append((image, masks[stem]))
    if not images:
        scan.problems.append(f"{base / 'images'}: no images; expected <stem>.png files with masks of the same stem")
    return pairs


def scan_segmentation(scan: FolderScan) -> None:
    """Fill ``scan`` for a segmentation folder (split folders or images/ + masks/ split by the seed)."""
    scan.task = "segmentation"
    if not read_metadata(scan):
        return
    root = scan.root
    if (root / "train" / "images").is_dir():
        train = _pairs(scan, root / "train")
        if (root / "test" / "images").is_dir():
            scan.layout = "train/ and test/ folders"
            scan.items = {"train": train, "test": _pairs(scan, root / "test")}
            return
        scan.layout = "train/ folder, test split by seed"
    else:
        train = _pairs(scan, root)
        scan.layout = "one folder, split by seed"
    held_out = _seeded_test([image.stem for image, _ in train], "segmentation")
    scan.items = {"train": [p for p in train if p[0].stem not in held_out],
                  "test": [p for p in train if p[0].stem in held_out]}
