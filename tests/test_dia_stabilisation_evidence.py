"""Notebook 03's paired trial of the DIANet stabilisation claim: arms paired on a seed (initial
weights, batch order), diverged runs counted as chance, tidy rows and verdicts of both comparisons,
refusals before training, the figures. Training is replaced by a recorder (no optimiser step)."""

import pytest
import torch

from workbench.experiments import dia_interrelations as exp
from workbench.experiments import dia_stabilisation_evidence as ev
from workbench.train import NonFiniteLossError
from workbench.viz import dia as vd


def params(**over):
    base = dict(preset="standard", seed=0, seeds=2, conditions=list(ev.CONDITIONS), compare_se=True,
                model="resnet20", device="cpu", evidence_epochs=1, evidence_subset="quick", evidence_image_size=16,
                evidence_train_per_class=2, evidence_test_per_class=1, evidence_batch_size=8, evidence_lr=0.05,
                evidence_width=0.25)
    return {**base, **over}


class Recorder:
    """Stands in for ``fit``: records the initial weights and the batches the run would train on."""

    def __init__(self, error=None):
        self.calls, self.error = [], error

    def __call__(self, net, loader, val_loader, epochs, **kwargs):
        batches = [(x.clone(), y.clone()) for x, y in loader]
        self.calls.append({"state": {k: v.clone() for k, v in net.state_dict().items()}, "batches": batches})
        if self.error:
            raise NonFiniteLossError(self.error)
        return type("Fit", (), {"history": [{"train_loss": 1.25}]})()


@pytest.fixture(scope="module")
def data():
    return ev.load_data(params())


@pytest.mark.parametrize("condition", list(ev.CONDITIONS))
def test_arms_of_a_seed_start_from_the_same_weights_and_batches(monkeypatch, data, condition):
    fit = Recorder()
    monkeypatch.setattr(ev, "fit", fit)
    run_point = ev.make_run_point(params(), data)
    for arm in ev.ARMS:
        run_point(arm, 3, {"condition": condition})
    run_point("none", 4, {"condition": condition})
    none, se, dia, other_seed = fit.calls
    for arm in (se, dia):
        shared = [k for k in none["state"] if k in arm["state"]]
        assert shared == list(none["state"]) and {"stem.conv.weight", "fc.weight"} <= set(shared)
        assert all(torch.equal(none["state"][k], arm["state"][k]) for k in shared)
        assert set(arm["state"]) - set(none["state"]), "the attention arm has modules of its own"
        assert len(arm["batches"]) == len(none["batches"]) >= 2
        for (x0, y0), (x1, y1) in zip(none["batches"], arm["batches"]):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(other_seed["state"]["stem.conv.weight"], none["state"]["stem.conv.weight"])
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(other_seed["batches"], none["batches"]))


def test_the_condition_changes_the_network(data):
    skip = ev.build_arm(params(), "no skip", "none", 10)
    no_bn = ev.build_arm(params(), "no BN", "none", 10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in skip.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in no_bn.modules())


def test_a_diverged_run_counts_as_chance(monkeypatch, data):
    monkeypatch.setattr(ev, "fit", Recorder(error="loss is nan at epoch 1, step 2"))
    row = ev.make_run_point(params(), data)("dia", 0, {"condition": "no BN"})
    assert row["diverged"] is True and row["acc"] == pytest.approx(0.1)
    assert row["final_train_loss"] is None and "nan" in row["diverged_at"]


def test_run_evidence_gives_tidy_rows_and_both_verdicts(monkeypatch, data):
    monkeypatch.setattr(ev, "fit", Recorder())
    evidence = ev.run_evidence(params(), data, progress=False)
    keys = sorted((r["arm"], r["seed"], r["condition"]) for r in evidence["rows"])
    assert keys == sorted((a, s, c) for a in ev.ARMS for s in (0, 1) for c in ev.CONDITIONS)
    assert all(r["final_train_loss"] == 1.25 and r["diverged"] is False for r in evidence["rows"])
    assert set(evidence["verdicts"]) == {"dia_vs_none", "dia_vs_se"}
    for name, arms in (("dia_vs_none", ("none", "dia")), ("dia_vs_se", ("se", "dia"))):
        verdicts = evidence["verdicts"][name]
        assert [v.setting["condition"] for v in verdicts] == list(ev.CONDITIONS)
        for v in verdicts:
            assert (v.reference, v.treatment, v.direction) == (*arms, "greater")
            condition = v.setting["condition"]
            acc = {(r["arm"], r["seed"]): r["acc"] for r in evidence["rows"] if r["condition"] == condition}
            assert v.interval.mean == pytest.approx(sum(acc[(arms[1], s)] - acc[(arms[0], s)] for s in (0, 1)) / 2)
    record = ev.evidence_record(evidence)
    assert len(record["rows"]) == 12 and record["chance"] == pytest.approx(0.1)
    assert len(ev.per_seed_table(evidence["rows"])) == 4
    figure = vd.arm_difference_figure([v.to_dict() for vs in evidence["verdicts"].values() for v in vs])
    assert len(figure.data) >= 1
    assert len(vd.paired_seed_accuracy_figure(evidence["rows"], chance=0.1).data) == 2 * 2


def test_the_quick_preset_says_it_decides_nothing(monkeypatch, data):
    monkeypatch.setattr(ev, "fit", Recorder())
    evidence = ev.run_evidence(params(preset="quick", compare_se=False, conditions=["no skip"]), data, progress=False)
    (verdict,) = evidence["verdicts"]["dia_vs_none"]
    assert ev.SMOKE in verdict.sentence()
    assert {r["arm"] for r in evidence["rows"]} == {"none", "dia"}


@pytest.mark.parametrize("over, words", [
    (dict(seeds=1), ["seeds", "at least 2"]),
    (dict(conditions=["no attention"]), ["conditions", "no skip", "no BN"]),
    (dict(conditions=[]), ["conditions"]),
])
def test_bad_input_is_refused_before_training(monkeypatch, over, words):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(ev, "fit", no_training)
    monkeypatch.setattr(ev, "load_data", no_training)
    for call in (lambda: ev.run_evidence(params(**over), progress=False),
                 lambda: exp.resolve(dict(preset="quick", device="cpu", **over))):
        with pytest.raises(ValueError) as info:
            call()
        assert all(w in str(info.value) for w in words), str(info.value)


def test_presets_fill_the_trial_and_keep_what_is_given():
    resolved = ev.resolve_evidence({"preset": "standard", "seed": 0, "seeds": None, "conditions": ["no BN"]})
    assert resolved["seeds"] >= 5 and resolved["conditions"] == ["no BN"] and resolved["compare_se"] is True
    assert ev.PRESETS["quick"]["seeds"] == 2
