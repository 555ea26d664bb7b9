"""Notebook 01's paired trial of the IEBN claim: calibration, relative drops, verdicts, gate warning,
refusals before training, the gamma-compensated initialisation, the mix verdict, the interval figure."""

import pickle

import pytest
import torch
from fake_datasets import write_fake_cifar100
from test_batch_noise_experiment import Head, tiny

from workbench.data import get_dataset
from workbench.experiments import batch_noise
from workbench.experiments import batch_noise_evidence as ev
from workbench.nn import IEBN2d
from workbench.recipe import share_initial_weights
from workbench.viz import batch_noise as bnviz

NOT_ENGAGED = "cannot speak about IEBN's mechanism"


def params(**over):
    base = dict(preset="standard", seed=0, seeds=3, iebn_init="official", attacks=["mean"], batch_size=16,
                model="resnet20", width=0.5, evidence_epochs=1, lr=0.05, device="cpu", gate_every=1,
                gate_samples=16, calibration_levels=[0.5, 1.0], levels_per_attack=1)
    return {**base, **over}


# ----------------------------------------------------------------------------------------------
# calibration


def test_pick_levels_keeps_the_level_in_the_band():
    # BN clean 0.80: keeps 97.5% at 0.25 (barely attacked), 75% at 0.5 (in the band), 25% at 1.0 (near chance)
    picked = ev.pick_levels(0.80, {0.25: 0.78, 0.5: 0.60, 1.0: 0.20})
    assert picked["levels"] == [0.5] and picked["in_band"] and picked["note"] == ""
    assert picked["retained"][1.0] == pytest.approx(0.25)
    two = ev.pick_levels(0.80, {0.25: 0.70, 0.5: 0.56, 1.0: 0.20}, count=2)
    assert two["levels"] == [0.25, 0.5]


def test_pick_levels_says_when_no_level_is_in_the_band():
    picked = ev.pick_levels(0.80, {0.5: 0.79, 1.0: 0.10})
    assert picked["levels"] == [0.5] and not picked["in_band"]
    assert "outside the calibration band" in picked["note"]
    with pytest.raises(ValueError, match="clean accuracy > 0"):
        ev.pick_levels(0.0, {0.5: 0.1})


def test_calibration_seed_is_not_a_trial_seed():
    p = params(seed=4, seeds=3)
    assert ev.calibration_seed(p) not in range(4, 7)


# ----------------------------------------------------------------------------------------------
# verdicts from rows


def rows_for(drops_bn, drops_iebn, clean=0.8):
    rows = []
    for arm, drops in (("bn", drops_bn), ("iebn", drops_iebn)):
        for seed, drop in enumerate(drops):
            rows.append({"arm": arm, "seed": seed, "attack": "clean", "level": 0.0, "acc": clean})
            rows.append({"arm": arm, "seed": seed, "attack": "mean", "level": 0.5, "acc": clean * (1 - drop)})
    return rows


CALIBRATION = {"seed": 3, "clean_acc": 0.8, "band": [0.5, 0.9],
               "attacks": {"mean": {"levels": [0.5], "retained": {0.5: 0.7}, "in_band": True, "note": ""}}}


@pytest.mark.parametrize("bn, iebn, word", [
    ([0.30, 0.32, 0.31], [0.10, 0.12, 0.11], "supports"),
    ([0.10, 0.12, 0.11], [0.30, 0.32, 0.31], "contradicts"),
    ([0.30, 0.10, 0.20], [0.10, 0.30, 0.21], "inconclusive"),
])
def test_verdict_follows_the_interval_of_relative_drops(bn, iebn, word):
    verdicts = ev.evidence_verdicts(params(), CALIBRATION, rows_for(bn, iebn), {})
    (drop,) = verdicts["drop"]
    iv = drop.interval
    assert drop.verdict == word and drop.metric == "relative_drop" and drop.direction == "less"
    assert iv.mean == pytest.approx(sum(iebn) / 3 - sum(bn) / 3)
    assert (iv.high < 0) == (word == "supports") and (iv.low > 0) == (word == "contradicts")
    assert (iv.low <= 0 <= iv.high) == (word == "inconclusive")
    assert "seeds" in drop.sentence() and drop.sentence().startswith(word)
    assert verdicts["clean"][0].verdict == "inconclusive"  # identical clean accuracies


def test_relative_drop_is_per_arm_and_seed():
    rows = rows_for([0.5, 0.25], [0.1, 0.2], clean=0.8)
    rows[0]["acc"] = 0.4  # bn seed 0 clean lower: its drop is relative to its own clean accuracy
    drops = {(r["arm"], r["seed"]): r["relative_drop"] for r in ev.relative_drop_rows(rows)}
    assert drops[("bn", 0)] == pytest.approx(1 - 0.4 / 0.4)
    assert drops[("bn", 1)] == pytest.approx(0.25) and drops[("iebn", 0)] == pytest.approx(0.1)


def gate_log(spread):
    layers = {"layer1.0.bn1": {"gate_std": spread * 0.27, "gate_mean": 0.27, "relative_spread": spread,
                               "gap_std": 0.1}}
    return {"records": [{"step": 0, "layers": layers}]}


def test_gate_warning_travels_with_every_iebn_verdict():
    rows = rows_for([0.30, 0.32, 0.31], [0.10, 0.12, 0.11])
    flat = {f"{a}/seed{s}": gate_log(0.002) for a in ("clean@0", "mean@0.5") for s in range(3)}
    verdicts = ev.evidence_verdicts(params(), CALIBRATION, rows, flat)
    assert all(NOT_ENGAGED in v.sentence() for v in verdicts["clean"] + verdicts["drop"])
    engaged = {k: gate_log(0.05) for k in flat}
    verdicts = ev.evidence_verdicts(params(), CALIBRATION, rows, engaged)
    assert not any(NOT_ENGAGED in v.sentence() for v in verdicts["clean"] + verdicts["drop"])
    quick = ev.evidence_verdicts(params(preset="quick"), CALIBRATION, rows, engaged)
    assert all("smoke run" in v.sentence() for v in quick["drop"])


# ----------------------------------------------------------------------------------------------
# refusals before training


def test_fewer_than_two_seeds_refused_before_training(monkeypatch):
    with pytest.raises(ValueError, match="seeds=1"):
        batch_noise.resolve(dict(preset="quick", norms=["bn", "iebn"], kind="mean", lr=0.1, mix_shift="invert",
                                 micro_batches=4, seeds=1))
    monkeypatch.setattr(ev, "calibrate", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ValueError, match=r"seeds=1 cannot give a verdict.*at least 2"):
        ev.run_evidence(params(seeds=1), (None, None), progress=False)
    with pytest.raises(ValueError, match=r"attacks=\['gauss'\].*allowed"):
        ev.run_evidence(params(attacks=["gauss"]), (None, None), progress=False)
    with pytest.raises(ValueError, match="iebn_init='zero'"):
        batch_noise.resolve(dict(preset="quick", iebn_init="zero", kind="mean", lr=0.1, mix_shift="invert",
                                 micro_batches=4))


def test_presets_quick_standard_full(tmp_path, monkeypatch):
    base = dict(kind="mean", lr=0.1, mix_shift="invert", micro_batches=4)
    standard = batch_noise.resolve(dict(preset="standard", **base))
    assert standard["dataset"] == "fashion-mnist" and standard["seeds"] >= 3 and standard["mix_seeds"] >= 3
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path))
    write_fake_cifar100(tmp_path)  # the full preset's data must be on disk (refused with its layout otherwise)
    assert batch_noise.resolve(dict(preset="full", **base))["dataset"] == "cifar100"
    quick = batch_noise.resolve(dict(preset="quick", **base))
    assert quick["iebn_init"] == "official" and set(quick["attacks"]) >= {"constant", "constant-noisy-stats"}
    with pytest.raises(ValueError, match="preset='medium'"):
        batch_noise.resolve(dict(preset="medium", **base))


# ----------------------------------------------------------------------------------------------
# gamma-compensated initialisation


def test_gamma_compensation_makes_iebn_start_as_bn():
    torch.manual_seed(0)
    bn_net = tiny("resnet20", "bn", 10, 0.5)
    iebn_net = tiny("resnet20", "iebn", 10, 0.5)
    share_initial_weights(bn_net, iebn_net)
    with torch.no_grad():  # a non-trivial gamma, so the test sees the division
        for i in (1, 4):
            bn_net[i].weight.uniform_(0.5, 1.5)
            iebn_net[i].weight.copy_(bn_net[i].weight)
    x = torch.randn(8, 3, 16, 16)
    gamma = iebn_net[1].weight.clone()
    assert not torch.allclose(iebn_net(x), bn_net(x), atol=1e-4)  # official init: the gate scales by 0.27
    assert ev.compensate_gate_scale(iebn_net) == 2
    assert torch.allclose(iebn_net[1].weight, gamma / torch.sigmoid(torch.tensor(-1.0)))
    assert torch.allclose(iebn_net(x), bn_net(x), atol=1e-5)
    with torch.no_grad():
        iebn_net[1].attn_weight.fill_(0.1)
    with pytest.raises(ValueError, match="initialisation"):
        ev.compensate_gate_scale(iebn_net)
    with pytest.raises(ValueError, match="no IEBN2d"):
        ev.compensate_gate_scale(bn_net)


def test_run_point_pairs_arms_records_gate_and_compensates_only_when_asked(monkeypatch):
    monkeypatch.setattr(batch_noise, "build", tiny)
    train = Head(get_dataset("digits", "train", size=16), 64)
    test = Head(get_dataset("digits", "test", size=16), 32)
    built = []
    original = ev.compensate_gate_scale
    monkeypatch.setattr(ev, "compensate_gate_scale", lambda m: built.append(m) or original(m))
    run_point = ev.make_run_point(params(), (train, test))
    out = run_point("iebn", 0, {"attack": "constant", "level": 0.5})
    pickle.dumps(run_point)  # it may run in a worker process or a Ray task
    row = {"arm": "iebn", "seed": 0, "attack": "constant", "level": 0.5, **out}
    logs = ev.take_gate_logs([row])
    assert set(logs) == {"constant@0.5/seed0"} and "gate_log" not in row and built == []
    assert out["gate_max_relative_spread"] < 0.01  # 4 steps: the gate has not become instance-specific
    assert ev.gate_caveat(logs, {"attack": "constant", "level": 0.5}).startswith("the gate is not instance-specific")
    assert "gate_max_relative_spread" not in run_point("bn", 0, {"attack": "constant", "level": 0.5})
    ev.make_run_point(params(iebn_init="gamma-compensated"), (train, test))("iebn", 0, ev.CLEAN)
    assert len(built) == 1 and isinstance(next(m for m in built[0].modules() if isinstance(m, IEBN2d)), IEBN2d)


# ----------------------------------------------------------------------------------------------
# mix verdict and the interval figure


def test_mix_verdict_uses_the_fair_control():
    rows = []
    for seed in range(3):
        for norm, harm in (("bn", 0.20 + 0.01 * seed), ("iebn", 0.05 + 0.01 * seed)):
            rows.append({"norm": norm, "seed": seed, "arm": "separate", "all": 0.5})  # mixture statistics
            rows.append({"norm": norm, "seed": seed, "arm": "separate-source-stats", "all": 0.9})
            rows.append({"norm": norm, "seed": seed, "arm": "mixed", "all": 0.9 - harm})
    verdict = batch_noise.mix_verdict({"preset": "standard"}, rows)
    assert verdict.verdict == "supports" and verdict.interval.mean == pytest.approx(-0.15)
    assert batch_noise.mix_verdict({"preset": "standard"}, [r for r in rows if r["norm"] == "bn"]) is None


def test_paired_difference_figure_shows_verdicts():
    verdicts = ev.evidence_verdicts(params(), CALIBRATION, rows_for([0.30, 0.32, 0.31], [0.10, 0.12, 0.11]), {})
    fig = bnviz.paired_difference_figure([v.to_dict() for v in verdicts["drop"]])
    (trace,) = fig.data
    assert list(trace.text) == ["supports"] and trace.x[0] == pytest.approx(verdicts["drop"][0].interval.mean)
    assert trace.error_x.array[0] == pytest.approx(verdicts["drop"][0].interval.high - trace.x[0])
    with pytest.raises(ValueError):
        bnviz.paired_difference_figure([])


def test_gate_engagement_figure_draws_every_layer_and_the_threshold():
    from workbench.viz.gate import gate_engagement_figure

    def layer(spread):
        return {"gate_std": spread * 0.27, "gate_mean": 0.27, "relative_spread": spread, "gap_std": 0.5}

    log = {"records": [{"step": s, "layers": {"a": layer(0.001 * (s + 1)), "b": layer(0.02)}} for s in (0, 10)]}
    fig = gate_engagement_figure(log)
    assert len(fig.data) == 3 * 2
    spread_a = next(t for t in fig.data if t.name == "a" and t.xaxis == "x2")
    assert list(spread_a.x) == [0, 10] and list(spread_a.y) == [0.001, 0.011]
    assert any(shape.y0 == 0.01 for shape in fig.layout.shapes)
    with pytest.raises(ValueError, match="no records"):
        gate_engagement_figure({"records": []})
