"""CIFAR-10 / CIFAR-100 from the python-pickle release, in torchvision's on-disk layout.

``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``<root>/cifar-100-python/{train, test, meta}``, exactly what the official tarballs (and
``torchvision.datasets.CIFAR10/100(download=True)``) extract. File names and checksums come from
torchvision's classes; reading is done here so a missing file is reported by exact path before
anything is loaded, nothing is ever downloaded, and the images stay a uint8 tensor that the
tensor-native ``transforms.v2`` pipeline consumes without a PIL round trip.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from ._validate import check_bool, check_choice
from .paths import ROOT_HINT

CIFAR_SPLITS = ("train", "test")
# per-channel statistics used by IEBN's official CIFAR scripts (docs/methods.md, *IEBN*), for both datasets
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

_SOURCES = {
    "cifar10": (CIFAR10, "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "labels"),
    "cifar100": (CIFAR100, "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "fine_labels"),
}


def cifar_layout(name: str) -> str:
    """The expected folder layout of ``name``, for error messages and the data README."""
    tv, url, _ = _SOURCES[check_choice("name", name, _SOURCES)]
    files = [f for f, _ in tv.train_list + tv.test_list] + [tv.meta["filename"]]
    return (f"<root>/{tv.base_folder}/{{{', '.join(files)}}} (the python version, {url}, "
            f"extracted into <root>)")


def cifar_files(name: str, split: str, root: Path) -> tuple[list[tuple[Path, str]], tuple[Path, str]]:
    """``([(batch file, md5), ...], (meta file, md5))`` that ``split`` of ``name`` reads under ``root``."""
    tv, _, _ = _SOURCES[name]
    base = root / tv.base_folder
    entries = tv.train_list if split == "train" else tv.test_list
    return [(base / f, md5) for f, md5 in entries], (base / tv.meta["filename"], tv.meta["md5"])


def check_cifar_files(name: str, split: str, root: Path, verify: bool = False) -> None:
    """Raise ``FileNotFoundError`` naming the first missing path (root, folder, then files)."""
    batches, meta = cifar_files(name, split, root)
    hint = (f"Expected layout: {cifar_layout(name)}. Nothing is downloaded automatically; "
            f"{ROOT_HINT}: the folder that holds {batches[0][0].parent.name}/.")
    if not root.is_dir():
        raise FileNotFoundError(f"{name} data root {root} does not exist. {hint}")
    if not batches[0][0].parent.is_dir():
        raise FileNotFoundError(f"{name}: folder {batches[0][0].parent} is missing. {hint}")
    missing = [str(p) for p, _ in [*batches, meta] if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{name} split {split!r}: missing {', '.join(missing)}. {hint}")
    if verify:
        corrupt = [str(p) for p, md5 in [*batches, meta] if not check_integrity(str(p), md5)]
        if corrupt:
            raise OSError(f"{name}: md5 mismatch (corrupt or not the official release): {', '.join(corrupt)}")


def _unpickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        # latin1 reads the python-2 pickles of the official release (and python-3 ones) alike
        return pickle.load(f, encoding="latin1")


def cifar_transform(train: bool, normalize: bool = True) -> v2.Compose:
    """The standard pipeline on a uint8 (3,32,32) tensor: pad-4 random crop + flip when ``train``."""
    steps: list[Any] = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if train else []
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if normalize:
        steps.append(v2.Normalize(CIFAR_MEAN, CIFAR_STD))
    return v2.Compose(steps)


class CIFARDataset(Dataset):
    """CIFAR-10 or CIFAR-100 (fine labels) for one split, held in memory as uint8.

    Items are ``(image float32 (3,32,32), label int)``. ``augment`` (default: ``split == "train"``)
    selects RandomCrop(32, padding=4) + RandomHorizontalFlip before ToDtype + Normalize;
    ``transform`` replaces the whole pipeline and receives the uint8 (3,32,32) tensor.
    ``verify=True`` also checks the md5 sums of the official release (slow, about 1 s).
    Random transforms draw from torch's global RNG (seeded by ``seed_everything`` or, in
    ``DataLoader`` workers, by the loader's seed).
    """

    task = "classification"
    in_channels = 3
    ignore_index = None

    def __init__(
        self,
        name: str,
        split: str,
        root: str | Path,
        augment: bool | None = None,
        normalize: bool = True,
        transform: Any = None,
        verify: bool = False,
    ) -> None:
        self.name = check_choice("name", name, _SOURCES)
        self.split = check_choice("split", split, CIFAR_SPLITS)
        self.augment = split == "train" if augment is None else check_bool("augment", augment)
        self.normalize = check_bool("normalize", normalize)
        if transform is not None and not callable(transform):
            raise ValueError(f"transform={transform!r} must be callable or None")
        check_bool("verify", verify)
        self.root = Path(root)
        check_cifar_files(name, split, self.root, verify=verify)

        batches, meta_file = cifar_files(name, split, self.root)
        label_key = _SOURCES[name][2]
        meta = _unpickle(meta_file[0])
        self.classes = tuple(meta[_SOURCES[name][0].meta["key"]])
        self.num_classes = len(self.classes)
        data, labels = [], []
        for path, _ in batches:
            entry = _unpickle(path)
            data.append(torch.as_tensor(entry["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry[label_key])
        # the pickles store rows as R(1024) G(1024) B(1024): reshaping gives CHW directly
        self.data = torch.cat(data)
        self.targets = torch.tensor(labels, dtype=torch.int64)
        if len(self.targets) and (int(self.targets.min()) < 0 or int(self.targets.max()) >= self.num_classes):
            raise ValueError(f"{name}: labels outside 0..{self.num_classes - 1} in {self.root}")
        self.mean = CIFAR_MEAN if normalize else (0.0, 0.0, 0.0)
        self.std = CIFAR_STD if normalize else (1.0, 1.0, 1.0)
        self.image_size = (32, 32)
        self.transform = transform if transform is not None else cifar_transform(self.augment, normalize)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.data[index]), int(self.targets[index])

    def tensors(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split un-augmented and normalised, ``(X (N,3,32,32) float32, y (N,) int64)``.

        600 MB for the CIFAR train split: meant for a GPU, where the work is then one transfer.
        """
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        data = self.data if device is None else self.data.to(device)
        x = (data.float().div_(255) - mean.to(data.device)) / std.to(data.device)
        return x, self.targets.clone() if device is None else self.targets.to(device)

    def __repr__(self) -> str:
        return f"CIFARDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, augment={self.augment})"
