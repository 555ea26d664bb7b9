"""Your own data everywhere a dataset is named: every notebook's ``dataset`` parameter, the runner and
sweeps (checked before a kernel starts), ``workbench train --dataset`` and ``workbench data check``."""

import importlib
import json
import re

import pytest
from image_folders import BAD_INPUTS, write_classification, write_segmentation

from workbench import cli
from workbench.params import validate
from workbench.runner import list_notebooks, load_spec
from workbench.sweep import check_grid, normalise_grid, point_id

EXPERIMENTS = {
    "00_quickstart": ("workbench.experiments.quickstart", "classification"),
    "01_batch_noise": ("workbench.experiments.batch_noise", "classification"),
    "02_attention_weights": ("workbench.experiments.attention", "classification"),
    "03_dia_lstm_interrelations": ("workbench.experiments.dia_interrelations", "classification"),
    "04_pruning_sparsity": ("workbench.experiments.pruning", "segmentation"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    return {"classification": write_classification(root / "shapes"),
            "segmentation": write_segmentation(root / "scenes")}


def test_every_notebook_declares_a_dataset_parameter():
    assert sorted(p.stem for p in list_notebooks()) == sorted(EXPERIMENTS)
    for path in list_notebooks():
        spec = load_spec(path)
        assert "dataset" in spec.defaults, path.name
        assert spec.spec["dataset"].validator is not None, path.name


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_dataset_parameter_takes_a_folder_of_its_task_and_refuses_the_other(name, folders):
    module, task = EXPERIMENTS[name]
    spec = importlib.import_module(module).PARAMETERS
    assert validate({"dataset": str(folders[task])}, spec) == {"dataset": str(folders[task])}
    other = "segmentation" if task == "classification" else "classification"
    with pytest.raises(ValueError, match=f"parameter dataset: dataset '.*' is a {other} dataset; expected a {task}"):
        validate({"dataset": str(folders[other])}, spec)
    with pytest.raises(ValueError, match="parameter dataset: name='imagenet' is not valid; allowed: 'digits'"):
        validate({"dataset": "imagenet"}, spec)


def test_a_relative_folder_is_made_absolute(folders, monkeypatch):
    from workbench.experiments import quickstart

    monkeypatch.chdir(folders["classification"].parent)
    params = quickstart.resolve({"preset": "quick", "device": "cpu", "seed": 0, "dataset": "./shapes"})
    assert params["dataset"] == str(folders["classification"])


def _notebook_for(root):
    return "04_pruning_sparsity" if (root / "dataset.yaml").exists() else "00_quickstart"


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_folder_is_refused_by_every_command_before_any_work(case, tmp_path, capsys):
    root, message = BAD_INPUTS[case](tmp_path)
    out = tmp_path / "reports"
    assert cli.main(["data", "check", str(root)]) == 1
    report = capsys.readouterr().out
    assert "refused (1 problem):" in report
    assert re.search(message, report), report
    # the runner refuses before a kernel starts and before the run folder exists
    assert cli.main(["run", _notebook_for(root), "-p", "dataset", str(root), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: parameter dataset: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()
    assert cli.main(["train", "--dataset", str(root), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset: ") and re.search(message, err), err
    assert not out.exists()


def test_data_check_reports_what_it_sees(folders, capsys):
    assert cli.main(["data", "check", str(folders["classification"])]) == 0
    text = capsys.readouterr().out
    assert "classification, train/ and test/ folders" in text
    assert "classes (3): bright, dark, mid" in text
    assert "train: 18 images (bright 6, dark 6, mid 6)" in text and "test: 6 images (bright 2, dark 2, mid 2)" in text
    assert "image sizes (w x h): " in text and "14..24 x 12..21" in text
    assert "channels (PIL modes): L 12, RGB 12" in text
    assert "nothing refused" in text
    assert cli.main(["data", "check", str(folders["segmentation"])]) == 0
    text = capsys.readouterr().out
    assert "segmentation, one folder, split by seed" in text
    assert "num_classes 3, ignore_index 255 (background, red, green)" in text
    assert "mask values (masks holding each): 0: 10, 1: 5, 2: 5, 255: 10" in text


def test_sweep_passes_the_dataset_like_any_parameter(folders, tmp_path, monkeypatch):
    notebook = next(p for p in list_notebooks() if p.stem == "00_quickstart")
    empty = write_classification(tmp_path / "broken")
    for f in (empty / "train" / "dark").iterdir():
        f.unlink()
    points, refused = check_grid(notebook, {"dataset": ["digits", str(folders["classification"]), str(empty)]})
    assert len(points) == 3
    assert list(refused) == [point_id({"dataset": str(empty)})]
    assert "class folder is empty" in refused[point_id({"dataset": str(empty)})]
    # points run in the notebook's folder: a relative folder is passed on as its absolute path
    monkeypatch.chdir(folders["classification"].parent)
    assert normalise_grid(notebook, {"dataset": ["./shapes", "digits"]}) == {
        "dataset": [str(folders["classification"]), "digits"]}


def test_train_cli_trains_on_a_folder(folders, tmp_path):
    from workbench.train_cli import main

    out = tmp_path / "train"
    args = ["--dataset", str(folders["classification"]), "--model", "resnet20", "--width", "0.25", "--epochs", "1",
            "--batch-size", "8", "--max-steps", "2", "--no-progress", "--device", "cpu", "--output", str(out)]
    assert main(args) == 0
    history = json.loads((out / "history.json").read_text())
    assert history["config"]["dataset"] == str(folders["classification"])
    assert history["step_log"] and history["history"]


def test_batch_noise_diagnostics_on_a_folder_smaller_than_the_reference_batch(folders):
    from workbench.experiments import batch_noise

    params = batch_noise.resolve({"preset": "quick", "device": "cpu", "seed": 0, "norms": ["bn"],
                                  "dataset": str(folders["classification"]), "levels": [0.0], "batch_sizes": [8]})
    model = batch_noise.build("resnet20", "bn", 3, 0.25)
    diagnostics = batch_noise.run_diagnostics(params, {("bn", 0.0): model})
    # 18 training images: the coupling gap uses the micro-batch sizes that split them at least in two
    assert diagnostics["coupling"]["bn"]["micro_sizes"] == [2, 4, 8]
    assert set(diagnostics["estimation"]["bn"]["batch_sizes"]) == {2, 4, 8, 16}
