"""Small folders of PNGs in the two layouts the workbench reads, and broken ones, for the folder-dataset tests.

Classification: three classes whose images differ in brightness (so a network can learn them),
grayscale and RGB images of different sizes mixed in every class. Segmentation: RGB images with
a bright square on a dark background and masks labelling it (class 1 or 2 by its colour), plus a
few ignore-index pixels, and ``dataset.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("bright", "dark", "mid")
_LEVEL = {"bright": 220, "dark": 30, "mid": 125}


def _class_image(rng: np.random.Generator, cls: str, i: int) -> Image.Image:
    w, h = 14 + 5 * (i % 3), 12 + 3 * (i % 4)  # several sizes in every class
    noise = rng.integers(-20, 21, size=(h, w, 3))
    rgb = np.clip(_LEVEL[cls] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    return image.convert("L") if i % 2 else image  # every other image grayscale


def write_classification(root: Path, per_class: dict[str, int] | None = None, split_folders: bool = True,
                         test_per_class: int = 2, seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png``, or with ``split_folders=False``
    the one-folder layout ``root/<class>/*.png``."""
    rng = np.random.default_rng(seed)
    per_class = per_class or {c: 6 for c in CLASSES}
    splits = ({"train": per_class, "test": {c: test_per_class for c in per_class}} if split_folders
              else {"": per_class})
    for split, counts in splits.items():
        for cls, n in counts.items():
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _class_image(rng, cls, i).save(folder / f"{cls}_{i}.png")
    return root


def write_segmentation(root: Path, n: int = 10, size: tuple[int, int] = (40, 48), num_classes: int = 3,
                       ignore_index: int = 255, seed: int = 0) -> Path:
    """``root/images/<stem>.png`` + ``root/masks/<stem>.png`` + ``root/dataset.yaml`` (one folder,
    split by the seed)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    names = ", ".join(["background", "red", "green", *[f"c{k}" for k in range(3, num_classes)]][:num_classes])
    (root / "dataset.yaml").write_text(f"num_classes: {num_classes}\nignore_index: {ignore_index}\n"
                                       f"classes: [{names}]\n")
    h, w = size
    for i in range(n):
        image = rng.integers(0, 40, size=(h, w, 3)).astype(np.uint8)
        mask = np.zeros((h, w), dtype=np.uint8)
        label = 1 + i % 2
        top, left, side = int(rng.integers(0, h - 16)), int(rng.integers(0, w - 16)), 16
        image[top:top + side, left:left + side, label - 1] = 230
        mask[top:top + side, left:left + side] = label
        mask[0, :2] = ignore_index
        Image.fromarray(image, "RGB").save(root / "images" / f"scene{i}.png")
        Image.fromarray(mask, "L").save(root / "masks" / f"scene{i}.png")
    return root


# ----------------------------------------------------------------------------------------------
# Bad input: each builder returns (root, the regex of the message that refuses it)


def _empty_class(tmp_path):
    root = write_classification(tmp_path / "data")
    for f in (root / "train" / "mid").iterdir():
        f.unlink()
    return root, f"{root}/train/mid: class folder is empty; expected at least one image of class 'mid'"


def _mask_size(tmp_path):
    root = write_segmentation(tmp_path / "data")
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8), "L").save(root / "masks" / "scene3.png")
    return root, f"{root}/masks/scene3.png: mask is 12x10 but its image scene3.png is 48x40; expected the same size"


def _mask_value(tmp_path):
    root = write_segmentation(tmp_path / "data")
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[5, 5] = 7
    Image.fromarray(mask, "L").save(root / "masks" / "scene4.png")
    return root, (f"{root}/masks/scene4.png: value 7 is above the classes 0..2 and is not the ignore_index 255; "
                  "expected class indices or 255")


def _text_file(tmp_path):
    root = write_classification(tmp_path / "data")
    (root / "train" / "dark" / "notes.txt").write_text("not an image")
    return root, f"{root}/train/dark/notes.txt: not an image file \\(extension '.txt'\\); expected one of .jpg"


def _corrupt_png(tmp_path):
    root = write_classification(tmp_path / "data")
    (root / "train" / "dark" / "broken.png").write_bytes(b"\x89PNG but not really")
    return root, f"{root}/train/dark/broken.png: cannot be read as an image \\(.*\\); expected a readable .png file"


def _test_class_missing_in_train(tmp_path):
    root = write_classification(tmp_path / "data")
    (root / "test" / "extra").mkdir()
    Image.new("L", (16, 16)).save(root / "test" / "extra" / "a.png")
    return root, (f"{root}/test/extra: class 'extra' is in the test split but not in {root}/train; expected test "
                  "classes among the train classes \\(bright, dark, mid\\)")


BAD_INPUTS = {"empty class folder": _empty_class, "mask size differs": _mask_size,
              "mask value above the classes": _mask_value, "unreadable file type": _text_file,
              "corrupt image": _corrupt_png, "test class not in train": _test_class_missing_in_train}
