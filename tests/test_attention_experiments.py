"""Attention / DIA experiments: correlation maths, site grouping, captum on every variant, noise
shift, gradient norms per stage, parameter validation."""

import copy
import math

import pytest
import torch

from workbench.experiments import attention as ea
from workbench.experiments import dia_interrelations as ed
from workbench.probes.attention import attention_sites

WIDTH = 0.25


def _build(name, norm="bn", attention="none", **kw):
    from workbench.models import build_model

    torch.manual_seed(0)
    return build_model(name, num_classes=10, norm=norm, attention=attention, width=WIDTH, **kw)


def _assert_valid_correlation(corr):
    assert torch.allclose(corr, corr.T)
    assert torch.allclose(torch.diagonal(corr), torch.ones(corr.shape[0]))
    assert corr.abs().max() <= 1 + 1e-6
    assert torch.linalg.eigvalsh(corr.double()).min() > -1e-6


# ----------------------------------------------------------------------------------------------
# Correlation


@pytest.mark.parametrize("mode", ed.CORRELATION_MODES)
def test_cross_layer_correlation_is_a_valid_correlation_matrix(mode):
    g = torch.Generator().manual_seed(0)
    base = torch.rand(40, 12, generator=g)
    vectors = [base, base * 0.5 + 0.1, torch.rand(40, 12, generator=g), 1 - base,
               torch.full((40, 12), 0.3)]  # the last is constant: no direction to correlate
    corr = ed.cross_layer_correlation(vectors, mode)
    assert corr.shape == (5, 5)
    _assert_valid_correlation(corr)
    assert corr[0, 1] == pytest.approx(1.0, abs=1e-5)  # an affine copy correlates perfectly
    assert corr[0, 3] == pytest.approx(-1.0, abs=1e-5)
    assert abs(float(corr[0, 2])) < 0.3  # independent noise
    assert float(corr[0, 4]) == 0.0
    summary = ed.correlation_summary(corr)
    assert len(summary["by_distance"]) == 4
    assert summary["by_distance"][0] == pytest.approx(float(torch.diagonal(corr, 1).mean()))


def test_correlation_modes_differ_in_what_they_correlate():
    g = torch.Generator().manual_seed(1)
    profile = torch.rand(1, 16, generator=g)
    # same channel profile for every sample, independent per-sample fluctuations
    a = profile + 0.01 * torch.randn(64, 16, generator=g)
    b = profile + 0.01 * torch.randn(64, 16, generator=g)
    assert ed.cross_layer_correlation([a, b], "profile")[0, 1] > 0.9
    assert abs(float(ed.cross_layer_correlation([a, b], "sample")[0, 1])) < 0.3


def test_correlation_bad_input():
    with pytest.raises(ValueError, match="mode"):
        ed.cross_layer_correlation([torch.rand(3, 4)], "pearson")
    with pytest.raises(ValueError, match="one shape"):
        ed.cross_layer_correlation([torch.rand(3, 4), torch.rand(3, 5)])


@pytest.mark.parametrize("name,blocks", [("resnet20", 3), ("resnet164", 18)])
def test_stage_correlations_on_models(name, blocks):
    model = _build(name, "iebn", "dia")
    out = ed.stage_correlations(model, torch.randn(6, 3, 16, 16), kinds="dia")
    assert out["stages"] == ["layer1", "layer2", "layer3"]
    for mode in ed.CORRELATION_MODES:
        for stage in out["stages"]:
            corr = torch.tensor(out["matrices"][mode][stage])
            assert corr.shape == (blocks, blocks)
            _assert_valid_correlation(corr)
        assert math.isfinite(out["mean"][mode]["all"])


# ----------------------------------------------------------------------------------------------
# Site grouping


def test_parse_site():
    assert ed.parse_site("layer2.3.bn1") == ("layer2", 3, "bn1")
    assert ed.parse_site("layer2.3") == ("layer2", 3, "block")
    assert ed.parse_site("layer1.0.se") == ("layer1", 0, "se")
    assert ed.parse_site("layer2.dia[4]") == ("layer2", 4, "dia")
    assert ed.parse_site("stem.bn") is None


@pytest.mark.parametrize("name,last_bn", [("resnet20", "bn2"), ("resnet164", "bn3")])
def test_block_groups_pick_one_site_per_block(name, last_bn):
    for norm, attention, kind, role in (("iebn", "none", "iebn", last_bn), ("bn", "se", "se", "se"),
                                        ("bn", "dia", "dia", None)):
        sites = attention_sites(_build(name, norm, attention))
        groups = ed.block_groups(sites)
        assert list(groups) == ["layer1", "layer2", "layer3"]
        n = {"resnet20": 3, "resnet164": 18}[name]
        for stage, names in groups.items():
            assert len(names) == n and all(sites[s] == kind for s in names)
            assert names[0].startswith(f"{stage}.0")
            if role is not None:
                assert all(s.endswith(role) for s in names)


# ----------------------------------------------------------------------------------------------
# captum


def test_spearman():
    assert ea.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ea.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert ea.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)  # ties: average ranks
    assert math.isnan(ea.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        ea.spearman([1, 2], [1, 2, 3])


VARIANTS = [(norm, attention) for norm in ("bn", "iebn", "none") for attention in ("none", "se", "dia")
            if not (attention == "none" and norm != "iebn")]


@pytest.mark.parametrize("name", ["resnet20", "resnet164", "preresnet164"])
@pytest.mark.parametrize("norm,attention", VARIANTS)
def test_captum_runs_on_every_variant(name, norm, attention):
    model = _build(name, norm, attention)
    sites = list(attention_sites(model))
    chosen = sorted({sites[0], sites[len(sites) // 2], sites[-1]}, key=sites.index)
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 3, 7])
    model.train()
    out = ea.attribution_agreement(model, x, y, sites=chosen, n_steps=2)
    assert model.training  # mode restored
    assert out["sites"] == chosen
    for site in chosen:
        c = len(out["attention"][site])
        for method in ea.ATTRIBUTION_METHODS:
            assert len(out["importance"][method][site]) == c
            rho = out["rho"][method][site]
            assert math.isnan(rho) or -1 <= rho <= 1
            assert all(math.isfinite(v) for v in out["importance"][method][site])


def test_gradcam_is_per_channel():
    model = _build("resnet20", "bn", "se").eval()
    site = next(iter(attention_sites(model)))
    attrs = ea.channel_attributions(model, torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), site, n_steps=2)
    channels = ea.site_module(model, site).fc2.out_channels
    assert attrs["gradcam"].shape == (2, channels) and attrs["conductance"].shape == (2, channels)
    with pytest.raises(ValueError, match="methods"):
        ea.channel_attributions(model, torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), site, methods=["saliency"])


# ----------------------------------------------------------------------------------------------
# Noise shift


@pytest.mark.parametrize("norm,attention", [("iebn", "none"), ("bn", "dia")])
def test_noise_shift_is_zero_at_level_zero_and_leaves_the_model_alone(norm, attention):
    model = _build("resnet20", norm, attention).eval()
    with torch.no_grad():  # at init IEBN's attn_weight is 0: the gate ignores its input, noise cannot move it
        for m in model.modules():
            if hasattr(m, "attn_weight"):
                m.attn_weight.normal_()
    state = copy.deepcopy(model.state_dict())
    out = ea.attention_noise_shift(model, torch.randn(8, 3, 16, 16), [0.0, 1.0], seed=0)
    assert not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert out["levels"] == [0.0, 1.0]
    shifts = out["shift"]
    assert all(s[0] == 0.0 for s in shifts.values())
    assert sum(s[1] for s in shifts.values()) > 0
    with pytest.raises(ValueError, match="levels"):
        ea.attention_noise_shift(model, torch.randn(2, 3, 16, 16), [-1.0])


# ----------------------------------------------------------------------------------------------
# Gradient norms per stage, training helpers


def test_stage_grad_norms_match_manual_computation():
    from workbench.train import TrainState

    model = _build("resnet20", "bn", "dia")
    groups = ed.StageGradNorms.groups(model)
    assert list(groups) == ["stem", "layer1", "layer2", "layer3", "head"]
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    assert any(p is model.layer2.dia.phi_ih[0].weight for p in groups["layer2"])  # the cell is in its stage
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    probe = ed.StageGradNorms(every=1)
    state = TrainState(model=model, optimizer=None, scheduler=None, device=torch.device("cpu"),
                       task="classification", loss_fn=None, loss=loss)
    probe.on_fit_start(state)
    probe.on_after_backward(state)
    manual = torch.cat([p.grad.flatten() for p in groups["layer3"]]).norm()
    assert probe.records[0]["layer3"] == pytest.approx(float(manual), rel=1e-5)
    assert state.logs["grad_norm/layer3"] == probe.records[0]["layer3"] and "grad_norm/loss" not in state.logs
    assert state.logs["grad_norm/stem"] == probe.records[0]["stem"]
    steps, series = probe.series()
    assert steps == [0] and set(series) == set(groups)


def test_train_classifier_reports_divergence_instead_of_raising():
    run = ea.train_classifier("resnet20", "none", "none", width=WIDTH, epochs=1, lr=1e6, image_size=8,
                              device="cpu", progress=False)
    assert run["diverged"] and "loss became" in run["diverged"]
    assert 0.0 <= run["test_acc"] <= 1.0


def test_gate_curves_for_and_channel_values():
    states = {"layer1": [{k: torch.rand(4, 3) for k in "ifgoch"} for _ in range(2)]}
    curves = ed.gate_curves_for(states, "layer1", sample=1, channel=2)
    assert curves["h"] == [float(states["layer1"][b]["h"][1, 2]) for b in range(2)]
    mean = ed.gate_curves_for(states, "layer1", sample=0, channel=-1)
    assert mean["f"][0] == pytest.approx(float(states["layer1"][0]["f"][0].mean()))
    with pytest.raises(ValueError, match="stage"):
        ed.gate_curves_for(states, "layer9", 0)
    with pytest.raises(ValueError, match="channel"):
        ed.gate_curves_for(states, "layer1", 0, channel=3)


def test_channel_values_by_class():
    from workbench.probes.attention import AttentionAccumulator

    acc = AttentionAccumulator(num_classes=3, keep=10)
    acc.update({"l": torch.rand(6, 4)}, torch.tensor([0, 1, 2, 0, 1, 1]))
    stats = acc.result()
    values = ea.channel_values_by_class(stats, "l", 2, ["a", "b", "c"])
    assert {k: len(v) for k, v in values.items()} == {"a": 2, "b": 3, "c": 1}
    with pytest.raises(ValueError, match="channel"):
        ea.channel_values_by_class(stats, "l", 4, ["a", "b", "c"])
    with pytest.raises(ValueError, match="layer"):
        ea.channel_values_by_class(stats, "x", 0, ["a", "b", "c"])


# ----------------------------------------------------------------------------------------------
# Parameters


def _params02(**kw):
    base = dict(preset="quick", device="cpu", seed=0, model="resnet20", norm="iebn", attention="dia", layer=None,
                num_samples=64)
    base.update(kw)
    return base


def test_resolve_02():
    params = ea.resolve(_params02())
    assert params["layer"] in attention_sites(_build("resnet20", "iebn", "dia"))
    assert params["epochs"] == ea.PRESETS["quick"]["epochs"]
    assert ea.resolve(_params02(layer="layer2.1.bn1"))["layer"] == "layer2.1.bn1"
    with pytest.raises(ValueError, match=r"not found.*available: .*layer1\.0\.bn1"):
        ea.resolve(_params02(layer="layer4.0.bn1"))
    with pytest.raises(ValueError, match="no attention sites"):
        ea.resolve(_params02(norm="bn", attention="none"))
    with pytest.raises(ValueError, match="model"):
        ea.resolve(_params02(model="vgg16"))


def test_resolve_03():
    base = dict(preset="quick", device="cpu", seed=0, model="resnet20", norm="bn", layer=None, num_samples=64)
    assert ed.resolve(dict(base))["layer"] == "layer2"
    with pytest.raises(ValueError, match="layer1, layer2, layer3"):
        ed.resolve(dict(base, layer="layer5"))
    with pytest.raises(ValueError, match="norm"):
        ed.resolve(dict(base, norm="group"))


def test_recording_overhead_reports_ratios():
    out = ea.recording_overhead("resnet20", "iebn", "dia", width=WIDTH, batch_size=2, image_size=8, device="cpu",
                                repeats=2, warmup=1)
    assert set(out["ms"]) == {"plain", "attention", "attention+dia"}
    assert set(out["ratio"]) == {"attention", "attention+dia"} and all(v > 0 for v in out["ratio"].values())
    assert out["sites"] == 19 + 9
