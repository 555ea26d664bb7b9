"""Fashion-MNIST: the shipped quick subset, the full-set reader, checksums, IDX files and fashion-scenes."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import workbench.data.fashion as fashion
import workbench.data.paths as paths
from workbench.data import FASHION_CLASSES, FASHION_MEAN, FASHION_STD, get_dataset, list_datasets
from workbench.data.checksums import MANIFEST, ChecksumError, read_manifest, sha256_file
from workbench.data.fashion import FASHION_FILES, FASHION_QUICK_DIR, fashion_arrays, fashion_split, quick_subset_dir
from workbench.data.idx import read_idx, write_idx

FULL_PRESENT = all((fashion.SYSTEM_FASHION_DIR / f"{stem}.gz").is_file()
                   for pair in FASHION_FILES.values() for stem in pair)
needs_full = pytest.mark.skipif(not FULL_PRESENT, reason=f"Debian's dataset-fashion-mnist is not installed "
                                                         f"({fashion.SYSTEM_FASHION_DIR} absent)")
REPO = Path(__file__).resolve().parents[1]


def _fake_full_set(folder: Path, sizes: dict[str, int], gz: bool = True, seed: int = 0) -> dict[str, tuple]:
    """Official file names, tiny random contents: ``{split: (images, labels)}``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, (image_stem, label_stem) in FASHION_FILES.items():
        images = rng.integers(0, 256, size=(sizes[split], 28, 28), dtype=np.uint8)
        labels = (np.arange(sizes[split]) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{image_stem}{suffix}", images)
        write_idx(folder / f"{label_stem}{suffix}", labels)
        written[split] = (images, labels)
    return written


@pytest.fixture
def corruptible_subset(tmp_path, monkeypatch):
    """A private copy of the shipped subset that the loader reads instead of the real one."""
    copy = tmp_path / "quick"
    shutil.copytree(quick_subset_dir(), copy)
    monkeypatch.setattr(fashion, "quick_subset_dir", lambda: copy)
    return copy


# ---------------------------------------------------------------- the shipped quick subset


def test_registered_next_to_digits():
    names = list_datasets()
    assert "fashion-mnist" in names and "fashion-scenes" in names


def test_quick_subset_shapes_classes_and_stratification():
    train, test = get_dataset("fashion-mnist", "train"), get_dataset("fashion-mnist", "test")
    assert (len(train), len(test)) == (5000, 1000)
    assert torch.bincount(train.targets, minlength=10).tolist() == [500] * 10
    assert torch.bincount(test.targets, minlength=10).tolist() == [100] * 10
    x, y = train[0]
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert train.classes == FASHION_CLASSES and train.num_classes == 10 and len(set(FASHION_CLASSES)) == 10
    assert train.task == "classification" and train.in_channels == 3 and train.ignore_index is None
    assert train.targets.dtype == torch.int64
    # indices into the official files: distinct, in range, stored in file order
    arrays = fashion_arrays("train")
    assert not any(a.flags.writeable for a in arrays)  # a shared cache: nobody may write into it
    for ds, n in ((train, 60_000), (test, 10_000)):
        idx = ds.source_indices
        assert len(set(idx.tolist())) == len(idx) and int(idx.min()) >= 0 and int(idx.max()) < n
        assert torch.all(idx[1:] > idx[:-1])
    X, Y = train.tensors()
    assert X.shape == (5000, 3, 28, 28) and torch.equal(X[:, 0], X[:, 2]) and torch.equal(Y, train.targets)
    # normalised with the full set's constants, which fit the subset within sampling error
    assert abs(float(X.mean())) < 0.02 and abs(float(X.std()) - 1.0) < 0.02


def test_quick_subset_pixels_are_the_shipped_idx_files():
    raw = get_dataset("fashion-mnist", "test", normalize=False, channels=1)
    images = read_idx(quick_subset_dir() / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(quick_subset_dir() / "t10k-labels-idx1-ubyte.gz")
    assert raw.mean == (0.0,) and raw.std == (1.0,)
    assert torch.equal(raw.images[:, 0], torch.from_numpy(images.astype(np.float32) / 255))
    assert raw.targets.tolist() == labels.tolist()
    norm = get_dataset("fashion-mnist", "test", channels=1)
    assert torch.allclose(norm.images, (raw.images - FASHION_MEAN) / FASHION_STD, atol=1e-6)


def test_per_class_takes_the_first_of_every_class():
    full = get_dataset("fashion-mnist", "train")
    few = get_dataset("fashion-mnist", "train", per_class=7)
    assert len(few) == 70 and torch.bincount(few.targets).tolist() == [7] * 10
    for c in range(10):
        expected = full.source_indices[full.targets == c][:7]
        assert torch.equal(few.source_indices[few.targets == c], expected)
    with pytest.raises(ValueError, match="per_class=501 exceeds the 500"):
        get_dataset("fashion-mnist", "train", per_class=501)


def test_size_channels_and_fit():
    native = get_dataset("fashion-mnist", "test", channels=1)
    padded = get_dataset("fashion-mnist", "test", size=32, fit="pad", channels=1)
    assert padded[0][0].shape == (1, 32, 32)
    # centred padding: the native image in the middle, background value around it
    assert torch.equal(padded.images[:, :, 2:30, 2:30], native.images)
    border = padded.images.clone()
    border[:, :, 2:30, 2:30] = padded.background_value
    assert torch.allclose(border, torch.full_like(border, padded.background_value))
    small = get_dataset("fashion-mnist", "test", size=14)
    assert small[0][0].shape == (3, 14, 14)
    # shrinking is antialiased (plain bilinear at half size would skip every other pixel)
    interpolate = torch.nn.functional.interpolate
    smooth = interpolate(native.images[:4], size=(14, 14), mode="bilinear", antialias=True)
    aliased = interpolate(native.images[:4], size=(14, 14), mode="bilinear")
    assert torch.allclose(small.images[:4, :1], smooth, atol=1e-5) and not torch.allclose(smooth, aliased, atol=1e-2)
    resized = get_dataset("fashion-mnist", "test", size=32)
    assert resized[0][0].shape == (3, 32, 32) and not torch.equal(resized.images[:, :, 2:30, 2:30], native.images)


@pytest.mark.parametrize("options, message", [
    ({"subset": "tiny"}, "subset='tiny' is not valid; allowed: 'quick', 'full'"),
    ({"channels": 2}, "channels=2 is not valid; allowed: 1, 3"),
    ({"fit": "crop"}, "fit='crop' is not valid; allowed: 'resize', 'pad'"),
    ({"size": 16, "fit": "pad"}, "size=16 with fit='pad' must be >= 28"),
    ({"size": 4}, "size=4 must be >= 8"),
    ({"colour": True}, "colour.*allowed: subset, size, channels"),
])
def test_bad_options_name_the_value_and_the_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        get_dataset("fashion-mnist", "train", **options)


def test_unknown_dataset_name_lists_fashion():
    with pytest.raises(ValueError, match="name='fashion'.*'fashion-mnist', 'fashion-scenes'"):
        get_dataset("fashion", "train")


def test_augment_shifts_and_flips_reproducibly():
    ds = get_dataset("fashion-mnist", "train", augment=True, channels=1)
    plain = get_dataset("fashion-mnist", "train", channels=1)
    torch.manual_seed(0)
    a = torch.stack([ds[i][0] for i in range(32)])
    torch.manual_seed(0)
    b = torch.stack([ds[i][0] for i in range(32)])
    assert torch.equal(a, b) and a.shape == (32, 1, 28, 28)
    originals = plain.images[:32]
    assert not torch.equal(a, originals)
    # every augmented image is a shifted copy of its original or of its mirror image
    pad = 28 // 16
    for aug, src in zip(a, originals):
        found = False
        for candidate in (src, src.flip(-1)):
            padded = torch.nn.functional.pad(candidate, (pad,) * 4, value=ds.background_value)
            for dy in range(2 * pad + 1):
                for dx in range(2 * pad + 1):
                    found |= torch.equal(padded[:, dy:dy + 28, dx:dx + 28], aug)
        assert found


def test_wheel_installs_the_subset_where_the_loader_looks(monkeypatch):
    data_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    target = paths.INSTALLED_DATA_DIR / FASHION_QUICK_DIR
    assert data_files == {target.as_posix(): [f"data/{FASHION_QUICK_DIR}/*"]}
    assert quick_subset_dir() == REPO / "data" / FASHION_QUICK_DIR
    # without a source checkout the loader looks where pip put the data files
    monkeypatch.setattr(paths, "_source_checkout", lambda: None)
    assert quick_subset_dir() == Path(sys.prefix) / target


# ---------------------------------------------------------------- checksums and licence


def test_manifest_covers_every_shipped_file_and_matches():
    folder = quick_subset_dir()
    listed = read_manifest(folder)
    on_disk = {p.name for p in folder.iterdir()} - {MANIFEST}
    assert set(listed) == on_disk
    assert all(sha256_file(folder / name) == digest for name, digest in listed.items())
    assert sum((folder / name).stat().st_size for name in on_disk) < 5_000_000
    licence = (folder / "LICENSE").read_text()
    assert "MIT" in licence and "Zalando" in licence and "Fashion-MNIST" in licence


def test_corrupt_file_gives_a_short_error(corruptible_subset):
    target = corruptible_subset / "train-images-idx3-ubyte.gz"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as info:
        get_dataset("fashion-mnist", "test")
    message = str(info.value)
    assert f"{target} is corrupt" in message and "make_fashion_subset.py" in message
    assert "\n" not in message and len(message) < 400


def test_missing_file_and_missing_manifest_are_named(corruptible_subset):
    (corruptible_subset / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.gz is missing"):
        get_dataset("fashion-mnist", "test")


def test_missing_manifest_is_refused(corruptible_subset):
    (corruptible_subset / MANIFEST).unlink()
    with pytest.raises(ChecksumError, match=f"{MANIFEST} is missing"):
        get_dataset("fashion-mnist", "train")


# ---------------------------------------------------------------- IDX files


def test_idx_round_trip_and_reproducible_gzip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    first = (tmp_path / "a.gz").read_bytes()
    write_idx(tmp_path / "a.gz", array)
    assert (tmp_path / "a.gz").read_bytes() == first
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    write_idx(tmp_path / "plain", array)
    raw = (tmp_path / "plain").read_bytes()
    # the MNIST layout: 0 0 8 ndim, big-endian sizes, then the bytes (16-byte header for 3 dims)
    assert raw[:4] == bytes([0, 0, 8, 3]) and raw[4:16] == bytes([0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])
    assert raw[16:] == array.tobytes()


def test_idx_rejects_foreign_and_truncated_files(tmp_path):
    (tmp_path / "foreign").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="foreign: not an unsigned-byte IDX file"):
        read_idx(tmp_path / "foreign")
    write_idx(tmp_path / "cut", np.zeros((3, 28, 28), dtype=np.uint8))
    (tmp_path / "cut").write_bytes((tmp_path / "cut").read_bytes()[:-5])
    with pytest.raises(ValueError, match="cut: IDX payload holds 2347 bytes"):
        read_idx(tmp_path / "cut")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")[:-6])
    with pytest.raises(ValueError, match="bad.gz: not a readable IDX file"):
        read_idx(tmp_path / "bad.gz")


# ---------------------------------------------------------------- the full set: layouts and errors


@pytest.fixture
def no_system_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion, "SYSTEM_FASHION_DIR", tmp_path / "no-system-copy")


@pytest.fixture
def small_full_set(monkeypatch):
    # the reader refuses a full set of the wrong size; the fakes are tiny
    monkeypatch.setattr(fashion, "FASHION_FULL_SIZES", {"train": 20, "test": 10})


@pytest.mark.parametrize("layout, gz", [("fashion-mnist", True), ("", True), ("FashionMNIST/raw", False)])
def test_full_set_found_in_each_layout(tmp_path, no_system_copy, small_full_set, layout, gz):
    root = tmp_path / f"root-{gz}"
    written = _fake_full_set(root / layout if layout else root, {"train": 20, "test": 10}, gz=gz)
    ds = get_dataset("fashion-mnist", "test", subset="full", root=root, normalize=False, channels=1)
    images, labels = written["test"]
    assert len(ds) == 10 and ds.targets.tolist() == labels.tolist()
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images.astype(np.float32) / 255))
    assert ds.source_indices.tolist() == list(range(10))


def test_full_set_of_the_wrong_size_is_refused(tmp_path, no_system_copy):
    _fake_full_set(tmp_path / "fashion-mnist", {"train": 20, "test": 10})
    with pytest.raises(ValueError, match="20 images, expected 60000 for the train split"):
        get_dataset("fashion-mnist", "train", subset="full", root=tmp_path)


def test_missing_data_root_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"data root {missing} does not exist"):
        get_dataset("fashion-mnist", "train", subset="full", root=missing)


def test_absent_full_set_says_where_it_looked_and_how_to_get_it(tmp_path, no_system_copy):
    with pytest.raises(FileNotFoundError) as info:
        get_dataset("fashion-mnist", "train", subset="full", root=tmp_path)
    message = str(info.value)
    for place in (tmp_path / "fashion-mnist", tmp_path / "FashionMNIST" / "raw", tmp_path / "no-system-copy"):
        assert str(place) in message
    assert "apt-get install dataset-fashion-mnist" in message and "train-images-idx3-ubyte" in message


@needs_full
def test_debian_full_set():
    train, test = get_dataset("fashion-mnist", "train", subset="full"), get_dataset("fashion-mnist", "test",
                                                                                   subset="full")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    images, _, _ = fashion_arrays("train", "full")
    # the normalisation constants are the full train set's statistics (exact, from the value histogram)
    counts = np.bincount(images.ravel(), minlength=256)
    values = np.arange(256) / 255
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
    assert abs(mean - FASHION_MEAN) < 1e-4 and abs(std - FASHION_STD) < 1e-4


@needs_full
def test_quick_subset_is_drawn_from_the_full_set():
    for split in ("train", "test"):
        full_images, full_labels, _ = fashion_arrays(split, "full")
        images, labels, indices = fashion_arrays(split, "quick")
        assert np.array_equal(images, full_images[indices]) and np.array_equal(labels, full_labels[indices])


@needs_full
def test_subset_script_rebuilds_the_shipped_subset(tmp_path):
    spec = importlib.util.spec_from_file_location("make_fashion_subset", REPO / "scripts" / "make_fashion_subset.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path)]) == 0
    shipped = quick_subset_dir()
    for stem in (s for pair in FASHION_FILES.values() for s in pair):
        assert np.array_equal(read_idx(tmp_path / f"{stem}.gz"), read_idx(shipped / f"{stem}.gz"))
    for name in ("source-indices.json", "LICENSE"):
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes()
    assert json.loads((tmp_path / "source-indices.json").read_text())["seed"] == 0


# ---------------------------------------------------------------- fashion-scenes


def test_fashion_scenes_format():
    ds = get_dataset("fashion-scenes", "train", length=5)
    assert len(ds) == 5 and ds.num_classes == 11 and ds.task == "segmentation" and ds.ignore_index == 255
    assert ds.classes == ("background", *FASHION_CLASSES)
    x, m = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and m.shape == (64, 64) and m.dtype == torch.int64
    assert int(m.min()) >= 0 and int(m.max()) <= 10 and int(m.max()) > 0
    assert len(get_dataset("fashion-scenes", "test")) == 128
    with pytest.raises(ValueError, match="min_items=0 must be >= 1"):
        get_dataset("fashion-scenes", "train", min_items=0)
    with pytest.raises(ValueError, match="min_digits"):
        get_dataset("fashion-scenes", "train", min_digits=1)


@pytest.mark.filterwarnings("error")  # the items come from a read-only cache, which must never reach torch as is
@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_scenes_labels_are_the_composed_items(split):
    ds = get_dataset("fashion-scenes", split, length=6, seed=3)
    images, labels, indices = fashion_split(split)
    row = {int(j): k for k, j in enumerate(indices)}
    for i in range(len(ds)):
        s = ds.scene(i)
        expected = torch.zeros_like(s["mask"])
        assert 1 <= len(s["placements"]) <= 4
        for p in s["placements"]:
            k = row[p["source_index"]]  # KeyError: an item from the other split
            assert p["class_index"] == int(labels[k]) and p["label"] == p["class_index"] + 1 and "digit" not in p
            item = torch.nn.functional.interpolate(torch.from_numpy(images[k].copy())[None, None],
                                                   size=(p["size"],) * 2, mode="bilinear")[0, 0]
            assert torch.equal(item.clamp(0, 1) > ds.threshold, torch.from_numpy(p["pixels"]))
            t, l, n = p["top"], p["left"], p["size"]
            assert not expected[t:t + n, l:l + n].any()
            expected[t:t + n, l:l + n][torch.from_numpy(p["pixels"])] = p["label"]
        assert torch.equal(s["mask"], expected)
        bg = s["mask"] == 0
        assert torch.equal(s["image"][:, bg], s["background"][:, bg])
        x, m = ds[i]
        assert torch.equal(m, s["mask"])
        assert torch.allclose(x * torch.tensor(ds.std).view(3, 1, 1) + torch.tensor(ds.mean).view(3, 1, 1),
                              s["image"], atol=1e-5)


def test_scene_items_are_converted_once():
    first, again = fashion_split("test"), fashion_split("test")
    assert first[0] is again[0] and not first[0].flags.writeable
    assert first[0].dtype == np.float32 and float(first[0].max()) <= 1.0


def test_fashion_scenes_from_the_full_set_need_it(tmp_path, no_system_copy):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        get_dataset("fashion-scenes", "train", subset="full", root=tmp_path)
