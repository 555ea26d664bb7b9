"""When an instrument measures: every ``N`` steps, at listed steps, or wherever a callable says.

:func:`as_schedule` turns the ``every`` argument of every probe into a :class:`StepSchedule`:

- an ``int`` ``N >= 1``: steps ``0, N, 2N, ...`` (``step % N == 0``);
- a list, tuple, set or range of integers ``>= 0``: exactly those steps;
- a callable ``step -> bool``: where it returns true (e.g. ``lambda s: s in (0, 10) or s % 500 == 0``).

The index is the optimiser step for step-hooked probes and the epoch for epoch-hooked ones.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

ALLOWED = "an integer >= 1 (every N steps), a non-empty list of steps (integers >= 0) or a callable step -> bool"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class StepSchedule:
    """A validated schedule; call it with a step (or epoch) index to ask whether it is due."""

    def __init__(self, spec: int | Collection[int] | Callable[[int], bool], name: str = "every") -> None:
        self.spec = spec
        if _is_int(spec):
            if spec < 1:
                raise ValueError(f"{name}={spec!r} is not valid; allowed: {ALLOWED}")
            self._due: Callable[[int], bool] = lambda step: step % spec == 0
        elif callable(spec):
            self._due = lambda step: bool(spec(step))
        elif isinstance(spec, Collection) and not isinstance(spec, (str, bytes, dict)) and spec \
                and all(_is_int(s) and s >= 0 for s in spec):
            steps = frozenset(spec)
            self._due = steps.__contains__
        else:
            raise ValueError(f"{name}={spec!r} is not valid; allowed: {ALLOWED}")

    def __call__(self, step: int) -> bool:
        return self._due(int(step))

    def describe(self) -> int | list[int] | str:
        """A JSON-safe description for logs: the ``N``, the sorted steps, or the callable's name."""
        if _is_int(self.spec):
            return self.spec
        if callable(self.spec):
            return getattr(self.spec, "__qualname__", type(self.spec).__name__)
        return sorted(self.spec)

    def __repr__(self) -> str:
        return f"StepSchedule({self.describe()!r})"


def as_schedule(spec: int | Collection[int] | Callable[[int], bool] | StepSchedule,
                name: str = "every") -> StepSchedule:
    """``spec`` as a :class:`StepSchedule` (one already built is returned as is)."""
    return spec if isinstance(spec, StepSchedule) else StepSchedule(spec, name)
