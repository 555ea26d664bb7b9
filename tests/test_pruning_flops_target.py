"""Pruning to a FLOPs target: both methods land within 2% of it; unreachable targets are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import workbench.pruning.flops_target as flops_target
from workbench.models.segmentation import SEGMENTATION_MODELS
from workbench.pruning import FLOPS_TOLERANCE, check_flops_target, flops_floor, prune, prune_to_flops


def seg_model() -> nn.Module:
    torch.manual_seed(0)
    model = SEGMENTATION_MODELS["segnet"](5, width=0.125)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct BN scales, as after sparsity training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.01)
    return model


@pytest.fixture(scope="module")
def model_and_inputs():
    return seg_model(), torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("method", ["slimming", "cap"])
def test_both_methods_land_within_two_percent_of_the_target(model_and_inputs, method):
    model, x = model_and_inputs
    pruned, report = prune_to_flops(model, 0.4, x, method, latency=False)
    fraction = report.flops_after / report.flops_before
    assert abs(fraction - 0.4) <= FLOPS_TOLERANCE * 0.4, fraction
    assert report.method == method
    # the channel ratio is what it takes, not the target: matching on channels would miss FLOPs
    _, by_channels = prune(model, 0.6, x, method, latency=False)
    assert abs(by_channels.flops_after / by_channels.flops_before - 0.4) > FLOPS_TOLERANCE * 0.4
    with torch.no_grad():
        out = pruned.eval()(x)
    out = out["out"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out
    assert out.shape == (2, 5, 32, 32)


def test_targets_out_of_reach_are_refused_naming_value_and_range(model_and_inputs, monkeypatch):
    model, x = model_and_inputs
    floor = flops_floor(model, x)
    assert 0 < floor < 0.1
    calls = []
    monkeypatch.setattr(flops_target, "prune", lambda *a, **k: calls.append(a) or prune(*a, **k))
    for target in (1.0, 1.5, 0.0, -0.2, "half", True):
        with pytest.raises(ValueError, match=rf"target={target!r} is out of reach; allowed: a fraction .* in \(0, 1\)"):
            prune_to_flops(model, target, x)
    assert calls == []  # refused before any pruning pass
    below = floor / 2
    with pytest.raises(ValueError, match=rf"target={below!r} is out of reach for SegNet; allowed: a FLOPs fraction "
                                         rf"in \[{floor:.4f}, 1\)"):
        prune_to_flops(model, below, x, "cap")
    assert len(calls) == 1  # one pass at the per-layer limit, no search
    assert check_flops_target(model, 0.5, x) == pytest.approx(floor)


def test_tolerance_and_inplace_are_checked(model_and_inputs):
    model, x = model_and_inputs
    with pytest.raises(ValueError, match=r"tolerance=0 is not valid; allowed: a relative tolerance in \(0, 1\)"):
        prune_to_flops(model, 0.5, x, tolerance=0)
    with pytest.raises(ValueError, match=r"inplace=True is not valid here"):
        prune_to_flops(model, 0.5, x, inplace=True)
    with pytest.raises(ValueError, match=r"method='l1' is not valid; allowed: \('slimming', 'cap'\)"):
        prune_to_flops(model, 0.5, x, "l1")
