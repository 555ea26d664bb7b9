"""prune() as the composition of plan_pruning, measure_cost and apply_plan."""

from __future__ import annotations

import torch

from workbench.models import build_model
from workbench.pruning import PrunePlan, apply_plan, measure_cost, plan_pruning, prune


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=4, norm="iebn", width=0.25)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # distinct BN scales, so the ranking is not all ties
    return model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_plan_chooses_without_cutting() -> None:
    model, x = _model(), torch.randn(2, 3, 32, 32)
    before = _state(model)
    plan = plan_pruning(model, 0.4, x)
    assert isinstance(plan, PrunePlan) and plan.model is not model
    assert plan.channels_pruned > 0 and plan.channels_total > plan.channels_pruned
    assert plan.threshold is not None
    # the copy is planned, not cut: its state and the original's are untouched
    assert all(torch.equal(before[k], v) for k, v in plan.model.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_composition_matches_prune() -> None:
    x = torch.randn(2, 3, 32, 32)
    pruned, report = prune(_model(), 0.4, x, latency=False)
    plan = plan_pruning(_model(), 0.4, x)
    before = measure_cost(plan.model, x, latency=False)
    work = apply_plan(plan)
    after = measure_cost(work, x, latency=False)
    assert work is plan.model
    assert report.channels_pruned == plan.channels_pruned and report.threshold == plan.threshold
    assert (report.params_before, report.params_after) == (before.params, after.params)
    assert (report.flops_before, report.flops_after) == (before.flops["total"], after.flops["total"])
    assert after.params < before.params and before.latency_ms is None
    assert report.layers == {n: (c, after.channels.get(n, 0)) for n, c in before.channels.items()}
    assert pruned.state_dict().keys() == work.state_dict().keys()
    assert all(torch.equal(v, work.state_dict()[k]) for k, v in pruned.state_dict().items())
    assert work._pruning_record["history"] == pruned._pruning_record["history"]


def test_measure_cost_latency() -> None:
    cost = measure_cost(_model(), torch.randn(2, 3, 32, 32), latency=True, latency_runs=2)
    assert cost.latency_ms is not None and cost.latency_ms > 0 and cost.latency_device == "cpu"
