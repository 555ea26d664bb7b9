"""Datasets: shapes, labels, fixed splits, determinism, on-disk formats and error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fake_datasets import (
    CIFAR10_NAMES,
    CITYSCAPES_FAKE_IDS,
    write_fake_cifar10,
    write_fake_cifar100,
    write_fake_cityscapes,
)
from PIL import Image

from workbench.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    CITYSCAPES_CLASSES,
    DATA_ENV_VAR,
    DATASET_INFO,
    default_data_root,
    get_dataset,
    label_id_to_train_id,
    list_datasets,
    make_loader,
)
from workbench.data.digits import digit_split

# ---------------------------------------------------------------- registry and argument checks


def test_registry_names():
    assert list_datasets() == ["digits", "digit-scenes", "fashion-mnist", "fashion-scenes", "synthetic", "cifar10",
                               "cifar100", "cityscapes"]
    for name, info in DATASET_INFO.items():
        assert info.name == name
        assert info.task in ("classification", "segmentation")


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="name='mnist'.*'digits'"):
        get_dataset("mnist", "train")


def test_unknown_split_lists_allowed():
    with pytest.raises(ValueError, match="split='val'.*'train', 'test'"):
        get_dataset("digits", "val")


def test_unknown_option_lists_allowed():
    with pytest.raises(ValueError, match="colour.*allowed: size, augment"):
        get_dataset("digits", "train", colour=True)


def test_bad_option_value():
    with pytest.raises(ValueError, match="size=4"):
        get_dataset("digits", "train", size=4)
    with pytest.raises(ValueError, match="augment='yes'"):
        get_dataset("digits", "train", augment="yes")


# ---------------------------------------------------------------- digits


def test_digits_sizes_and_stratified_fixed_split():
    train, test = get_dataset("digits", "train"), get_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    assert len(test) == 360
    # disjoint and covering all of load_digits
    idx = torch.cat([train.source_indices, test.source_indices])
    assert sorted(idx.tolist()) == list(range(1797))
    # stratified: every class within one sample of 20% in the test split
    counts_all = torch.bincount(torch.cat([train.targets, test.targets]), minlength=10)
    counts_test = torch.bincount(test.targets, minlength=10)
    assert torch.all((counts_test.float() - 0.2 * counts_all.float()).abs() <= 1.0)
    # the split is a fixed property of the dataset, not of any seed
    torch.manual_seed(123)
    np.random.seed(123)
    _, _, again = digit_split("test")
    assert again.tolist() == test.source_indices.tolist()


def test_digits_item_format_and_normalisation():
    train = get_dataset("digits", "train")
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y <= 9
    assert train.num_classes == 10 and train.classes == tuple("0123456789")
    assert train.task == "classification" and train.in_channels == 3 and train.ignore_index is None
    assert train.targets.dtype == torch.int64 and train.targets.shape == (len(train),)
    X, Y = train.tensors()
    assert abs(float(X.mean())) < 1e-4 and abs(float(X.std()) - 1.0) < 1e-3
    assert torch.equal(X[:, 0], X[:, 1]) and torch.equal(X[:, 0], X[:, 2])
    # tensors() hands out copies: mutating them does not touch the dataset
    X.zero_()
    assert float(train[0][0].abs().sum()) > 0


def test_digits_upsampling_matches_source():
    train = get_dataset("digits", "train", size=16)
    images, labels, _ = digit_split("train")
    assert train[5][0].shape == (3, 16, 16)
    assert int(labels[5]) == train[5][1]
    # undo the normalisation: the bilinear upsampling of the same scan, in [0, 1]
    raw = train.images[5, 0] * train.std[0] + train.mean[0]
    source = torch.from_numpy(images[5].copy())
    expected = torch.nn.functional.interpolate(source[None, None], size=(16, 16), mode="bilinear")[0, 0]
    assert torch.allclose(raw, expected, atol=1e-5)
    assert float(raw.min()) >= -1e-6 and float(raw.max()) <= 1 + 1e-6
    # and pooled back to 8x8 it still looks like the scan
    pooled = torch.nn.functional.avg_pool2d(raw[None, None], 2)[0, 0]
    assert np.corrcoef(pooled.flatten().numpy(), source.flatten().numpy())[0, 1] > 0.9


def test_digits_augment_deterministic_under_seed():
    ds = get_dataset("digits", "train", augment=True)
    torch.manual_seed(0)
    a = torch.stack([ds[i][0] for i in range(8)])
    torch.manual_seed(0)
    b = torch.stack([ds[i][0] for i in range(8)])
    assert torch.equal(a, b)
    plain = get_dataset("digits", "train")
    assert not torch.equal(a, torch.stack([plain[i][0] for i in range(8)]))
    # a shift keeps the pixel values: the padded border holds the background value
    assert a.shape == (8, 3, 32, 32)


def test_make_loader_seeded_shuffle_and_drop_last():
    ds = get_dataset("digits", "test")
    first = [y.tolist() for _, y in make_loader(ds, 64, train=True, seed=3)]
    again = [y.tolist() for _, y in make_loader(ds, 64, train=True, seed=3)]
    other = [y.tolist() for _, y in make_loader(ds, 64, train=True, seed=4)]
    assert first == again and first != other
    assert all(len(b) == 64 for b in first) and len(first) == 360 // 64
    ordered = list(make_loader(ds, 64, train=False))
    assert sum(len(y) for _, y in ordered) == 360
    assert torch.equal(torch.cat([y for _, y in ordered]), ds.targets)
    # a dataset smaller than one batch still yields one batch when training
    small = torch.utils.data.Subset(ds, range(10))
    assert len(list(make_loader(small, 64, train=True))) == 1
    with pytest.raises(ValueError, match="batch_size=0"):
        make_loader(ds, 0, train=True)


# ---------------------------------------------------------------- digit-scenes


def test_scenes_format():
    ds = get_dataset("digit-scenes", "train", length=6)
    assert len(ds) == 6 and ds.num_classes == 11 and ds.task == "segmentation"
    assert ds.classes[0] == "background" and ds.classes[1:] == tuple("0123456789")
    assert ds.ignore_index == 255 and ds.in_channels == 3
    x, m = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert m.shape == (64, 64) and m.dtype == torch.int64
    assert int(m.min()) >= 0 and int(m.max()) <= 10 and int(m.max()) > 0
    assert len(get_dataset("digit-scenes", "train")) == 512
    assert len(get_dataset("digit-scenes", "test")) == 128
    big = get_dataset("digit-scenes", "test", size=96, length=2)
    assert big[1][0].shape == (3, 96, 96) and big[1][1].shape == (96, 96)
    with pytest.raises(ValueError, match="size=32"):
        get_dataset("digit-scenes", "train", size=32)
    with pytest.raises(IndexError):
        ds[6]


def test_scenes_deterministic_per_seed_and_index():
    a = get_dataset("digit-scenes", "train", length=4, seed=1)
    b = get_dataset("digit-scenes", "train", length=4, seed=1)
    c = get_dataset("digit-scenes", "train", length=4, seed=2)
    # any access order, any RNG state: scene i is a function of (seed, split, i)
    torch.manual_seed(99)
    for i in (3, 0, 2):
        xa, ma = a[i]
        xb, mb = b[i]
        assert torch.equal(xa, xb) and torch.equal(ma, mb)
    assert not torch.equal(a[0][1], c[0][1])
    assert not torch.equal(a[0][1], a[1][1])
    test = get_dataset("digit-scenes", "test", length=4, seed=1)
    assert not torch.equal(a[0][1], test[0][1])


def test_scenes_label_image_alignment():
    ds = get_dataset("digit-scenes", "train", length=8)
    for i in range(len(ds)):
        s = ds.scene(i)
        image, mask, background = s["image"], s["mask"], s["background"]
        assert 1 <= len(s["placements"]) <= 4
        expected = torch.zeros_like(mask)
        for p in s["placements"]:
            t, l, n = p["top"], p["left"], p["size"]
            footprint = torch.from_numpy(p["pixels"])
            assert p["label"] == p["digit"] + 1 and footprint.any()
            # boxes do not overlap, so the region is still unlabelled before this digit
            assert not expected[t:t + n, l:l + n].any()
            expected[t:t + n, l:l + n][footprint] = p["label"]
        assert torch.equal(mask, expected)
        bg = mask == 0
        # background pixels are the untouched background, digit pixels were painted over
        assert torch.equal(image[:, bg], background[:, bg])
        assert (image[:, ~bg] != background[:, ~bg]).any(dim=0).all()
        # the normalised item is the same scene
        x, m = ds[i]
        assert torch.equal(m, mask)
        assert torch.allclose(x * torch.tensor(ds.std).view(3, 1, 1) + torch.tensor(ds.mean).view(3, 1, 1),
                              image, atol=1e-5)


def test_scenes_use_split_digits_only():
    _, _, train_idx = digit_split("train")
    _, _, test_idx = digit_split("test")
    for split, allowed in (("train", set(train_idx.tolist())), ("test", set(test_idx.tolist()))):
        ds = get_dataset("digit-scenes", split, length=10)
        used = {p["source_index"] for i in range(10) for p in ds.scene(i)["placements"]}
        assert used and used <= allowed


def test_scenes_digit_is_the_labelled_digit():
    # the footprint is the thresholded, resized source scan of the recorded class
    ds = get_dataset("digit-scenes", "test", length=3, threshold=0.5)
    images, labels, idx = digit_split("test")
    row = {int(j): k for k, j in enumerate(idx)}
    for i in range(3):
        for p in ds.scene(i)["placements"]:
            k = row[p["source_index"]]
            assert int(labels[k]) == p["digit"]
            scan = torch.nn.functional.interpolate(torch.from_numpy(images[k].copy())[None, None],
                                                   size=(p["size"],) * 2, mode="bilinear")[0, 0]
            assert torch.equal(scan > 0.5, torch.from_numpy(p["pixels"]))


# ---------------------------------------------------------------- CIFAR (fake trees, real format)


def _normalised(images_nhwc: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    return root, write_fake_cifar10(root), write_fake_cifar100(root)


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_loads_real_format(cifar_root, split):
    root, ref, _ = cifar_root
    ds = get_dataset("cifar10", split, root=root, augment=False)
    images, labels = ref[split]
    assert len(ds) == len(labels) == (15 if split == "train" else 3)
    assert ds.classes == CIFAR10_NAMES and ds.num_classes == 10 and ds.task == "classification"
    assert ds.targets.dtype == torch.int64 and ds.targets.tolist() == labels.tolist()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert x.shape == (len(ds), 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, _normalised(images, CIFAR_MEAN, CIFAR_STD), atol=1e-5)
    assert ds[1][1] == int(labels[1])
    X, Y = ds.tensors()
    assert torch.allclose(X, x, atol=1e-5) and torch.equal(Y, ds.targets)


def test_cifar100_loads_fine_labels(cifar_root):
    root, _, ref = cifar_root
    ds = get_dataset("cifar100", "test", root=root)
    images, labels = ref["test"]
    assert ds.num_classes == 100 and ds.classes[0] == "fine_class_00" and ds.classes[99] == "fine_class_99"
    assert ds.targets.tolist() == labels.tolist() and int(ds.targets.max()) == 99
    assert not ds.augment  # test split is not augmented by default
    assert torch.allclose(ds[2][0], _normalised(images[2:3], CIFAR_MEAN, CIFAR_STD)[0], atol=1e-5)
    assert len(get_dataset("cifar100", "train", root=root)) == 5


def test_cifar_train_augmentation(cifar_root):
    root, ref, _ = cifar_root
    ds = get_dataset("cifar10", "train", root=root)
    assert ds.augment
    torch.manual_seed(0)
    a = [ds[i][0] for i in range(15)]
    torch.manual_seed(0)
    b = [ds[i][0] for i in range(15)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    plain = _normalised(ref["train"][0], CIFAR_MEAN, CIFAR_STD)
    assert any(not torch.allclose(u, plain[i], atol=1e-5) for i, u in enumerate(a))
    assert all(u.shape == (3, 32, 32) for u in a)


def test_cifar_missing_files_named(cifar_root, tmp_path):
    missing_root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing_root}.*cifar-10-batches-py.*data_batch_1"):
        get_dataset("cifar10", "train", root=missing_root)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'cifar-100-python'} is missing"):
        get_dataset("cifar100", "test", root=tmp_path)
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing .*data_batch_3. Expected layout"):
        get_dataset("cifar10", "train", root=tmp_path)
    assert len(get_dataset("cifar10", "test", root=tmp_path)) == 3  # the test split does not need it


def test_cifar_verify_rejects_non_official(cifar_root):
    root, _, _ = cifar_root
    with pytest.raises(OSError, match="md5 mismatch.*test_batch"):
        get_dataset("cifar10", "test", root=root, verify=True)


def test_data_root_from_env(cifar_root, monkeypatch):
    root, _, _ = cifar_root
    monkeypatch.setenv(DATA_ENV_VAR, str(root))
    assert default_data_root() == root
    assert len(get_dataset("cifar10", "test")) == 3
    monkeypatch.delenv(DATA_ENV_VAR)
    assert default_data_root() == Path(__file__).resolve().parents[1] / "data"


# ---------------------------------------------------------------- Cityscapes (fake tree, real format)


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    return root, write_fake_cityscapes(root)


def test_cityscapes_train_id_table():
    lut = label_id_to_train_id()
    assert lut.shape == (256,)
    assert sorted(set(lut.tolist()) - {255}) == list(range(19))
    for label_id, train_id in CITYSCAPES_FAKE_IDS.items():
        assert int(lut[label_id]) == train_id
    assert CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[18] == "bicycle"


def test_cityscapes_loads_with_train_ids(cityscapes_root):
    root, ref = cityscapes_root
    ds = get_dataset("cityscapes", "val", root=root)
    assert len(ds) == 2 and ds.num_classes == 19 and ds.ignore_index == 255 and ds.task == "segmentation"
    assert [p[0] for p in ds.pairs] == [r[0] for r in ref["val"]]
    mapping = np.full(256, 255, dtype=np.int64)
    for label_id, train_id in CITYSCAPES_FAKE_IDS.items():
        mapping[label_id] = train_id
    for i, (_, rgb, label_ids) in enumerate(ref["val"]):
        x, m = ds[i]
        assert x.shape == (3, 16, 32) and x.dtype == torch.float32
        assert m.shape == (16, 32) and m.dtype == torch.int64
        assert torch.equal(m, torch.from_numpy(mapping[label_ids]))
        assert torch.allclose(x, _normalised(rgb[None], ds.mean, ds.std)[0], atol=1e-5)
    assert {0, 255, 18} <= set(torch.cat([ds[i][1].flatten() for i in range(2)]).tolist())
    train = get_dataset("cityscapes", "train", root=root)
    assert len(train) == 3 and train.augment


def test_cityscapes_found_under_data_root(tmp_path, monkeypatch):
    write_fake_cityscapes(tmp_path / "cityscapes", cities={"val": {"lindau": 1}})
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    ds = get_dataset("cityscapes", "val")
    assert len(ds) == 1 and ds.root == tmp_path / "cityscapes"
    assert len(get_dataset("cityscapes", "val", root=tmp_path / "cityscapes")) == 1


def test_cityscapes_augmented_batches_stack(cityscapes_root):
    root, _ = cityscapes_root
    ds = get_dataset("cityscapes", "train", root=root)
    x, m = next(iter(make_loader(ds, 2, train=True)))
    assert x.shape == (2, 3, 16, 32) and m.shape == (2, 16, 32)
    assert set(m.unique().tolist()) <= set(range(19)) | {255}
    small = get_dataset("cityscapes", "train", root=root, resize=8, crop_size=(6, 10))
    x, m = small[0]
    assert x.shape == (3, 6, 10) and m.shape == (6, 10)
    assert get_dataset("cityscapes", "val", root=root, resize=(8, 16))[0][1].shape == (8, 16)


def test_cityscapes_joint_transform_keeps_alignment(tmp_path):
    # 4x4 blocks of constant label; the image colour encodes the label, so after random scale,
    # crop and flip every pixel inside a block must still carry the label its colour names
    rng = np.random.default_rng(0)
    ids = np.array(sorted(CITYSCAPES_FAKE_IDS), dtype=np.uint8)
    blocks = ids[rng.integers(0, len(ids), size=(4, 8))]
    label_ids = np.kron(blocks, np.ones((4, 4), dtype=np.uint8))
    # random colours: a blend of two at a block edge is (almost surely) not a third palette colour
    palette = {int(i): tuple(int(c) for c in rng.integers(0, 256, size=3)) for i in ids}
    rgb = np.array([[palette[int(i)] for i in row] for row in label_ids], dtype=np.uint8)
    img_dir, gt_dir = tmp_path / "leftImg8bit/train/ulm", tmp_path / "gtFine/train/ulm"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    Image.fromarray(rgb).save(img_dir / "ulm_000000_000019_leftImg8bit.png")
    Image.fromarray(label_ids).save(gt_dir / "ulm_000000_000019_gtFine_labelIds.png")
    ds = get_dataset("cityscapes", "train", root=tmp_path, scale=(1.5, 2.5), crop_size=(12, 20),
                     normalize=False)
    lut = label_id_to_train_id().long()
    colour_to_label = {c: int(lut[i]) for i, c in palette.items()}
    torch.manual_seed(0)
    for _ in range(6):
        x, m = ds[0]
        pixels = (x * 255).round().long().permute(1, 2, 0).reshape(-1, 3).tolist()
        labels = m.flatten().tolist()
        checked = [(tuple(p), y) for p, y in zip(pixels, labels) if tuple(p) in colour_to_label]
        assert len(checked) > 0.5 * len(labels)
        assert all(colour_to_label[p] == y for p, y in checked)


def test_cityscapes_missing_paths_named(cityscapes_root, tmp_path):
    root, ref = cityscapes_root
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist.*leftImg8bit"):
        get_dataset("cityscapes", "val", root=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"{root / 'leftImg8bit' / 'test'} is missing"):
        get_dataset("cityscapes", "test", root=root)
    write_fake_cityscapes(tmp_path, cities={"val": {"lindau": 2}})
    label = tmp_path / "gtFine/val/lindau/lindau_000001_000020_gtFine_labelIds.png"
    label.unlink()
    with pytest.raises(FileNotFoundError, match=f"1 label file.*{label}"):
        get_dataset("cityscapes", "val", root=tmp_path)


def test_cityscapes_bad_options(cityscapes_root):
    root, _ = cityscapes_root
    with pytest.raises(ValueError, match="crop_size=0"):
        get_dataset("cityscapes", "train", root=root, crop_size=0)
    with pytest.raises(ValueError, match="scale"):
        get_dataset("cityscapes", "train", root=root, scale=(2.0, 1.0))
    with pytest.raises(ValueError, match="split='trainval'.*'train', 'val', 'test'"):
        get_dataset("cityscapes", "trainval", root=root)


def test_synthetic_is_deterministic_and_learnable_shaped():
    a, b = get_dataset("synthetic", "train", length=64), get_dataset("synthetic", "train", length=64)
    assert torch.equal(a.data, b.data) and torch.equal(a.targets, b.targets)
    test = get_dataset("synthetic", "test", length=64)
    assert not torch.equal(a.data, test.data)
    x, y = a[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    with pytest.raises(ValueError, match="length"):
        get_dataset("synthetic", "train", length=0)


@pytest.mark.parametrize("name", ["cifar10", "cityscapes"])
def test_a_missing_data_root_says_how_every_entry_point_names_one(name, tmp_path):
    """Notebooks take no root parameter: the message names the variable, the CLI flag and the argument."""
    from workbench.data import get_dataset

    with pytest.raises(FileNotFoundError) as err:
        get_dataset(name, "train", root=tmp_path / "absent")
    assert all(way in str(err.value) for way in ("$WORKBENCH_DATA", "--data-root", "root=")), str(err.value)
