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
