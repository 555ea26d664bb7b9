"""The batch-noise experiment (notebook 01) end to end on a tiny network, and its figures."""

import json

import plotly.graph_objects as go
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from workbench.data import get_dataset
from workbench.experiments import batch_noise
from workbench.nn import IEBN2d
from workbench.viz import batch_noise as bnviz


def tiny(model, norm, num_classes, width):
    layer = {"bn": nn.BatchNorm2d, "iebn": IEBN2d, "none": lambda c: nn.Identity()}[norm]
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), layer(4), nn.ReLU(),
                         nn.Conv2d(4, 8, 3, stride=2, padding=1), layer(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


class Head(Dataset):
    """The first ``n`` items of a workbench dataset, with its attributes (keeps the tests fast)."""

    def __init__(self, base, n):
        self.base, self.n = base, min(n, len(base))
        for attr in ("name", "split", "task", "num_classes", "classes", "in_channels", "ignore_index", "mean", "std"):
            setattr(self, attr, getattr(base, attr))
        self.targets = base.targets[: self.n]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.base[i]


def small_get_dataset(name, split, **options):
    return Head(get_dataset(name, split, **options), 256 if split == "train" else 96)


def patch(mp):
    mp.setattr(batch_noise, "build", tiny)
    mp.setattr(batch_noise, "get_dataset", small_get_dataset)


@pytest.fixture(scope="module")
def result():
    mp = pytest.MonkeyPatch()
    patch(mp)
    params = batch_noise.resolve(dict(preset="quick", device="cpu", seed=0, norms=["bn", "iebn", "none"],
                                      kind="both", levels=[0.0, 0.5], batch_sizes=[32, 64], seeds=2, mix_seeds=2,
                                      epochs=1,
                                      lr=0.1, mix_shift="invert", probe_every=2, micro_batches=4))
    try:
        yield batch_noise.run_all(params, progress=False)
    finally:
        mp.undo()


def test_resolve_fills_preset_and_refuses_bad_values():
    p = batch_noise.resolve(dict(preset="quick", device="cpu", seed=0, norms=["iebn", "bn"], kind="mean", lr=0.1,
                                 mix_shift="color", micro_batches=4))
    assert p["dataset"] == "fashion-mnist" and p["model"] == "resnet20" and p["batch_size"] == max(p["batch_sizes"])
    assert p["train_per_class"] == batch_noise.PRESETS["quick"]["train_per_class"]
    assert p["levels"] == sorted(p["levels"]) and p["levels"][0] == 0.0
    with pytest.raises(ValueError, match=r"norms.*'layer'.*allowed"):
        batch_noise.resolve(dict(preset="quick", norms=["bn", "layer"], kind="mean", lr=0.1, mix_shift="invert",
                                 micro_batches=4))
    with pytest.raises(ValueError, match=r"kind='gauss'"):
        batch_noise.resolve(dict(preset="quick", norms=["bn"], kind="gauss", lr=0.1, mix_shift="invert",
                                 micro_batches=4))
    with pytest.raises(ValueError, match=r"levels\[0\]=-1.0"):
        batch_noise.resolve(dict(preset="quick", norms=["bn"], kind="mean", levels=[-1.0], lr=0.1,
                                 mix_shift="invert", micro_batches=4))


def test_train_per_class_thins_the_training_split_only():
    base = dict(preset="quick", device="cpu", norms=["bn"], kind="mean", lr=0.1, mix_shift="invert", micro_batches=4)
    p = batch_noise.resolve({**base, "train_per_class": 7})
    train, test = batch_noise.datasets(p)
    assert len(train) == 7 * 10 and len(test) == 1000 and train.image_size == (16, 16)
    # the preset's value applies only where the dataset has the option; a given one is refused elsewhere
    assert len(batch_noise.datasets(batch_noise.resolve({**base, "dataset": "digits"}))[0]) == 1437
    with pytest.raises(ValueError, match=r"train_per_class=7 .*'digits'.*allowed: None"):
        batch_noise.resolve({**base, "dataset": "digits", "train_per_class": 7})


def test_grid_points_no_norm_only_at_level_zero():
    params = {"norms": ["bn", "none"], "levels": [0.0, 1.0], "batch_sizes": [16, 64], "seed": 3, "seeds": 2}
    points = batch_noise.grid_points(params)
    assert len(points) == 2 * 2 * 2 + 1 * 2 * 2
    assert {p[1] for p in points if p[0] == "none"} == {0.0}
    assert {p[3] for p in points} == {3, 4}


def test_run_all_tidy_results(result):
    rows = result["grid"]["rows"]
    assert len(rows) == (2 * 2 + 1) * 2 * 2
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)
    summary = result["summary"]
    assert {(s["norm"], s["level"], s["batch_size"]) for s in summary} >= {("bn", 0.5, 64), ("none", 0.0, 32)}
    assert all(s["n"] == 2 for s in summary)
    assert set(result["grid"]["probes"]) == {"bn", "iebn", "none"}
    assert result["grid"]["probes"]["bn"]["gradient_noise_scale"]["records"][0]["step"] == 0
    assert set(result["mix"]["bn"]) == {"separate", "separate-source-stats", "mixed", "alone"}
    assert set(result["mix"]["bn"]["mixed"]) == {"fashion-mnist", "fashion-mnist-invert", "all"}
    # BN and IEBN (no batch statistics to mix without a norm), two seeds, two trained arms + the fair evaluation
    assert len(result["mix_rows"]) == 2 * 2 * 3
    assert batch_noise.mix_verdict(result["params"], result["mix_rows"]).verdict in ("supports", "contradicts",
                                                                                      "inconclusive")
    diag = result["diagnostics"]
    assert set(diag["estimation"]) == {"bn", "iebn"} and set(diag["coupling"]) == {"bn", "iebn", "none"}
    assert max(diag["coupling"]["none"]["gap"]) < 1e-4 < min(diag["coupling"]["bn"]["gap"])
    assert diag["attention_injected"]["levels"] == [0.0, 0.5]
    assert len(diag["attention_injected"]["layers"]) == 2 and diag["attention_trained"]["levels"] == [0.0, 0.5]


def test_key_numbers_are_json_plain(result):
    numbers = batch_noise.key_numbers(result)
    json.dumps(numbers)
    assert {"clean_acc", "acc_at_max_level", "drop", "mix", "b_simple_final", "gsnr_weighted_final",
            "coupling_gap_smallest_micro", "estimation_mean_dev"} <= set(numbers["bn"])
    assert "acc_at_max_level" not in numbers["none"]
    assert numbers["max_level"] == 0.5


def test_accuracy_at_picks_nearest_grid_point(result):
    point = batch_noise.accuracy_at(result["summary"], 0.4, 40)
    assert point["bn"]["level"] == 0.5 and point["bn"]["batch_size"] == 32
    assert point["none"]["level"] == 0.0


def test_figures_build(result):
    diag = result["diagnostics"]
    losses = {n: result["grid"]["losses"][(n, 0.0, 64)] for n in ("bn", "iebn")}
    runs = [{"norm": n, "level": lv, "losses": v} for (n, lv, bs), v in result["grid"]["losses"].items() if bs == 64]
    figs = [
        bnviz.accuracy_vs_level_figure(result["summary"], kind="both"),
        bnviz.loss_curves_figure(runs),
        bnviz.estimation_noise_figure(diag["estimation"]),
        bnviz.probes_over_training_figure(result["grid"]["probes"]),
        bnviz.gsnr_layers_figure(result["grid"]["probes"]["bn"]["gsnr"]),
        bnviz.coupling_gap_figure(diag["coupling"]),
        bnviz.attention_response_figure(diag["attention_injected"], diag["attention_trained"]),
        bnviz.mix_attack_figure(result["mix"]),
        bnviz.accuracy_at_figure(batch_noise.accuracy_at(result["summary"], 0.5, 64), 0.5, 64, losses),
    ]
    assert all(isinstance(f, go.Figure) and len(f.data) > 0 for f in figs)
    # the no-norm model is a band, not a curve, in the accuracy figure
    assert any("level 0 only" in (t.name or "") for t in figs[0].data)
    with pytest.raises(ValueError):
        bnviz.accuracy_vs_level_figure([])


def test_train_one_removes_noise_and_reproduces():
    mp = pytest.MonkeyPatch()
    patch(mp)
    try:
        a = batch_noise.train_one("bn", 0.5, 64, 0, kind="mean", epochs=1, device="cpu")
        b = batch_noise.train_one("bn", 0.5, 64, 0, kind="mean", epochs=1, device="cpu")
    finally:
        mp.undo()
    assert a["losses"] == b["losses"] and a["test_acc"] == b["test_acc"]
    assert not any("forward" in vars(m) for m in a["model"].modules())
    assert all(torch.isfinite(torch.tensor(a["losses"])))


def test_flat_numbers_and_description(result):
    numbers = batch_noise.key_numbers(result)
    flat = batch_noise.flat_numbers(numbers)
    assert flat["bn_clean_acc"] == numbers["bn"]["clean_acc"]
    assert "iebn_mix_mixed_fashion_mnist_invert" in flat and "bn_mix_alone" in flat and flat["max_level"] == 0.5
    text = batch_noise.describe(numbers)
    assert "IEBN: clean" in text and "BN: clean" in text


def test_slider_view(result):
    view = batch_noise.slider_view(result["grid"], result["summary"], 0.5, 64)
    assert set(view["point"]) == {"bn", "iebn", "none"}
    assert set(view["losses"]) == {"bn", "iebn", "none"}
