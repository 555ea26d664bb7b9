"""Notebooks 00 and 04 run end to end on folders of PNGs through ``workbench run -p dataset ...``
(classification: three classes, grayscale and RGB images of several sizes; segmentation: images and
masks with dataset.yaml), at tiny settings, and results.json records the dataset."""

import json

import pytest
from image_folders import write_classification, write_segmentation

from workbench import cli

pytestmark = pytest.mark.slow

CASES = {
    "00_quickstart": (write_classification, ["-p", "epochs", "1", "-p", "width", "0.25"]),
    "04_pruning_sparsity": (write_segmentation, ["-p", "epochs", "1", "-p", "sparsity_epochs", "1", "-p",
                                                 "finetune_epochs", "1", "-p", "ratios", "[0.5]", "-p", "ratio", "0.5",
                                                 "-p", "flops_targets", "[0.6]", "-p", "width", "0.125"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs_on_a_folder(name, tmp_path):
    write, small = CASES[name]
    root = write(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["run", name, "-p", "dataset", str(root), *small, "--preset", "quick", "--device", "cpu",
            "--output", str(out), "--timeout", "600"]
    status = cli.main(argv)
    results = json.loads((out / "results.json").read_text())
    (entry,) = results["notebooks"]
    assert status == 0 and entry["status"] == "done", entry["error"]
    assert entry["parameters"]["dataset"] == str(root)
    assert entry["metrics"]["dataset"] == str(root)
    if name == "00_quickstart":
        assert 0.0 <= entry["metrics"]["test_acc"] <= 1.0
    else:
        assert entry["metrics"]["sweep"][0]["ratio"] == 0.5
    assert (root / ".workbench-stats.json").is_file()
