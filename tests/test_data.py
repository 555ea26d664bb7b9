"""Datasets: shapes, labels, fixed splits, determinism, on-disk formats and error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.data import DATASET_INFO, get_dataset, list_datasets, make_loader
from workbench.data.digits import digit_split

# ---------------------------------------------------------------- registry and argument checks


def test_registry_names():
    assert set(list_datasets()) >= {"digits"}
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
