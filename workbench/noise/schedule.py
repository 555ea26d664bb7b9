"""Noise-level schedules: the level a noise hook applies at a given optimiser step."""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("constant", "ramp")

Schedule = Callable[[int], float]


def check_level(name: str, value: float) -> float:
    """``value`` as a float if it is a finite number >= 0; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} is not valid; allowed: a finite number >= 0")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} is not valid; allowed: a finite number >= 0")
    return value


def make_schedule(schedule: str | Schedule, ramp_steps: int = 1000) -> Schedule:
    """A function ``step -> factor`` multiplying the nominal level.

    - ``"constant"``: factor 1 at every step;
    - ``"ramp"``: linear warm-up ``min(1, step / ramp_steps)``, so step 0 is noise-free and the full
      level is reached at ``ramp_steps``;
    - a callable ``step -> factor`` (factor >= 0, finite), e.g. a cosine or a step profile.
    """
    if callable(schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not valid; allowed: {SCHEDULES} or a callable step -> factor")
    if isinstance(ramp_steps, bool) or not isinstance(ramp_steps, int) or ramp_steps < 1:
        raise ValueError(f"ramp_steps={ramp_steps!r} is not valid; allowed: an integer >= 1")
    if schedule == "constant":
        return _constant
    return _Ramp(ramp_steps)


def _constant(step: int) -> float:
    return 1.0


class _Ramp:
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int) -> float:
        return min(1.0, max(step, 0) / self.steps)

    def __repr__(self) -> str:
        return f"ramp(steps={self.steps})"
