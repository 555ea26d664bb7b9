"""Every shipped notebook executes end to end through the papermill runner (small overrides of the
quick preset so the suite stays minutes long) and records its key numbers into results.json."""

import json
import math

import pytest

from workbench import runner

SMALL = {
    "00_quickstart": {"epochs": 1, "width": 0.25},
    "01_batch_noise": {"norms": ["bn", "iebn", "none"], "levels": [0.0, 1.0], "batch_sizes": [64],
                       "batch_size": 64, "seeds": 2, "mix_seeds": 2, "mix_epochs": 1, "epochs": 1,
                       "evidence_epochs": 1, "attacks": ["mean"], "calibration_levels": [1.0], "gate_every": 5},
    "02_attention_weights": {"num_samples": 64},
    "03_dia_lstm_interrelations": {"num_samples": 64},
    "04_pruning_sparsity": {"epochs": 1, "sparsity_epochs": 1, "finetune_epochs": 1, "ratios": [0.5], "ratio": 0.5,
                            "flops_targets": [0.7, 0.5, 0.3], "width": 0.125},
}
KEY_METRICS = {
    "00_quickstart": ("test_acc", "params", "optimizer"),
    "01_batch_noise": ("key_numbers", "summary", "evidence", "verdicts", "mix_verdict"),
    "02_attention_weights": ("test_acc", "attention_spread_mean", "attribution_rank_correlation_mean"),
    "03_dia_lstm_interrelations": ("mean_cross_layer_corr", "ablation_test_acc", "stabilisation_test_acc"),
    "04_pruning_sparsity": ("sweep", "rows", "verdicts", "cap_vs_slimming_verdict_0.5"),
}

pytestmark = pytest.mark.slow


def test_every_notebook_is_covered():
    assert sorted(p.stem for p in runner.list_notebooks()) == sorted(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs_and_records(name, tmp_path):
    results = runner.run([name], SMALL[name], output=tmp_path / "run", timeout=900, echo=lambda *_: None)
    (entry,) = results["notebooks"]
    assert entry["status"] == "done", entry["error"]
    assert set(KEY_METRICS[name]) <= set(entry["metrics"]), sorted(entry["metrics"])
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["notebooks"][0]["metrics"] == entry["metrics"]
    html = (tmp_path / "run" / entry["output_html"]).read_text()
    assert "plotly" in html and "Traceback" not in html
    if "test_acc" in entry["metrics"]:
        assert 0.0 <= entry["metrics"]["test_acc"] <= 1.0 and not math.isnan(entry["metrics"]["test_acc"])
