"""The probe schedule: every N steps, listed steps, or a callable; shared by every probe."""

from __future__ import annotations

import types

import pytest
import torch

from workbench.probes import BNScaleProbe, Probe, StageGradNorms, StepSchedule, as_schedule


class Counter(Probe):
    name = "counter"

    def measure(self, state) -> dict:
        return {"value": float(state.step)}


def _run(probe: Probe, steps: int) -> list[int]:
    state = types.SimpleNamespace(step=0, epoch=0, logs={})
    for step in range(steps):
        state.step = step
        probe.on_step_end(state)
    return [r["step"] for r in probe.records]


def test_every_n_steps() -> None:
    assert _run(Counter(every=3), 10) == [0, 3, 6, 9]
    assert Counter(every=3).config() == {"every": 3}


def test_listed_steps() -> None:
    assert _run(Counter(every=[7, 2, 2]), 10) == [2, 7]
    assert _run(Counter(every=range(0, 10, 4)), 10) == [0, 4, 8]
    assert Counter(every=(7, 2)).config() == {"every": [2, 7]}


def test_callable() -> None:
    def early_then_sparse(step: int) -> bool:
        return step < 2 or step % 5 == 0

    probe = Counter(every=early_then_sparse)
    assert _run(probe, 12) == [0, 1, 5, 10]
    assert probe.config() == {"every": "test_callable.<locals>.early_then_sparse"}


@pytest.mark.parametrize("spec", [0, -1, True, 1.5, "5", [], [1, -2], [1, 2.0], {"a": 1}, None])
def test_bad_schedule_is_refused_before_work(spec) -> None:
    with pytest.raises(ValueError, match=r"every=.* is not valid; allowed: an integer >= 1 \(every N steps\), a "
                                         r"non-empty list of steps"):
        Counter(every=spec)


def test_as_schedule_passes_a_built_schedule_through() -> None:
    schedule = as_schedule(4)
    assert isinstance(schedule, StepSchedule) and as_schedule(schedule) is schedule
    assert [s for s in range(9) if schedule(s)] == [0, 4, 8]


def test_one_shape_for_every_measuring_callback() -> None:
    # the BN-scale history and the stage gradient norms are probes with the same schedule argument
    assert issubclass(BNScaleProbe, Probe) and issubclass(StageGradNorms, Probe)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    probe = StageGradNorms(every=[1])
    state = types.SimpleNamespace(model=model, step=0, epoch=0, logs={}, loss=torch.tensor(2.0))
    probe.on_fit_start(state)
    for step in range(3):
        state.step = step
        probe.on_after_backward(state)
    assert [r["step"] for r in probe.records] == [1] and probe.records[0]["loss"] == 2.0
