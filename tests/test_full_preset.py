"""The `full` preset reads the papers' data (CIFAR-100 for notebooks 00-03, Cityscapes for 04) and is
refused with the expected on-disk layout where it is absent, in the notebook and in the runner before a
kernel starts; the `quick` preset needs no files and is unchanged."""

import pytest
from fake_datasets import write_fake_cifar100, write_fake_cityscapes

from workbench import cli, runner
from workbench.data import DATA_ENV_VAR
from workbench.experiments import attention, batch_noise, dia_interrelations, pruning, quickstart
from workbench.sweep import check_grid

CIFAR_NOTEBOOKS = {"00_quickstart": quickstart, "01_batch_noise": batch_noise, "02_attention_weights": attention,
                   "03_dia_lstm_interrelations": dia_interrelations}
ALL = ["00_quickstart", "01_batch_noise", "02_attention_weights", "03_dia_lstm_interrelations",
       "04_pruning_sparsity"]
CIFAR_MISSING = (r"parameter dataset='cifar100' \(preset 'full'\): cifar100: folder .*cifar-100-python is missing\. "
                 r"Expected layout: <root>/cifar-100-python/\{train, test, meta\}")
CITYSCAPES_MISSING = (r"parameter dataset='cityscapes' \(preset 'full'\): cityscapes split 'train': folder "
                      r".*leftImg8bit.train is missing\. Expected layout")


@pytest.fixture
def empty_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv(DATA_ENV_VAR, str(root))
    return root


def _spec(name):
    return runner.load_spec(runner.resolve_notebook(name))


@pytest.mark.parametrize("name", list(CIFAR_NOTEBOOKS))
def test_full_preset_without_cifar100_is_refused_in_the_notebook(name, empty_root):
    defaults = _spec(name).defaults
    with pytest.raises(ValueError, match=CIFAR_MISSING):
        CIFAR_NOTEBOOKS[name].resolve({**defaults, "preset": "full"})
    with pytest.raises(ValueError, match=r"parameter dataset='cifar100' \(preset 'quick'\): cifar100: folder"):
        CIFAR_NOTEBOOKS[name].resolve({**defaults, "dataset": "cifar100"})


@pytest.mark.parametrize("name", list(CIFAR_NOTEBOOKS))
def test_full_preset_reads_cifar100_when_present(name, empty_root):
    write_fake_cifar100(empty_root)
    params = CIFAR_NOTEBOOKS[name].resolve({**_spec(name).defaults, "preset": "full"})
    assert (params["dataset"], params["preset"]) == ("cifar100", "full")
    runner.plan_parameters([_spec(name)], {"preset": "full"})


@pytest.mark.parametrize("name", list(CIFAR_NOTEBOOKS))
def test_quick_preset_is_unaffected(name, empty_root):
    params = CIFAR_NOTEBOOKS[name].resolve({**_spec(name).defaults, "device": "cpu"})
    assert params["dataset"] == "fashion-mnist"  # the shipped subset: no data root needed
    expected = {"00_quickstart": {"epochs": 3},
                "01_batch_noise": {"epochs": 1, "width": 0.5, "image_size": 16, "train_per_class": 150},
                "02_attention_weights": {"epochs": 2, "width": 0.5, "image_size": 16},
                "03_dia_lstm_interrelations": {"epochs": 2, "width": 0.5, "image_size": 16, "stab_epochs": 2}}[name]
    assert {k: params[k] for k in expected} == expected
    assert (params["amp"], params["channels_last"], params["compile"]) == ("off", False, False)


def test_full_preset_without_cityscapes_is_refused_in_notebook_04(empty_root):
    defaults = _spec("04_pruning_sparsity").defaults
    with pytest.raises(ValueError, match=CITYSCAPES_MISSING):
        pruning.resolve({**defaults, "preset": "full"})
    params = pruning.resolve({**defaults, "device": "cpu"})
    assert (params["dataset"], params["epochs"], params["amp"], params["channels_last"]) == (
        "fashion-scenes", 6, "off", False), "the quick preset is unchanged"
    write_fake_cityscapes(empty_root)
    assert pruning.resolve({**defaults, "preset": "full"})["dataset"] == "cityscapes"


def test_runner_refuses_the_full_preset_before_a_kernel_starts(empty_root, tmp_path, capsys):
    specs = [_spec(name) for name in ALL]
    assert runner.plan_parameters(specs, {}) == {name: {} for name in ALL}, "quick needs no files"
    for spec in specs:
        message = CITYSCAPES_MISSING if spec.name == "04_pruning_sparsity" else CIFAR_MISSING
        with pytest.raises(ValueError, match=f"^{spec.name}: {message}"):
            runner.plan_parameters([spec], {"preset": "full"})
    out = tmp_path / "never"
    assert cli.main(["run", "00_quickstart", "-p", "preset", "full", "--output", str(out)]) == 2
    assert "cifar-100-python is missing" in capsys.readouterr().err
    assert not out.exists(), "nothing is written for a refused run"
    points, refused = check_grid(runner.resolve_notebook("02_attention_weights"), {"preset": ["quick", "full"]})
    assert len(points) == 2 and list(refused) == ["preset=full"]
    write_fake_cityscapes(empty_root)
    runner.plan_parameters([_spec("04_pruning_sparsity")], {"preset": "full"})


def test_runner_refuses_acceleration_the_machine_cannot_run(empty_root):
    for name in ("00_quickstart", "02_attention_weights", "03_dia_lstm_interrelations"):
        with pytest.raises(ValueError, match=rf"^{name}: amp='bf16' needs a CUDA device, got cpu"):
            runner.plan_parameters([_spec(name)], {"device": "cpu", "amp": "bf16"})
        assert runner.plan_parameters([_spec(name)], {"amp": "off", "channels_last": True}) == {
            name: {"amp": "off", "channels_last": True}}
