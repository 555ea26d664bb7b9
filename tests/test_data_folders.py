"""Folder datasets: the two layouts, the fixed split, cached normalisation statistics, and every bad
input refused with a short message naming the path and what was expected."""

import json

import pytest
import torch
from image_folders import BAD_INPUTS, CLASSES, write_classification, write_segmentation
from PIL import Image

from workbench.data import (
    FOLDER_SPLIT_SEED,
    FOLDER_TEST_FRACTION,
    ImageFolderDataset,
    MaskFolderDataset,
    check_dataset,
    describe_dataset,
    folder_stats,
    get_dataset,
    scan_folder,
)
from workbench.data.folder_stats import STATS_FILE


def test_classification_split_folders(tmp_path):
    root = write_classification(tmp_path / "shapes")
    train, test = get_dataset(str(root), "train"), get_dataset(str(root), "test")
    assert isinstance(train, ImageFolderDataset) and train.task == "classification"
    assert train.classes == CLASSES and train.num_classes == 3
    assert (len(train), len(test)) == (18, 6)
    assert train.targets.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    # grayscale and RGB images of several sizes all come out as 3 x 32 x 32, normalised
    shapes = {tuple(train[i][0].shape) for i in range(len(train))}
    assert shapes == {(3, 32, 32)}
    x = torch.stack([train[i][0] for i in range(len(train))])
    assert x.mean().abs() < 0.05 and (x.std() - 1).abs() < 0.1
    # the classes differ in brightness: the normalised means order them
    means = [x[train.targets == k].mean() for k in range(3)]
    assert means[0] > means[2] > means[1]


def test_size_and_channels_options(tmp_path):
    root = str(write_classification(tmp_path / "shapes"))
    assert tuple(get_dataset(root, "train", size=16)[0][0].shape) == (3, 16, 16)
    assert tuple(get_dataset(root, "train", size=(12, 20), channels=1)[0][0].shape) == (1, 12, 20)
    with pytest.raises(ValueError, match="colour.*allowed: size, channels, augment, normalize"):
        get_dataset(root, "train", colour=True)
    with pytest.raises(ValueError, match="channels=2"):
        get_dataset(root, "train", channels=2)


def test_one_folder_is_split_by_the_fixed_seed(tmp_path):
    root = write_classification(tmp_path / "flat", per_class={"bright": 10, "dark": 5, "mid": 1}, split_folders=False)
    scan = scan_folder(root)
    assert scan.layout == "one folder, split by seed" and FOLDER_SPLIT_SEED == 0
    counts = scan.counts()
    # a fixed share of every class with two images or more is held out; one image stays in train
    assert counts["test"] == {"bright": round(10 * FOLDER_TEST_FRACTION), "dark": 1}
    assert counts["train"] == {"bright": 8, "dark": 4, "mid": 1}
    train, test = get_dataset(str(root), "train"), get_dataset(str(root), "test")
    train_files = {p for p, _ in train.samples}
    test_files = {p for p, _ in test.samples}
    assert not train_files & test_files and len(train_files | test_files) == 16
    # the same files every time, in any process: it depends on the names only
    again = write_classification(tmp_path / "copy", per_class={"bright": 10, "dark": 5, "mid": 1},
                                 split_folders=False)
    assert {p.split("/")[-1] for p in test_files} == {p.name for p, _ in scan_folder(again).items["test"]}


def test_statistics_are_cached_beside_the_data(tmp_path, monkeypatch):
    root = write_classification(tmp_path / "shapes")
    first = get_dataset(str(root), "train")
    cache = json.loads((root / STATS_FILE).read_text())
    (key, entry), = cache.items()
    assert "size=32x32" in key and entry["mean"] == list(first.mean) and entry["images"] == 18

    def fail(*args, **kwargs):
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(folder_stats, "channel_stats", fail)
    assert get_dataset(str(root), "test").mean == first.mean  # test split: the train split's statistics
    # new data invalidates the entry: the statistics are computed again
    Image.new("RGB", (20, 20), (255, 255, 255)).save(root / "train" / "bright" / "extra.png")
    with pytest.raises(AssertionError, match="recomputed"):
        get_dataset(str(root), "train")


def test_segmentation_folder(tmp_path):
    root = write_segmentation(tmp_path / "scenes", n=10)
    train, test = get_dataset(str(root), "train"), get_dataset(str(root), "test")
    assert isinstance(train, MaskFolderDataset) and train.task == "segmentation"
    assert (len(train), len(test)) == (8, 2)
    assert train.num_classes == 3 and train.ignore_index == 255
    assert train.classes == ("background", "red", "green")
    image, mask = train[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert mask.shape == (64, 64) and mask.dtype == torch.int64
    values = set(torch.cat([train[i][1].flatten() for i in range(len(train))]).tolist())
    assert values == {0, 1, 2, 255}  # nearest-neighbour resizing: no value that is no class
    augmented = get_dataset(str(root), "train", augment=True, size=32)
    assert augmented[0][0].shape == (3, 32, 32) and augmented[0][1].shape == (32, 32)


def test_check_dataset_names_builtins_and_folders(tmp_path):
    root = write_classification(tmp_path / "shapes")
    assert check_dataset("digits", task="classification") == "digits"
    assert describe_dataset(str(root)).label == "shapes"
    seg = write_segmentation(tmp_path / "scenes")
    with pytest.raises(ValueError, match="scenes' is a segmentation dataset; expected a classification"):
        check_dataset(str(seg), task="classification")
    with pytest.raises(ValueError, match="name='mnist'.*'digits'.*folder path"):
        check_dataset("mnist")


# ----------------------------------------------------------------------------------------------
# Bad input: each refused before any image is loaded, naming the path and what was expected


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_with_a_short_message(case, tmp_path):
    root, message = BAD_INPUTS[case](tmp_path)
    for call in (lambda: get_dataset(str(root), "train"), lambda: check_dataset(str(root))):
        with pytest.raises(ValueError, match=message) as info:
            call()
        text = str(info.value)
        assert "\n" not in text and len(text) < 300, text
    assert not (root / STATS_FILE).exists()  # refused before any statistics were computed


def test_every_problem_is_listed_by_the_scan(tmp_path):
    root = write_classification(tmp_path / "data")
    (root / "train" / "dark" / "notes.txt").write_text("x")
    (root / "train" / "dark" / "more.csv").write_text("x")
    scan = scan_folder(root)
    assert len(scan.problems) == 2 and not scan.ok
    with pytest.raises(ValueError, match=r"more.csv.*\(and 1 more problem: workbench data check"):
        scan.raise_if_invalid()


@pytest.mark.parametrize("meta, message", [
    (None, "dataset.yaml: missing; expected num_classes"),
    ("num_classes: 1\n", "is not valid; expected num_classes"),
    ("num_classes: 3\nignore_index: 1\n", "ignore_index 1 is a class index"),
    ("num_classes: 3\nclasses: [a, b]\n", "classes as long as num_classes"),
])
def test_segmentation_metadata_is_checked(tmp_path, meta, message):
    root = write_segmentation(tmp_path / "data")
    if meta is None:
        (root / "dataset.yaml").unlink()
    else:
        (root / "dataset.yaml").write_text(meta)
    with pytest.raises(ValueError, match=message):
        get_dataset(str(root), "train")


def test_segmentation_pairs_are_checked(tmp_path):
    root = write_segmentation(tmp_path / "data")
    (root / "masks" / "scene2.png").unlink()
    Image.new("RGB", (48, 40)).save(root / "masks" / "scene5.png")
    Image.new("L", (48, 40)).save(root / "masks" / "orphan.png")
    problems = scan_folder(root).problems
    assert any(p.startswith(f"{root}/images/scene2.png: no mask with stem 'scene2'") for p in problems)
    assert any(p.startswith(f"{root}/masks/scene5.png: mode 'RGB'; expected a single-channel mask") for p in problems)
    assert any(p.startswith(f"{root}/masks/orphan.png: no image with stem 'orphan'") for p in problems)


def test_not_a_folder(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}/absent: not a folder; expected a folder of images"):
        get_dataset(str(tmp_path / "absent"), "train")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="nothing: no class folders; expected"):
        check_dataset(str(tmp_path / "nothing"))
