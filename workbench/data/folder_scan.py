"""What the workbench sees in a folder of images: its layout, classes, splits, image sizes and
channels, and every file it would refuse, each with the path and what was expected.

Two layouts are recognised (``train/`` and ``test/`` folders, or one folder split by a fixed seed):

Classification (torchvision's ``ImageFolder`` layout)::

    root/train/<class>/*.png         root/<class>/*.png
    root/test/<class>/*.png          (split by FOLDER_SPLIT_SEED)

Segmentation (images and masks matched by file stem, plus ``dataset.yaml``)::

    root/dataset.yaml                root/dataset.yaml
    root/train/images/<stem>.png     root/images/<stem>.png
    root/train/masks/<stem>.png      root/masks/<stem>.png
    root/test/images/...             (split by FOLDER_SPLIT_SEED)
    root/test/masks/...

``dataset.yaml`` holds ``num_classes`` (required), ``ignore_index`` (default 255) and ``classes``
(optional list of names). Hidden files and folders (``.name``) are skipped everywhere; every other
file where images are expected must be a readable image with one of torchvision's image extensions.
A ``train/`` folder without ``test/`` is split by the seed as well.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

FOLDER_SPLITS = ("train", "test")
# The split of a folder without train/ and test/ is fixed: it never depends on an experiment's seed,
# so results of different seeds are measured on the same test images (as for the embedded digits).
FOLDER_SPLIT_SEED = 0
FOLDER_TEST_FRACTION = 0.2
METADATA_FILE = "dataset.yaml"
MASK_MODES = ("1", "L", "P", "I", "I;16")
_MAX_LISTED = 20  # problems shown one by one; the rest are counted


@dataclass
class FolderScan:
    """The result of :func:`scan_folder`: what a folder holds and what is wrong with it."""

    root: Path
    task: str | None = None  # "classification" | "segmentation"; None when no layout is recognised
    layout: str = ""
    classes: tuple[str, ...] = ()
    # classification: split -> [(image, class index)]; segmentation: split -> [(image, mask)]
    items: dict[str, list[tuple[Path, Any]]] = field(default_factory=dict)
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    modes: Counter = field(default_factory=Counter)  # PIL mode -> images
    mask_values: Counter = field(default_factory=Counter)  # segmentation: value -> masks holding it
    num_classes: int | None = None
    ignore_index: int | None = None
    problems: list[str] = field(default_factory=list)
    fingerprint: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, Counter]:
        """Per split, images per class (classification) or images (segmentation, key ``"images"``)."""
        if self.task == "classification":
            return {s: Counter(self.classes[label] for _, label in items) for s, items in self.items.items()}
        return {s: Counter({"images": len(items)}) for s, items in self.items.items()}

    def raise_if_invalid(self) -> None:
        """Raise ``ValueError`` with the first problem (and how many more there are)."""
        if self.problems:
            more = len(self.problems) - 1
            extra = f" (and {more} more problem{'s' * (more > 1)}: workbench data check {self.root})" if more else ""
            raise ValueError(self.problems[0] + extra)


def _visible(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


def _subdirs(path: Path) -> list[Path]:
    return [p for p in _visible(path) if p.is_dir()]


def _files(path: Path) -> list[Path]:
    return [p for p in _visible(path) if p.is_file()]


def _fingerprint(root: Path) -> str:
    """Names, sizes and modification times of every visible file: changes when the data changes."""
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        stat = path.stat()
        digest.update(f"{rel}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_header(path: Path, scan: FolderScan) -> tuple[int, int, str] | None:
    """``(width, height, mode)`` of an image, or ``None`` after recording why it cannot be read."""
    if path.suffix.lower() not in IMG_EXTENSIONS:
        scan.problems.append(f"{path}: not an image file (extension {path.suffix or '(none)'!r}); expected one of "
                             f"{', '.join(IMG_EXTENSIONS)}")
        return None
    try:
        with Image.open(path) as image:
            return image.size[0], image.size[1], image.mode
    except Exception as exc:  # PIL raises several types for corrupt or foreign files
        scan.problems.append(f"{path}: cannot be read as an image ({type(exc).__name__}); expected a readable "
                             f"{path.suffix.lower()} file")
        return None


def _seeded_test(names: list[str], salt: str) -> set[str]:
    """The names of one group that go to the test split: a fixed share, drawn by a fixed seed."""
    if len(names) < 2:
        return set()
    rng = np.random.default_rng([FOLDER_SPLIT_SEED, zlib.crc32(salt.encode())])
    n_test = min(len(names) - 1, max(1, round(len(names) * FOLDER_TEST_FRACTION)))
    order = rng.permutation(len(names))
    return {names[i] for i in order[:n_test]}


_MEMO: dict[tuple[str, str], FolderScan] = {}


def scan_folder(root: str | Path) -> FolderScan:
    """Scan ``root`` (see the module docstring); never raises for bad data, it lists the problems.

    Image headers are read for every image (size, mode); segmentation masks are read whole (their
    values). The result is remembered per process until a file changes.
    """
    root = Path(root).expanduser().resolve()
    scan = FolderScan(root=root)
    if not root.is_dir():
        scan.problems.append(f"{root}: not a folder; expected a folder of images (see `workbench data check`)")
        return scan
    scan.fingerprint = _fingerprint(root)
    key = (str(root), scan.fingerprint)
    if key in _MEMO:
        return _MEMO[key]
    split_root = root / "train"
    base = split_root if split_root.is_dir() else root
    if (base / "images").is_dir() and (base / "masks").is_dir():
        # imported here: that module builds on this one's helpers
        from .folder_segmentation_scan import scan_segmentation

        scan_segmentation(scan)
    else:
        scan_classification(scan)
    for split, items in scan.items.items():
        if not items and not scan.problems:
            scan.problems.append(f"{root}: the {split} split is empty; expected at least one image in it "
                                 f"(a class folder with one image goes to train only)")
    if len(_MEMO) > 32:
        _MEMO.clear()
    _MEMO[key] = scan
    return scan


def _class_files(scan: FolderScan, folder: Path) -> dict[str, list[Path]]:
    """Class name -> its readable images, recording empty class folders and unreadable files."""
    out = {}
    for class_dir in _subdirs(folder):
        files = _files(class_dir)
        if not files:
            scan.problems.append(f"{class_dir}: class folder is empty; expected at least one image of class "
                                 f"{class_dir.name!r}")
        good = []
        for path in files:
            header = _read_header(path, scan)
            if header is not None:
                scan.sizes[header[:2]] += 1
                scan.modes[header[2]] += 1
                good.append(path)
        out[class_dir.name] = good
    return out


def scan_classification(scan: FolderScan) -> None:
    """Fill ``scan`` for the ImageFolder layouts (split folders or one folder split by the seed)."""
    root = scan.root
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir():
        train = _class_files(scan, train_dir)
        test = _class_files(scan, test_dir) if test_dir.is_dir() else None
        scan.layout = "train/ and test/ folders" if test is not None else "train/ folder, test split by seed"
    else:
        train, test = _class_files(scan, root), None
        scan.layout = "one folder, split by seed"
    if not train:
        where = train_dir if train_dir.is_dir() else root
        scan.problems.append(f"{where}: no class folders; expected {where}/<class>/<image> "
                             f"(or images/ and masks/ for segmentation)")
        return
    scan.task = "classification"
    scan.classes = tuple(train)
    index = {name: i for i, name in enumerate(scan.classes)}
    if test is None:
        held_out = {c: _seeded_test([p.name for p in files], c) for c, files in train.items()}
        scan.items = {
            "train": [(p, index[c]) for c, files in train.items() for p in files if p.name not in held_out[c]],
            "test": [(p, index[c]) for c, files in train.items() for p in files if p.name in held_out[c]]}
        return
    for name in test:
        if name not in index:
            scan.problems.append(f"{test_dir / name}: class {name!r} is in the test split but not in {train_dir}; "
                                 f"expected test classes among the train classes ({', '.join(scan.classes)})")
    scan.items = {"train": [(p, index[c]) for c, files in train.items() for p in files],
                  "test": [(p, index[c]) for c, files in test.items() if c in index for p in files]}


def describe_scan(scan: FolderScan) -> str:
    """A plain-text report of ``scan`` (what ``workbench data check`` prints)."""
    lines = [f"{scan.root}: {scan.task or 'no recognised layout'}" + (f", {scan.layout}" if scan.layout else "")]
    if scan.task == "classification":
        lines.append(f"classes ({len(scan.classes)}): {', '.join(scan.classes)}")
    elif scan.task == "segmentation":
        names = f" ({', '.join(scan.classes)})" if scan.classes else ""
        lines.append(f"num_classes {scan.num_classes}, ignore_index {scan.ignore_index}{names}")
        if scan.mask_values:
            lines.append("mask values (masks holding each): "
                         + ", ".join(f"{v}: {n}" for v, n in sorted(scan.mask_values.items())))
    for split, counts in scan.counts().items():
        detail = ", ".join(f"{k} {n}" for k, n in counts.items()) if scan.task == "classification" else ""
        n = sum(counts.values())
        lines.append(f"{split}: {n} image{'s' * (n != 1)}" + (f" ({detail})" if detail else ""))
    if scan.sizes:
        (w, h), n = scan.sizes.most_common(1)[0]
        widths, heights = [s[0] for s in scan.sizes], [s[1] for s in scan.sizes]
        lines.append(f"image sizes (w x h): {len(scan.sizes)} distinct, {min(widths)}..{max(widths)} x "
                     f"{min(heights)}..{max(heights)}, most common {w}x{h} ({n} images)")
    if scan.modes:
        lines.append("channels (PIL modes): " + ", ".join(f"{m} {n}" for m, n in sorted(scan.modes.items()))
                     + " -> loaded as 3 channels (grayscale repeated, alpha dropped) unless channels=1")
    if scan.problems:
        lines.append(f"refused ({len(scan.problems)} problem{'s' * (len(scan.problems) > 1)}):")
        lines += [f"  - {p}" for p in scan.problems[:_MAX_LISTED]]
        if len(scan.problems) > _MAX_LISTED:
            lines.append(f"  ... and {len(scan.problems) - _MAX_LISTED} more")
    else:
        lines.append("nothing refused: usable as a dataset (-p dataset " + str(scan.root) + ")")
    return "\n".join(lines)
