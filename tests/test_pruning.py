"""Channel pruning: every segmentation net, torchvision's, the paper's threshold, bad input, save/load."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from workbench.models.segmentation import SEGMENTATION_MODELS
from workbench.pruning import (
    EffectiveScaleImportance,
    PerChannelNormPruner,
    count_flops,
    count_params,
    load_pruned,
    make_spec,
    prune,
    save_pruned,
)

WIDTH = {"segnet": 0.125, "pspnet_resnet18": 0.125, "pspnet_resnet50": 0.0625, "pspnet_resnet101": 0.0625,
         "icnet": 0.125}


def randomise_scales(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct BN scales, as after training (a fresh net has every gamma = 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.01)
    return model


def seg_model(name: str, norm: str = "bn") -> nn.Module:
    torch.manual_seed(0)
    return randomise_scales(SEGMENTATION_MODELS[name](11, width=WIDTH[name], norm=norm))


def main_out(out):
    return out["out"] if isinstance(out, dict) else out


def check_pruned(original: nn.Module, pruned: nn.Module, report, x: torch.Tensor, classes: int) -> None:
    assert report.params_after < report.params_before
    assert count_params(pruned) == report.params_after < count_params(original)
    assert report.flops_after < report.flops_before
    assert all(after > 0 for _, after in report.layers.values()), "a layer was pruned to zero channels"
    assert report.channels_pruned > 0
    pruned.eval()
    with torch.no_grad():
        out = main_out(pruned(x))
    spatial = tuple(x.shape[-2:]) if out.dim() == 4 else ()
    assert out.shape == (x.shape[0], classes, *spatial)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("ratio", [0.3, 0.7])
@pytest.mark.parametrize("norm", ["bn", "iebn"])
@pytest.mark.parametrize("name", sorted(SEGMENTATION_MODELS))
def test_prune_segmentation_models(name: str, norm: str, ratio: float) -> None:
    model = seg_model(name, norm)
    x = torch.randn(1, 3, 32, 32)
    pruned, report = prune(model, ratio, x, latency=False)
    check_pruned(model, pruned, report, x, 11)
    # training mode (aux heads) still runs and back-propagates after pruning
    pruned.train()
    out = pruned(torch.randn(2, 3, 32, 32))
    aux = out.get("aux", []) if isinstance(out, dict) else []
    aux = aux if isinstance(aux, list) else [aux]
    assert all(a.shape == (2, 11, 32, 32) for a in aux)
    (main_out(out).mean() + sum(a.mean() for a in aux)).backward()
    if norm == "iebn":
        from workbench.nn import IEBN2d

        for m in pruned.modules():
            if isinstance(m, IEBN2d):
                assert m.attn_weight.shape == m.attn_bias.shape == m.weight.shape == (m.num_features,)


TORCHVISION = ["fcn_resnet50", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large"]


@pytest.mark.parametrize("ratio", [0.3, 0.7])
@pytest.mark.parametrize("name", TORCHVISION)
def test_prune_torchvision_segmentation(name: str, ratio: float) -> None:
    from torchvision.models import segmentation

    torch.manual_seed(0)
    kwargs = {"aux_loss": True} if name != "lraspp_mobilenet_v3_large" else {}
    model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=5, **kwargs)
    randomise_scales(model)
    x = torch.randn(1, 3, 64, 64)
    pruned, report = prune(model, ratio, x, latency=False)
    check_pruned(model, pruned, report, x, 5)
    with torch.no_grad():
        out = pruned.eval()(x)
    if "aux" in out:
        assert out["aux"].shape == (1, 5, 64, 64)
    assert report.ignored_layers  # the classifiers were found and kept


def test_ratio_zero_is_numerically_unchanged() -> None:
    model = seg_model("pspnet_resnet18", "iebn").eval()
    x = torch.randn(2, 3, 32, 32)
    pruned, report = prune(model, 0.0, x, latency=False)
    assert report.channels_pruned == 0 and report.params_after == report.params_before
    with torch.no_grad():
        assert torch.equal(model(x), pruned(x))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pruned.state_dict().values()))


def test_original_untouched_unless_inplace() -> None:
    model = seg_model("segnet")
    model.train()
    before = copy.deepcopy(model.state_dict())
    pruned, _ = prune(model, 0.5, torch.randn(1, 3, 32, 32), latency=False)
    assert pruned is not model and model.training and pruned.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    same, report = prune(model, 0.5, torch.randn(1, 3, 32, 32), inplace=True, latency=False)
    assert same is model and count_params(model) == report.params_after


class Chain(nn.Module):
    """VGG-like chain, no coupling: Network Slimming's own setting."""

    def __init__(self, widths=(12, 16, 20, 24), classes: int = 3) -> None:
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(c, classes, 1)

    def forward(self, x):
        return self.classifier(self.features(x))


def test_threshold_matches_network_slimming_recipe() -> None:
    torch.manual_seed(1)
    model = randomise_scales(Chain(), seed=3)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    ratio = 0.45
    # the authors' code: sort all |gamma|, threshold at index floor(p * total), keep |gamma| > threshold
    allg = torch.cat([m.weight.detach().abs() for m in bns])
    ordered, _ = torch.sort(allg)
    threshold = ordered[int(allg.numel() * ratio)]
    masks = [m.weight.detach().abs() > threshold for m in bns]
    pruned, report = prune(model, ratio, torch.randn(1, 3, 16, 16), max_layer_ratio=1.0, latency=False)
    assert not report.floored_groups
    assert report.threshold == pytest.approx(float(threshold))
    assert report.channels_total == allg.numel()
    assert report.channels_pruned == allg.numel() - sum(int(k.sum()) for k in masks)
    pruned_bns = [m for m in pruned.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn, new, keep in zip(bns, pruned_bns, masks):
        assert torch.equal(new.weight.detach(), bn.weight.detach()[keep])
        assert torch.equal(new.running_var, bn.running_var[keep])


def test_per_layer_floor_never_empties_a_layer() -> None:
    model = Chain()
    with torch.no_grad():
        model.features[1].weight.fill_(1e-4)  # a whole layer far below every other scale
        for i in (4, 7, 10):
            model.features[i].weight.uniform_(0.5, 1.0)
    pruned, report = prune(model, 0.2, torch.randn(1, 3, 8, 8), max_layer_ratio=0.75, latency=False)
    assert report.layers["features.1"] == (12, 3)  # floor(0.75 * 12) removed at most
    assert report.floored_groups == ["features.0"]
    pruned2, report2 = prune(model, 0.2, torch.randn(1, 3, 8, 8), max_layer_ratio=1.0, min_channels=2,
                             latency=False)
    assert report2.layers["features.1"] == (12, 2)


def test_iebn_importance_is_effective_scale() -> None:
    from workbench.nn import IEBN2d

    model = seg_model("segnet", "iebn")
    iebn = model.encoder[0][0][1]
    assert isinstance(iebn, IEBN2d)
    attention = torch.linspace(0.1, 0.9, iebn.num_features)
    imp = EffectiveScaleImportance(attention={iebn: attention})
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(
        model, torch.randn(1, 3, 32, 32), customized_pruners={IEBN2d: PerChannelNormPruner()})
    conv = model.encoder[0][0][0]
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(conv.out_channels)))
    scores = imp(group)
    assert torch.allclose(scores, iebn.weight.detach().abs() * attention)


def test_cap_method_uses_guidance() -> None:
    model = Chain()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.running_mean.copy_(torch.arange(m.num_features, dtype=torch.float))
    guide = torch.full((12,), 0.5)
    guide[:6] = 0.9  # channels 0..5 of the first layer are contextually important
    x = torch.randn(1, 3, 8, 8)
    cap, rep = prune(model, 0.1, x, method="cap", guidance={"features.1": guide}, latency=False)
    assert rep.channels_pruned == math.floor(0.1 * 72) + 1
    # the six unguided channels score lowest and go first; the guided ones all stay
    assert rep.layers["features.1"] == (12, 6)
    assert torch.equal(cap.features[1].running_mean, torch.arange(6, dtype=torch.float))
    # plain slimming ignores the guidance: it sees only ties and breaks them by graph order
    _, rep_slim = prune(model, 0.1, x, method="slimming", guidance={"features.1": guide}, latency=False)
    assert rep_slim.channels_pruned == rep.channels_pruned
    assert rep_slim.layers["features.1"] != rep.layers["features.1"]


@pytest.mark.parametrize("kwargs,match", [
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"ratio": "0.3"}, "ratio"),
    ({"method": "fpgm"}, "method"), ({"min_channels": 0}, "min_channels"),
    ({"max_layer_ratio": 0.0}, "max_layer_ratio"),
    ({"example_inputs": torch.randn(1, 4, 16, 16)}, "example_inputs"),
    ({"example_inputs": "image"}, "example_inputs"),
])
def test_bad_input_raises_before_any_change(kwargs: dict, match: str) -> None:
    model = seg_model("pspnet_resnet18")
    model.train()
    before = copy.deepcopy(model.state_dict())
    args = {"ratio": 0.3, "example_inputs": torch.randn(1, 3, 32, 32), **kwargs}
    with pytest.raises(ValueError, match=match):
        prune(model, args.pop("ratio"), args.pop("example_inputs"), inplace=True, latency=False, **args)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_model_without_bn_is_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with pytest.raises(ValueError, match="BatchNorm"):
        prune(model, 0.3, torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("name,norm", [("segnet", "bn"), ("pspnet_resnet18", "iebn"), ("icnet", "bn")])
def test_save_load_roundtrip(tmp_path, name: str, norm: str) -> None:
    model = seg_model(name, norm)
    x = torch.randn(1, 3, 32, 32)
    pruned, _ = prune(model, 0.5, x, latency=False)
    spec = make_spec(f"workbench.models.segmentation:{name}", 11, width=WIDTH[name], norm=norm)
    path = save_pruned(pruned, tmp_path / "pruned.pt", spec=spec)
    loaded = load_pruned(path)
    assert count_params(loaded) == count_params(pruned)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), pruned.eval()(x))
    # pruning a pruned model again replays both steps
    twice, _ = prune(loaded, 0.3, x, latency=False)
    again = load_pruned(save_pruned(twice, tmp_path / "twice.pt"))
    with torch.no_grad():
        assert torch.equal(again.eval()(x), twice.eval()(x))
    # the file is plain data: weights_only loading works on it
    assert torch.load(path, weights_only=True)["format"].startswith("workbench.pruned-model")


def test_save_needs_a_spec_and_allowed_builder(tmp_path) -> None:
    pruned, _ = prune(Chain(), 0.3, torch.randn(1, 3, 8, 8), latency=False)
    with pytest.raises(ValueError, match="spec"):
        save_pruned(pruned, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="allowed"):
        make_spec("os:system", "true")


def test_report_costs_and_dict() -> None:
    model = seg_model("pspnet_resnet18", "iebn")
    x = torch.randn(1, 3, 32, 32)
    pruned, report = prune(model, 0.5, x, latency_runs=2)
    d = report.to_dict()
    assert d["params_before"] == count_params(model) and d["params_after"] == count_params(pruned)
    assert d["flops_before"] == count_flops(model, x)["total"]
    assert report.flops_detail_before["elementwise"] > 0  # IEBN gates, residual adds
    assert report.latency_ms_before > 0 and report.latency_ms_after > 0 and d["speedup"] > 0
    assert 0 < d["params_reduction"] < 1 and d["flops_ratio"] > 1
    assert d["layers"]["backbone.conv1"][0] >= d["layers"]["backbone.conv1"][1]
    import json

    json.dumps(d)


def test_conv_flops_formula() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    flops = count_flops(conv, torch.randn(2, 4, 5, 5))
    assert flops["conv_matmul"] == 2 * 2 * 6 * 5 * 5 * 4 * 9 and flops["elementwise"] == 0


def test_round_to_keeps_multiples() -> None:
    model = randomise_scales(Chain(widths=(24, 32, 40, 48)))
    _, report = prune(model, 0.5, torch.randn(1, 3, 8, 8), round_to=8, latency=False)
    kept = [report.layers[f"features.{i}"][1] for i in (1, 4, 7, 10)]
    assert all(k % 8 == 0 for k in kept) and sum(kept) < 144
    assert report.round_to == 8
    with pytest.raises(ValueError, match=r"round_to=0 is not valid; allowed: None, 'auto'"):
        prune(model, 0.5, torch.randn(1, 3, 8, 8), round_to=0)


def test_round_to_auto_is_the_devices_multiple(monkeypatch) -> None:
    from workbench.pruning import preferred_round_to

    model = randomise_scales(Chain(widths=(24, 32, 40, 48)))
    for capability, multiple in (("AVX512", 16), ("AVX2", 8), ("DEFAULT", 8)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert preferred_round_to("cpu") == multiple
        _, report = prune(model, 0.5, torch.randn(1, 3, 8, 8), round_to="auto", latency=False)
        kept = [report.layers[f"features.{i}"][1] for i in (1, 4, 7, 10)]
        assert report.round_to == multiple and all(k % multiple == 0 for k in kept)
    assert preferred_round_to("meta") == 8


def test_benchmark_quick_runs(capsys) -> None:
    from workbench.benchmarks.pruning import main
    from workbench.pruning import preferred_round_to

    assert main(["--quick", "--models", "pspnet_resnet18", "--ratios", "0.5", "--runs", "1", "--size", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "pspnet_resnet18 | eager | 0.50" in out and "efficiency" in out
    assert f"round_to {preferred_round_to('cpu')}," in out  # auto: the CPU's multiple
    with pytest.raises(SystemExit):
        main(["--round-to", "nine"])
    assert "--round-to: 'nine' is not valid; allowed: auto or an integer >= 0" in capsys.readouterr().err


def _resnet_cases() -> list:
    cases = []
    for name, width in (("resnet20", 0.5), ("resnet164", 0.25)):
        for norm in ("bn", "iebn"):
            for attention in ("none", "se", "dia"):
                # ResNet-164's 500-odd layers take 10-40 s on two shared cores: all but one are slow
                slow = name == "resnet164" and (norm, attention) != ("bn", "none")
                cases.append(pytest.param(name, width, norm, attention, marks=[pytest.mark.slow] if slow else []))
    return cases


@pytest.mark.parametrize("name,width,norm,attention", _resnet_cases())
def test_prune_cifar_resnets(name: str, width: float, norm: str, attention: str) -> None:
    from workbench.models import build_model

    torch.manual_seed(0)
    model = randomise_scales(build_model(name, num_classes=10, norm=norm, attention=attention, width=width))
    x = torch.randn(2, 3, 32, 32)
    for ratio in (0.3, 0.7):
        pruned, report = prune(model, ratio, x[:1], latency=False)
        check_pruned(model, pruned, report, x, 10)
        pruned.train()(x).sum().backward()
        if attention == "dia":
            for stage in (pruned.layer1, pruned.layer2, pruned.layer3):
                assert stage.dia.channels == stage[len(stage) - 1].last_branch_layer().weight.shape[0]


@pytest.mark.parametrize("name", ["resnet20", "resnet164"])
def test_resnet_without_norm_is_rejected(name: str) -> None:
    from workbench.models import build_model

    model = build_model(name, num_classes=10, norm="none", width=0.25)
    with pytest.raises(ValueError, match="BatchNorm"):
        prune(model, 0.3, torch.randn(1, 3, 32, 32))


def test_dia_pruner_keeps_gates_aligned() -> None:
    from workbench.nn.dia import DIALSTMCell
    from workbench.pruning import DIAPruner

    torch.manual_seed(0)
    cell = DIALSTMCell(8, reduction=2)
    pruned = DIAPruner().prune_out_channels(copy.deepcopy(cell), [1, 4, 6])
    keep = [0, 2, 3, 5, 7]
    assert pruned.channels == 5 and pruned.phi_ih[-1].out_features == 20 and pruned.phi_hh[0].in_features == 5
    z, h, c = torch.randn(3, 8), torch.rand(3, 8), torch.randn(3, 8)
    drop = [1, 4, 6]
    z[:, drop] = 0
    h[:, drop] = 0  # pruned channels contribute nothing: the kept ones must match exactly
    h_ref, c_ref = cell(z, (h, c))
    h_new, c_new = pruned(z[:, keep], (h[:, keep], c[:, keep]))
    assert torch.allclose(h_new, h_ref[:, keep], atol=1e-6) and torch.allclose(c_new, c_ref[:, keep], atol=1e-6)


@pytest.mark.parametrize("explicit_spec", [True, False], ids=["spec-given", "spec-from-build_model"])
def test_save_load_dia_resnet(tmp_path, explicit_spec: bool) -> None:
    from workbench.models import build_model

    spec = make_spec("workbench.models:build_model", "resnet20", num_classes=10, norm="iebn", attention="dia",
                     width=0.5)
    torch.manual_seed(0)
    model = randomise_scales(build_model("resnet20", num_classes=10, norm="iebn", attention="dia", width=0.5))
    x = torch.randn(2, 3, 32, 32)
    pruned, _ = prune(model, 0.5, x[:1], latency=False)
    # build_model remembers how it built the model, so the spec argument is optional
    loaded = load_pruned(save_pruned(pruned, tmp_path / "r20.pt", spec=spec if explicit_spec else None))
    assert loaded.build_spec == spec
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), pruned.eval()(x))
