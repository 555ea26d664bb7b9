"""The trial protocol: validation before any run, tidy rows, verdicts per setting, pairing of arms."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from workbench.data import get_dataset
from workbench.models import build_model
from workbench.noise import batch_stat_noise
from workbench.recipe import Trial, paired_loader, paired_models, run_trial, share_initial_weights, verdicts_from_rows

# A pure per-point function with a known answer: the treatment adds `gain` at every seed, and the
# seed adds the same offset to both arms (the pairing removes it from the difference).
OFFSETS = {0: 0.50, 1: 0.10, 2: 0.90, 3: 0.30, 4: 0.70}
JITTER = {0: 0.01, 1: -0.02, 2: 0.015, 3: 0.0, 4: -0.005}


def toy_point(arm: str, seed: int, setting: dict) -> dict:
    gain = setting.get("gain", 0.0)
    acc = OFFSETS[seed] + (gain + JITTER[seed] if arm == "iebn" else 0.0)
    return {"acc": acc, "loss": 1.0 - acc}


def toy_trial(**changes) -> Trial:
    spec = {"claim": "IEBN keeps more accuracy than BN", "arms": ("bn", "iebn"), "metric": "acc",
            "direction": "greater", "seeds": [0, 1, 2, 3, 4],
            "settings": [{"gain": 0.2}, {"gain": -0.2}, {"gain": 0.0}]}
    return Trial(**{**spec, **changes})


def test_run_trial_gives_tidy_rows_and_one_verdict_per_setting(tmp_path):
    result = run_trial(toy_trial(), toy_point, progress=False)
    assert len(result.rows) == 3 * 5 * 2
    assert result.rows[0] == {"arm": "bn", "seed": 0, "gain": 0.2, "acc": 0.5, "loss": 0.5}
    assert [v.verdict for v in result.verdicts] == ["supports", "contradicts", "inconclusive"]
    first = result.verdicts[0]
    # differences 0.21, 0.18, 0.215, 0.2, 0.195: mean 0.2 exactly, despite per-seed offsets of 0.1..0.9
    assert first.interval.mean == pytest.approx(0.2)
    assert first.interval.sd < 0.02 and first.interval.n == 5
    assert first.seeds_needed == 2
    assert result.verdicts[2].seeds_needed is None  # mean of the jitter is 0: not reachable
    assert "not reachable" in result.verdicts[2].sentence()
    assert first.sentence().startswith("supports: acc iebn - bn = +0.2 (95% CI")
    path = result.to_json(tmp_path / "results.json")
    saved = json.loads(path.read_text())
    assert saved["trial"]["seeds"] == [0, 1, 2, 3, 4] and len(saved["rows"]) == 30
    assert [v["verdict"] for v in saved["verdicts"]] == ["supports", "contradicts", "inconclusive"]


def test_claim_direction_less_swaps_supports_and_contradicts():
    result = run_trial(toy_trial(direction="less"), toy_point, progress=False)
    assert [v.verdict for v in result.verdicts] == ["contradicts", "supports", "inconclusive"]


def test_rows_from_elsewhere_give_the_same_verdicts_and_executor_matches_serial():
    trial = toy_trial()
    serial = run_trial(trial, toy_point, progress=False)
    with ThreadPoolExecutor(max_workers=2) as pool:
        pooled = run_trial(trial, toy_point, executor=pool, progress=False)
    assert pooled.rows == serial.rows
    again = verdicts_from_rows(trial, list(reversed(serial.rows)))
    assert [v.interval for v in again] == [v.interval for v in serial.verdicts]
    with pytest.raises(ValueError, match=r"rows lack \(arm, seed\) \[\('iebn', 4\)\]"):
        verdicts_from_rows(trial, [r for r in serial.rows if not (r["arm"] == "iebn" and r["seed"] == 4)])


def test_caveats_travel_with_the_verdict():
    verdict = run_trial(toy_trial(), toy_point, progress=False).verdicts[0]
    marked = verdict.with_caveats(None, "the gate is not instance-specific.")
    assert marked.caveats == ("the gate is not instance-specific.",)
    assert marked.sentence().endswith("the gate is not instance-specific.")
    assert marked.to_dict()["caveats"] == ["the gate is not instance-specific."]


@pytest.mark.parametrize("changes, message", [
    ({"seeds": [0]}, r"seeds=\[0\] has 1 seed\(s\); allowed: at least 2 seeds"),
    ({"seeds": []}, r"seeds=\[\] has 0 seed\(s\); allowed: at least 2 seeds"),
    ({"seeds": 3}, r"seeds=3 is not valid; allowed: a list of at least 2 distinct integers"),
    ({"seeds": [1, 1]}, r"seeds=\[1, 1\] is not valid; allowed: distinct integers >= 0"),
    ({"arms": ("bn", "bn")}, r"arms=\('bn', 'bn'\) is not valid; allowed: two distinct names"),
    ({"arms": ("bn", "iebn", "none")}, r"allowed: two distinct names"),
    ({"direction": "better"}, r"direction='better' is not valid; allowed: \('greater', 'less'\)"),
    ({"settings": [{"seed": 1}]}, r"uses the key\(s\) \['seed'\]"),
    ({"settings": []}, r"settings=\(\) is not valid; allowed: a non-empty list of dicts"),
    ({"confidence": 95}, r"confidence=95 is not valid"),
])
def test_bad_trials_are_refused_before_any_point_runs(changes, message):
    calls = []

    def point(arm, seed, setting):
        calls.append((arm, seed))
        return {"acc": 0.5}

    with pytest.raises(ValueError, match=message):
        run_trial(toy_trial(**changes), point, progress=False)
    assert calls == []


def test_a_point_without_the_metric_is_named_and_stops_the_trial():
    calls = []

    def point(arm, seed, setting):
        calls.append(arm)
        return {"loss": 1.0}

    with pytest.raises(ValueError, match=r"run_point\('bn', 0, \{\}\) returned \{'loss': 1.0\}; allowed: a dict "
                                         r"holding the trial's metric 'acc'"):
        run_trial(toy_trial(settings=[{}]), point, progress=False)
    assert calls == ["bn"]


# ----------------------------------------------------------------------------------------------
# pairing


def build(norm: str) -> torch.nn.Module:
    return build_model("resnet20", num_classes=10, norm=norm, width=0.25)


def test_paired_arms_start_from_identical_weights():
    models = paired_models(build, ["bn", "iebn"], seed=3)
    bn, iebn = models["bn"].state_dict(), models["iebn"].state_dict()
    shared = [name for name in bn if name in iebn]
    assert len(shared) == len(bn)  # IEBN adds tensors; every BN-network tensor has a twin
    for name in shared:
        assert torch.equal(bn[name], iebn[name]), name
    extra = sorted(set(iebn) - set(bn))
    assert extra and all(name.endswith(("attn_weight", "attn_bias")) for name in extra)
    # another seed gives other weights
    other = paired_models(build, ["bn", "iebn"], seed=4)["bn"].state_dict()
    first = next(iter(bn))
    assert not torch.equal(other[first], bn[first])


def test_pairing_copies_weights_an_arm_would_draw_differently():
    # an SE network draws its SE blocks' init between the convolutions, so under the same seed
    # alone its later convolutions differ from the BN network's; pairing makes them equal
    def arm(name: str) -> torch.nn.Module:
        return build_model("resnet20", num_classes=10, width=0.25, attention="se" if name == "se" else "none")

    torch.manual_seed(3)
    plain = arm("bn").state_dict()
    torch.manual_seed(3)
    unpaired = arm("se").state_dict()
    differ = [n for n in plain if n in unpaired and not torch.equal(plain[n], unpaired[n])]
    assert differ, "the SE arm should draw some convolution differently without pairing"
    paired = paired_models(arm, ["bn", "se"], seed=3)
    bn, se = paired["bn"].state_dict(), paired["se"].state_dict()
    assert all(torch.equal(bn[n], se[n]) for n in differ)


def test_share_initial_weights_copies_only_matching_names_and_shapes():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2))
    b = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 5))
    shared = share_initial_weights(a, b)
    assert shared.copied == ["0.weight", "0.bias"] and shared.kept == ["1.weight", "1.bias"]
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[1].bias[:2], b[1].bias[:2])


def _order(loader, epochs: int = 2) -> list[list[int]]:
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out.append([i for i in loader.sampler])
    return out


def test_paired_arms_see_the_same_batch_order_and_noise_draws():
    data = get_dataset("digits", "train", size=8)
    first, second = paired_loader(data, 32, seed=5), paired_loader(data, 32, seed=5)
    assert _order(first) == _order(second)
    assert _order(first) != _order(paired_loader(data, 32, seed=6))
    batch_a = next(iter(first))
    batch_b = next(iter(second))
    assert torch.equal(batch_a[0], batch_b[0]) and torch.equal(batch_a[1], batch_b[1])

    def draws(norm: str, seed: int) -> list[torch.Tensor]:
        model = paired_models(build, ["bn", "iebn"], seed=0)[norm].train()
        noise = batch_stat_noise(model, 0.5, kind="both", seed=seed)
        recorded, original = [], noise._normal
        noise._normal = lambda *args, **kwargs: recorded.append(original(*args, **kwargs)) or recorded[-1]
        with noise:
            model(torch.randn(4, 3, 8, 8))
        return recorded

    bn_draws, iebn_draws = draws("bn", 7), draws("iebn", 7)
    assert len(bn_draws) == len(iebn_draws) > 0
    assert all(torch.equal(x, y) for x, y in zip(bn_draws, iebn_draws))
    assert not torch.equal(draws("iebn", 8)[0], iebn_draws[0])


# ----------------------------------------------------------------------------------------------
# end to end: a real training loop through the protocol


def arm_builder(arm: str) -> torch.nn.Module:
    model = build("bn")
    if arm == "bn_again":
        torch.randn(1000)  # this arm's construction draws more from the global generator (as an SE block would)
    return model


def train_point(arm: str, seed: int, setting: dict) -> dict:
    """A per-point function as experiments write it: paired weights, batches, noise and augmentation.
    Both arms build the same BN network, so exact pairing must give identical metrics."""
    from torch.utils.data import Subset

    from workbench.train import evaluate, fit, make_optimizer

    train = get_dataset("digits", "train", size=8, augment=True)
    test = Subset(get_dataset("digits", "test", size=8), range(128))
    model = paired_models(arm_builder, ["bn", arm] if arm != "bn" else ["bn"], seed)[arm]
    noise = batch_stat_noise(model, setting["level"], kind="both", seed=seed)
    fit(model, paired_loader(train, 32, seed), epochs=1, max_steps=4, optimizer=make_optimizer(model, "sgd", 0.05),
        callbacks=[noise], device="cpu", progress=False, write_checkpoints=False)
    noise.remove()
    return {"acc": evaluate(model, torch.utils.data.DataLoader(test, 64), device="cpu")["acc"],
            "weight_sum": float(sum(p.detach().double().sum() for p in model.parameters()))}


def test_identical_arms_on_paired_seeds_differ_by_exactly_zero():
    trial = Trial(claim="a copy of BN equals BN", arms=("bn", "bn_again"), metric="weight_sum",
                  direction="greater", seeds=[0, 1], settings=[{"level": 0.5}])
    result = run_trial(trial, train_point, progress=False)
    by_seed = {(r["arm"], r["seed"]): r for r in result.rows}
    assert by_seed[("bn", 0)]["weight_sum"] != by_seed[("bn", 1)]["weight_sum"]  # the seed matters
    for seed in (0, 1):
        assert by_seed[("bn", seed)] | {"arm": "x"} == by_seed[("bn_again", seed)] | {"arm": "x"}
    verdict = result.verdicts[0]
    assert verdict.interval.mean == 0.0 and verdict.interval.sd == 0.0
    assert verdict.verdict == "inconclusive" and verdict.seeds_needed is None


def test_one_arms_points_give_the_same_rows_as_the_whole_trial():
    """run_points over one arm's points (its reference rows ran elsewhere) checks and shapes each row as
    run_trial does; an arm the trial does not have is refused."""
    from workbench.recipe import run_points

    trial = toy_trial()
    whole = run_trial(trial, toy_point, progress=False).rows
    treatment = run_points(trial, trial.points(arms=("iebn",)), toy_point, progress=False)
    assert treatment == [row for row in whole if row["arm"] == "iebn"]
    with pytest.raises(ValueError, match=r"arms=\['se'\] are not arms of this trial; allowed: \['bn', 'iebn'\]"):
        trial.points(arms=("se",))
    with pytest.raises(ValueError, match="allowed: a dict holding the trial's metric 'acc'"):
        run_points(trial, trial.points(arms=("bn",)), lambda arm, seed, setting: {"loss": 0.0}, progress=False)
