"""IEBN gate engagement: per-layer spread of the gate over samples, against a hand computation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from workbench.nn import IEBN2d
from workbench.probes import GATE_ENGAGEMENT_THRESHOLD, GateEngagement, gate_engagement, gate_engagement_warning
from workbench.train import fit


def tiny_iebn() -> nn.Sequential:
    layer = IEBN2d(2)
    with torch.no_grad():
        layer.attn_weight.copy_(torch.tensor([1.0, 0.0]))
        layer.attn_bias.copy_(torch.tensor([0.0, -1.0]))
    return nn.Sequential(layer)


def planes(levels: list[float]) -> torch.Tensor:
    """(N, 2x2) planes [[g-1, g+1], [g, g]]: GAP over H, W is g, but the pixels vary."""
    g = torch.tensor(levels).view(-1, 1, 1)
    return g + torch.tensor([[-1.0, 1.0], [0.0, 0.0]])


def hand_inputs() -> torch.Tensor:
    return torch.stack([planes([0.0, 1.0, 2.0]), planes([1.0, 2.0, 6.0])], dim=1)  # (3, 2, 2, 2)


def test_gate_engagement_matches_hand_computation():
    # channel 0: GAP = 0, 1, 2; gate = sigmoid(1 * GAP + 0) = 0.5, 0.7310586, 0.8807971
    #   mean 0.7039519; population SD sqrt(((-.2039519)^2 + .0271067^2 + .1768452^2) / 3) = 0.1566369
    # channel 1: GAP = 1, 2, 6; gate = sigmoid(0 * GAP - 1) = 0.2689414 for every sample, SD 0
    # gate_std = (0.1566369 + 0) / 2 = 0.0783185; gate_mean = (0.7039519 + 0.2689414) / 2 = 0.4864467
    # relative_spread = 0.0783185 / 0.4864467 = 0.1610011
    # GAP SD: channel 0 sqrt(2/3) = 0.8164966, channel 1 sqrt(14/3) = 2.1602469 -> gap_std 1.4883717
    model = tiny_iebn().train()
    stats = gate_engagement(model, hand_inputs())
    assert list(stats) == ["0"]
    layer = stats["0"]
    assert layer["gate_std"] == pytest.approx(0.0783185, abs=1e-6)
    assert layer["gate_mean"] == pytest.approx(0.4864467, abs=1e-6)
    assert layer["relative_spread"] == pytest.approx(0.1610011, abs=1e-6)
    assert layer["gap_std"] == pytest.approx(1.4883717, abs=1e-6)
    assert model.training  # the mode is restored
    assert gate_engagement(model, hand_inputs(), batch_size=2)["0"] == pytest.approx(layer)  # batches pool


def test_threshold_sentence_follows_the_spread():
    engaged = gate_engagement(tiny_iebn(), hand_inputs())
    assert gate_engagement_warning(engaged) is None
    flat = gate_engagement(nn.Sequential(IEBN2d(2)), hand_inputs())  # at init attn_weight = 0: SD 0
    assert flat["0"]["gate_std"] == 0.0
    sentence = gate_engagement_warning(flat)
    assert sentence.startswith("the gate is not instance-specific: this run cannot speak about IEBN's mechanism")
    assert f"< {GATE_ENGAGEMENT_THRESHOLD:g}" in sentence
    # 0.161 is below a threshold of 0.2
    assert gate_engagement_warning(engaged, threshold=0.2) is not None
    with pytest.raises(ValueError, match=r"threshold=0 is not valid; allowed: a number > 0"):
        gate_engagement_warning(engaged, threshold=0)
    with pytest.raises(ValueError, match=r"threshold=-1 is not valid; allowed: a number > 0"):
        GateEngagement(hand_inputs(), threshold=-1)


def test_gate_engagement_refuses_a_model_without_iebn_and_too_few_samples():
    with pytest.raises(ValueError, match="has no IEBN2d layer"):
        gate_engagement(nn.Sequential(nn.BatchNorm2d(2)), hand_inputs())
    with pytest.raises(ValueError, match=r"inputs of shape \(1, 2, 2, 2\) is not valid; allowed: .* N >= 2"):
        gate_engagement(tiny_iebn(), hand_inputs()[:1])


def test_probe_logs_engagement_on_its_schedule(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), IEBN2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(32, 3, 6, 6), torch.randint(0, 3, (32,))
    probe = GateEngagement(x[:16], every=2, path=tmp_path / "gate.json")
    fit(model, DataLoader(TensorDataset(x, y), batch_size=8), epochs=1, callbacks=[probe], device="cpu",
        progress=False, write_checkpoints=False)
    assert [r["step"] for r in probe.records] == [0, 2]
    record = probe.records[-1]
    assert set(record["layers"]) == {"1"}
    assert record["max_relative_spread"] == pytest.approx(record["layers"]["1"]["relative_spread"])
    # after two SGD steps attn_weight has moved off 0, so the gate varies a little across samples
    assert 0 < record["layers"]["1"]["gate_std"] < 0.05
    assert record["engaged"] == (gate_engagement_warning(record) is None)
    saved = json.loads((tmp_path / "gate.json").read_text())
    assert saved["probe"] == "gate_engagement" and len(saved["records"]) == 2
    assert saved["config"]["threshold"] == GATE_ENGAGEMENT_THRESHOLD
