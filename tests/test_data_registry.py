"""register_dataset: a dataset made in Python, named wherever a built-in name is accepted."""

import sys

import pytest
import torch
from torch.utils.data import TensorDataset

from workbench.data import (
    check_dataset,
    describe_dataset,
    get_dataset,
    list_datasets,
    register_dataset,
    registered_datasets,
    registry,
    unregister_dataset,
)


class Blobs(TensorDataset):
    """Two classes of 3x8x8 images differing in mean."""

    num_classes = 2

    def __init__(self, split: str, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        y = torch.arange(n) % 2
        x = torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
        super().__init__(x, y)


@pytest.fixture
def blobs():
    register_dataset("blobs", Blobs)
    yield "blobs"
    unregister_dataset("blobs")


def test_registered_name_works_like_a_builtin(blobs):
    assert "blobs" in list_datasets() and registered_datasets() == ["blobs"]
    train = get_dataset("blobs", "train", n=6)
    assert len(train) == 6 and train.num_classes == 2
    # attributes the workbench reads are filled where the factory's dataset has none
    assert train.classes == ("0", "1") and train.task == "classification" and train.split == "train"
    ref = describe_dataset("blobs")
    assert (ref.kind, ref.task, ref.options, ref.splits) == ("registered", "classification", ("n",), ("train", "test"))
    assert check_dataset("blobs", task="classification") == "blobs"
    with pytest.raises(ValueError, match="is a classification dataset; expected a segmentation"):
        check_dataset("blobs", task="segmentation")
    with pytest.raises(ValueError, match="option\\(s\\) size not valid for dataset 'blobs'; allowed: n"):
        get_dataset("blobs", "train", size=8)
    with pytest.raises(ValueError, match="split='val' is not valid; allowed: 'train', 'test'"):
        get_dataset("blobs", "val")


def test_a_notebook_trains_on_a_registered_dataset(blobs):
    from workbench.experiments import quickstart

    params = quickstart.resolve({"preset": "quick", "device": "cpu", "seed": 0, "dataset": "blobs", "epochs": 1,
                                 "width": 0.25, "batch_size": 4})
    result = quickstart.run_quickstart(**params, progress=False)
    assert result["classes"] == ["0", "1"] and len(result["history"]) == 1
    assert sum(map(sum, result["confusion"])) == 8  # the factory's default test split: 8 items


def test_unregistered_name_is_gone(blobs):
    unregister_dataset("blobs")
    with pytest.raises(ValueError, match="name='blobs' is not valid"):
        get_dataset("blobs", "train")
    register_dataset("blobs", Blobs)  # the fixture removes it again


@pytest.mark.parametrize("name, message", [
    ("digits", "'digits' is already a dataset"),
    ("my/data", "without '/'"),
    (".hidden", "start with '~' or '.'"),
])
def test_names_that_would_be_ambiguous_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        register_dataset(name, Blobs)


def test_a_second_registration_needs_replace(blobs):
    with pytest.raises(ValueError, match="'blobs' is already a dataset"):
        register_dataset("blobs", Blobs)
    register_dataset("blobs", lambda split, **kw: Blobs(split, n=4), replace=True)
    assert len(get_dataset("blobs", "test")) == 4


def test_factory_result_is_checked():
    register_dataset("no-classes", lambda split: TensorDataset(torch.zeros(2, 3, 8, 8), torch.zeros(2)))
    try:
        with pytest.raises(ValueError, match="dataset 'no-classes'.*num_classes=None; expected an int >= 2"):
            get_dataset("no-classes", "train")
    finally:
        unregister_dataset("no-classes")


def test_modules_named_in_the_environment_register_their_datasets(tmp_path, monkeypatch):
    (tmp_path / "my_datasets.py").write_text(
        "from torch.utils.data import TensorDataset\nimport torch\nfrom workbench.data import register_dataset\n\n"
        "class Two(TensorDataset):\n    num_classes = 2\n\n"
        "register_dataset('two', lambda split: Two(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(registry.PLUGINS_ENV_VAR, "my_datasets")
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    try:
        assert len(get_dataset("two", "train")) == 4
    finally:
        unregister_dataset("two")
        sys.modules.pop("my_datasets", None)
    monkeypatch.setenv(registry.PLUGINS_ENV_VAR, "no_such_module_here")
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    with pytest.raises(ValueError, match="WORKBENCH_DATASETS names module 'no_such_module_here'"):
        get_dataset("unknown-name", "train")
