"""Notebook 04's computations (tiny settings): the paired, FLOPs-matched CAP vs slimming protocol and its
figure builders."""

from __future__ import annotations

import json

import plotly.graph_objects as go
import pytest
from fake_datasets import write_fake_cityscapes

from workbench.experiments import pruning as exp
from workbench.experiments import pruning_comparison as cmp
from workbench.pruning import FLOPS_TOLERANCE
from workbench.recipe import verdict_word, verdicts_from_rows
from workbench.viz import pruning as viz

TINY = dict(model="segnet", norm="bn", width=0.125, epochs=2, sparsity_epochs=1, lam=5e-3, batch_size=8, lr=3e-3,
            optimizer="adamw", sparsity_mode="proximal", bn_init=0.5, device="cpu", train_scenes=32, test_scenes=16,
            cpu_threads=1, dataset="digit-scenes")
TARGETS = [0.7, 0.4]


@pytest.fixture(scope="module")
def runs() -> dict:
    return exp.train_seed(seed=0, **TINY)


@pytest.fixture(scope="module")
def comparison(runs: dict) -> dict:
    params = {**TINY, "epochs": 2, "finetune_epochs": 1, "seed_list": [0, 1], "flops_targets": TARGETS,
              "preset": "quick"}
    return cmp.compare_at_flops(params, first_runs=runs, progress=False)


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("training started before the bad input was refused")

    monkeypatch.setattr(cmp, "train_seed", refuse)
    monkeypatch.setattr(cmp, "prune_to_flops", refuse)


def test_both_arms_of_a_seed_start_from_the_same_dense_weights(runs: dict) -> None:
    dense = runs["plain"]
    assert runs["l1"]["start_checksum"] == runs["cags"]["start_checksum"] == dense["dense_checksum"]
    # the sparsity runs trained copies: the dense network is untouched, each copy moved
    assert exp.state_checksum(dense["model"]) == dense["dense_checksum"]
    assert exp.state_checksum(runs["l1"]["model"]) != dense["dense_checksum"]
    assert exp.state_checksum(runs["l1"]["model"]) != exp.state_checksum(runs["cags"]["model"])
    assert runs["l1"]["steps"] == runs["cags"]["steps"] and runs["l1"]["lam"] == runs["cags"]["lam"] > 0


def test_sparsity_runs_continue_from_the_dense_epochs(runs: dict) -> None:
    assert [r["epoch"] for r in runs["plain"]["scale_records"]] == [0, 1, 2]
    assert [r["epoch"] for r in runs["l1"]["scale_records"]] == [2, 3]
    assert runs["cags"]["guidance"] and not runs["l1"]["guidance"]
    assert not any(m._forward_hooks for m in runs["cags"]["model"].modules())

    def mean_scale(run):
        last = run["scale_records"][-1]["scales"]
        values = [abs(v) for layer in last.values() for v in layer]
        return sum(values) / len(values)

    # the sparsity step pulls the scales below the dense network's
    assert mean_scale(runs["l1"]) < mean_scale(runs["plain"])
    assert mean_scale(runs["cags"]) < mean_scale(runs["plain"])


def test_every_arm_lands_within_two_percent_of_each_flops_target(comparison: dict) -> None:
    rows = comparison["rows"]
    assert len(rows) == 2 * len(TARGETS) * len(exp.ARMS)
    assert {(r["arm"], r["seed"], r["flops_target"]) for r in rows} == {
        (a, s, t) for a in exp.ARMS for s in (0, 1) for t in TARGETS}
    for r in rows:
        assert abs(r["flops_fraction"] - r["flops_target"]) <= FLOPS_TOLERANCE * r["flops_target"], r
        assert 0 <= r["miou_pruned"] <= 1 and 0 <= r["miou_finetuned"] <= 1
        assert r["layers"] and all(after > 0 for _, after in r["layers"].values())
    for seed in (0, 1):  # every arm of a seed comes from the same dense network
        assert len({r["miou_dense"] for r in rows if r["seed"] == seed}) == 1
    assert comparison["rows"][0]["model"] is not None
    json.dumps(cmp.tidy_rows(rows))


def test_verdicts_follow_their_intervals(comparison: dict) -> None:
    verdicts = comparison["verdicts"]
    assert set(verdicts) == {"cap_vs_slimming", "guided_ranking"}
    for vs in verdicts.values():
        assert [v.setting["flops_target"] for v in vs] == TARGETS
        for v in vs:
            assert v.verdict == verdict_word(v.interval, "greater")
            assert v.interval.n == 2 and cmp.SMOKE_NOTE in v.sentence()
    numbers = cmp.key_numbers(comparison)
    assert numbers["cap_vs_slimming_verdict_0.7"] == verdicts["cap_vs_slimming"][0].verdict
    json.dumps(numbers)
    json.dumps(cmp.verdict_dicts(comparison))


@pytest.mark.parametrize("offsets, word", [([0.05, 0.06, 0.04], "supports"), ([-0.05, -0.06, -0.04], "contradicts"),
                                           ([0.05, -0.06, 0.02], "inconclusive")])
def test_the_verdict_word_comes_from_the_paired_interval(offsets: list, word: str) -> None:
    trial = cmp.comparison_trials([0, 1, 2], [0.5])["cap_vs_slimming"]
    rows = [{"arm": "slimming", "seed": s, "flops_target": 0.5, "miou_finetuned": 0.4 + 0.01 * s} for s in range(3)]
    rows += [{"arm": "cap", "seed": s, "flops_target": 0.5, "miou_finetuned": 0.4 + 0.01 * s + d}
             for s, d in enumerate(offsets)]
    (verdict,) = verdicts_from_rows(trial, rows)
    assert verdict.verdict == word
    assert verdict.interval.mean == pytest.approx(sum(offsets) / 3)


def test_fewer_than_two_seeds_are_refused_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="seeds"):
        exp.resolve({"seeds": 1})
    _no_training(monkeypatch)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        cmp.compare_at_flops({**TINY, "seed_list": [0], "flops_targets": [0.5], "finetune_epochs": 1},
                             progress=False)


def test_a_flops_target_out_of_reach_is_refused_before_training_with_the_range(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _no_training(monkeypatch)
    with pytest.raises(ValueError, match=r"target=0\.015 is out of reach.*allowed: a FLOPs fraction in \[0\.0\d+, 1\)"):
        cmp.compare_at_flops({**TINY, "seed_list": [0, 1], "flops_targets": [0.5, 0.015], "finetune_epochs": 1},
                             progress=False)


def test_the_full_preset_without_cityscapes_names_the_expected_layout(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=r"parameter dataset='cityscapes' \(preset 'full'\): .*leftImg8bit.*Expected "
                                         r"layout"):
        exp.resolve({"preset": "full", "device": "cpu"})  # refused with the parameters, before any training
    params = {**exp.resolve({"preset": "quick", "device": "cpu"}), "dataset": "cityscapes"}
    _no_training(monkeypatch)
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        cmp.check_comparison(**params)
    write_fake_cityscapes(tmp_path)
    params = exp.resolve({"preset": "full", "device": "cpu"})
    assert params["dataset"] == "cityscapes" and params["seed_list"] == [0, 1, 2]


def test_resolve_fills_preset_and_rejects_bad_values() -> None:
    params = exp.resolve({"preset": "standard", "device": "cpu", "seed": 3, "ratio": 0.4, "flops_targets": None})
    assert params["epochs"] == exp.PRESETS["standard"]["epochs"] and 0.4 in params["ratios"]
    assert params["seed_list"] == [3, 4, 5, 6, 7, 8] and params["flops_targets"] == [0.7, 0.5, 0.3]
    assert exp.resolve({"preset": "quick"})["seeds"] == 2
    with pytest.raises(ValueError, match="preset"):
        exp.resolve({"preset": "huge"})
    with pytest.raises(ValueError, match="model"):
        exp.resolve({"model": "unet"})
    with pytest.raises(ValueError, match="flops_targets"):
        exp.resolve({"flops_targets": [1.0]})
    with pytest.raises(ValueError, match="arms"):
        exp.check_arms(["random"])


def test_prune_sweep_rows(runs: dict) -> None:
    rows = exp.prune_sweep(runs, [0.3, 0.6], finetune_epochs=0, **{k: v for k, v in TINY.items() if k != "epochs"})
    assert [(r["method"], r["ratio"]) for r in rows] == [("slimming", 0.3), ("slimming", 0.6), ("cap", 0.3),
                                                          ("cap", 0.6)]
    for r in rows:
        assert r["params_after"] < r["params_before"] and r["flops_after"] < r["flops_before"]
        assert 0 <= r["miou_pruned"] <= 1 and r["miou_finetuned"] is None
    json.dumps(rows)
    fig = viz.tradeoff_figure(rows)
    assert len(fig.data) == 2 * 5  # no fine-tuned line without fine-tuning
    at = [r for r in rows if r["ratio"] == 0.6]
    assert len(viz.kept_channels_figure({r["method"]: r["layers"] for r in at}).data) == 2


def test_figures(runs: dict, comparison: dict) -> None:
    records = runs["l1"]["scale_records"]
    fig = viz.scale_histogram_figure(records)
    assert isinstance(fig, go.Figure) and len(fig.data) == len(records) and fig.layout.sliders
    assert sum(t.visible for t in fig.data) == 1
    with pytest.raises(ValueError, match="layer"):
        viz.scale_histogram_figure(records, layer="nope")
    assert isinstance(viz.scale_heatmap_figure(records), go.Figure)
    fig = viz.sparsity_curves_figure(exp.sparsity_curves(runs), threshold=1e-2)
    assert len(fig.data) == 3 and list(fig.data[1].x) == [2, 3]

    points = cmp.curve_points(comparison["rows"])
    assert len(points) == len(exp.ARMS) * len(TARGETS)
    for p in points:
        assert p["n"] == 2 and p["low"] <= p["mean"] <= p["high"]
    fig = viz.flops_curves_figure(points, dense=runs["plain"]["miou"])
    assert len(fig.data) == len(exp.ARMS) + 1
    verdicts = cmp.verdict_dicts(comparison)["cap_vs_slimming"]
    fig = viz.paired_difference_figure(verdicts)
    assert sum(len(t.x) for t in fig.data) == len(TARGETS)
    assert {t.name for t in fig.data} <= set(("supports", "contradicts", "inconclusive"))
    fig = viz.flops_match_figure(comparison["rows"])
    assert len(fig.data) == 1 + len(exp.ARMS)

    samples = exp.sample_predictions({"dense": runs["plain"]["model"]}, num_samples=2, device="cpu", test_scenes=16)
    json.dumps(samples)
    assert len(viz.predictions_figure(samples).data) == 2 * 3
