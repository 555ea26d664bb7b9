"""Tiny CIFAR and Cityscapes trees in the real on-disk formats, for loader tests.

CIFAR: the python-pickle batches (dict with ``data`` (N, 3072) uint8 rows R|G|B, ``labels`` or
``fine_labels``/``coarse_labels``, ``filenames``, ``batch_label``) and the meta pickle.
Cityscapes: ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` (RGB) and
``gtFine/<split>/<city>/..._gtFine_labelIds.png`` (8-bit label ids) plus the ``_color`` sibling
that loaders must not confuse with the label ids.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _dump(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official release is a python-2 pickle


def write_fake_cifar10(root: Path, per_batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``root/cifar-10-batches-py``; return ``{"train"/"test": (images NHWC, labels)}``."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "cifar-10-batches-py"
    out: dict[str, list] = {"train": [[], []], "test": [[], []]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        _dump({"batch_label": f"fake {name}", "labels": labels,
               "data": images.transpose(0, 3, 1, 2).reshape(per_batch, 3072),
               "filenames": [f"img_{name}_{i}.png" for i in range(per_batch)]}, base / name)
        split = "test" if name == "test_batch" else "train"
        out[split][0].append(images)
        out[split][1].extend(labels)
    _dump({"num_cases_per_batch": per_batch, "label_names": list(CIFAR10_NAMES), "num_vis": 3072},
          base / "batches.meta")
    return {s: (np.concatenate(v[0]), np.array(v[1])) for s, v in out.items()}


def write_fake_cifar100(root: Path, n: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``root/cifar-100-python``; return ``{"train"/"test": (images NHWC, fine labels)}``."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "cifar-100-python"
    fine = [f"fine_class_{i:02d}" for i in range(100)]
    coarse = [f"coarse_class_{i:02d}" for i in range(20)]
    out = {}
    for split in ("train", "test"):
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 100, size=n)
        labels[0] = 99  # the top label must be in range too
        _dump({"filenames": [f"{split}_{i}.png" for i in range(n)], "batch_label": f"fake {split}",
               "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
               "data": images.transpose(0, 3, 1, 2).reshape(n, 3072)}, base / split)
        out[split] = (images, labels)
    _dump({"fine_label_names": fine, "coarse_label_names": coarse}, base / "meta")
    return out


# label ids written into fake masks, with their Cityscapes train ids (255 = ignored)
CITYSCAPES_FAKE_IDS = {0: 255, 1: 255, 7: 0, 8: 1, 9: 255, 11: 2, 21: 8, 23: 10, 24: 11, 26: 13, 33: 18}


def write_fake_cityscapes(root: Path, cities: dict[str, dict[str, int]] | None = None,
                          size: tuple[int, int] = (16, 32), seed: int = 0) -> dict[str, list[tuple]]:
    """Write a Cityscapes tree; return ``{split: [(image path, rgb HWC, label ids HW), ...]}``
    sorted by path. ``cities`` maps split -> {city: number of frames}."""
    cities = cities or {"train": {"aachen": 2, "bremen": 1}, "val": {"frankfurt": 2}}
    rng = np.random.default_rng(seed)
    ids = np.array(sorted(CITYSCAPES_FAKE_IDS), dtype=np.uint8)
    out: dict[str, list[tuple]] = {}
    for split, per_city in cities.items():
        out[split] = []
        for city, frames in per_city.items():
            for k in range(frames):
                stem = f"{city}_{k:06d}_{19 + k:06d}"
                img_path = Path(root) / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
                gt_dir = Path(root) / "gtFine" / split / city
                img_path.parent.mkdir(parents=True, exist_ok=True)
                gt_dir.mkdir(parents=True, exist_ok=True)
                rgb = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                label_ids = ids[rng.integers(0, len(ids), size=size)]
                Image.fromarray(rgb).save(img_path)
                Image.fromarray(label_ids).save(gt_dir / f"{stem}_gtFine_labelIds.png")
                # a decoy: the colour rendering has the same stem and must not be read as labels
                Image.fromarray(rgb).save(gt_dir / f"{stem}_gtFine_color.png")
                out[split].append((img_path, rgb, label_ids))
        out[split].sort(key=lambda t: str(t[0]))
    return out
