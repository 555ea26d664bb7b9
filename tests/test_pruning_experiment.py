"""Notebook 04's computations (tiny settings) and its figure builders."""

from __future__ import annotations

import json

import plotly.graph_objects as go
import pytest

from workbench.experiments import pruning as exp
from workbench.viz import pruning as viz

TINY = dict(model="segnet", norm="bn", width=0.125, epochs=2, lam=5e-3, batch_size=8, lr=3e-3, device="cpu",
            seed=0, train_scenes=32, test_scenes=16, cpu_threads=1)


@pytest.fixture(scope="module")
def runs() -> dict:
    return exp.run_sparsity(**TINY)


@pytest.fixture(scope="module")
def rows(runs: dict) -> list:
    return exp.prune_sweep(runs, [0.3, 0.6], finetune_epochs=1, **{k: v for k, v in TINY.items() if k != "epochs"})


def test_sparsity_runs(runs: dict) -> None:
    assert set(runs) == {"plain", "l1", "cags"}
    for run in runs.values():
        assert [r["epoch"] for r in run["scale_records"]] == [0, 1, 2]
        assert 0 <= run["miou"] <= 1 and len(run["per_class_iou"]) == 11
        assert set(run["fraction_below"]) == set(exp.THRESHOLDS)
    assert runs["cags"]["guidance"] and not runs["l1"]["guidance"]

    def mean_scale(run):
        last = run["scale_records"][-1]["scales"]
        values = [abs(v) for layer in last.values() for v in layer]
        return sum(values) / len(values)

    # the sparsity regimes pull the scales down compared with plain training (same seed and data)
    assert mean_scale(runs["l1"]) < mean_scale(runs["plain"])
    assert mean_scale(runs["cags"]) < mean_scale(runs["plain"])
    # nothing CAGS attached is left on the model
    assert not any(m._forward_hooks for m in runs["cags"]["model"].modules())


def test_prune_sweep_rows(runs: dict, rows: list) -> None:
    assert [(r["method"], r["ratio"]) for r in rows] == [("slimming", 0.3), ("slimming", 0.6), ("cap", 0.3),
                                                          ("cap", 0.6)]
    for r in rows:
        assert r["params_after"] < r["params_before"] and r["flops_after"] < r["flops_before"]
        assert 0 <= r["miou_pruned"] <= 1 and 0 <= r["miou_finetuned"] <= 1
        assert r["layers"] and all(after > 0 for _, after in r["layers"].values())
    json.dumps(rows)  # plain data
    numbers = exp.key_numbers(runs, rows, 0.6)
    assert {"fraction_below_1e-2_plain", "miou_finetuned_cap", "params_reduction_slimming",
            "cap_keeps_more_miou"} <= set(numbers)
    json.dumps(numbers)


def test_resolve_fills_preset_and_rejects_bad_values() -> None:
    params = exp.resolve({"preset": "quick", "device": "cpu", "seed": 0, "model": "segnet", "norm": "bn",
                          "ratio": 0.4, "ratios": None, "lam": None, "width": None, "epochs": None,
                          "finetune_epochs": None, "batch_size": None, "lr": None})
    assert params["epochs"] == exp.PRESETS["quick"]["epochs"] and 0.4 in params["ratios"]
    with pytest.raises(ValueError, match="model"):
        exp.resolve({"model": "unet"})
    with pytest.raises(ValueError, match="ratio"):
        exp.resolve({"ratio": 1.5})
    with pytest.raises(ValueError, match="regime"):
        exp.train_run("l2")


def test_figures(runs: dict, rows: list) -> None:
    records = runs["l1"]["scale_records"]
    fig = viz.scale_histogram_figure(records)
    assert isinstance(fig, go.Figure) and len(fig.data) == len(records) and fig.layout.sliders
    assert sum(t.visible for t in fig.data) == 1
    layer = next(iter(records[0]["scales"]))
    assert isinstance(viz.scale_histogram_figure(records, layer=layer), go.Figure)
    with pytest.raises(ValueError, match="layer"):
        viz.scale_histogram_figure(records, layer="nope")
    assert isinstance(viz.scale_heatmap_figure(records), go.Figure)
    curves = exp.sparsity_curves(runs)
    fig = viz.sparsity_curves_figure(curves, threshold=1e-2)
    assert len(fig.data) == 3 and list(fig.data[0].x) == [0, 1, 2]
    at = [r for r in rows if r["ratio"] == 0.6]
    fig = viz.kept_channels_figure({r["method"]: r["layers"] for r in at})
    assert len(fig.data) == 2
    fig = viz.tradeoff_figure(rows)
    assert len(fig.data) == 2 * 6
    samples = exp.sample_predictions({"plain": runs["plain"]["model"]}, num_samples=2, device="cpu",
                                     test_scenes=16)
    json.dumps(samples)
    fig = viz.predictions_figure(samples)
    assert len(fig.data) == 2 * 3
