"""Argument checks shared by the dataset builders: fail before any work with the allowed values."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_choice(param: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{param}={value!r} is not valid; allowed: {', '.join(repr(a) for a in allowed)}")
    return value


def check_int(param: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    # bool is an int subclass; size=True is always a mistake
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{param}={value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{param}={value!r} must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{param}={value!r} must be <= {maximum}")
    return value


def check_bool(param: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{param}={value!r} must be True or False")
    return value


def check_float(param: str, value: Any, minimum: float | None = None, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{param}={value!r} must be a number")
    if minimum is not None and value < minimum:
        raise ValueError(f"{param}={value!r} must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{param}={value!r} must be <= {maximum}")
    return float(value)


def check_hw(param: str, value: Any, minimum: int = 1) -> tuple[int, int]:
    """An ``int`` (square) or an ``(h, w)`` pair of positive integers."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, tuple | list) or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair)):
        raise ValueError(f"{param}={value!r} must be an integer >= {minimum} or a pair (h, w) of them")
    return int(pair[0]), int(pair[1])
