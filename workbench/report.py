"""Metrics a notebook records for its run's ``results.json``.

Notebooks call :func:`record`; when the runner executes a notebook it sets ``WORKBENCH_METRICS`` to
a file path and every recorded value is written there atomically (the runner never scrapes outputs).
Interactively the values are kept in memory and can be read back with :func:`recorded`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from workbench.io import plain, write_json_atomic

ENV_VAR = "WORKBENCH_METRICS"
BATCH_ENV_VAR = "WORKBENCH_BATCH"
_metrics: dict[str, Any] = {}


def record(name: str, value: Any) -> Any:
    """Record one metric (a number, string, or a list/dict of them) under ``name``; returns ``value``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"metric name must be a non-empty string, got {name!r}")
    _metrics[name] = plain(value, strict=True)
    path = os.environ.get(ENV_VAR)
    if path:
        write_json_atomic(Path(path), _metrics)
    return value


def is_batch() -> bool:
    """True when executed unattended (by the runner, or with ``WORKBENCH_BATCH=1``): notebooks then
    show static figures rather than widgets no one will touch."""
    return bool(os.environ.get(ENV_VAR)) or os.environ.get(BATCH_ENV_VAR, "") not in ("", "0")


def recorded() -> dict:
    return dict(_metrics)


def reset() -> None:
    _metrics.clear()
