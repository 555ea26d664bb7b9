"""Probe base class: the one shape of every measuring training callback. A probe measures a named
quantity on an injected schedule (``every``: every N steps, a list of steps or a callable, see
:mod:`workbench.probes.schedule`) and keeps a JSON log that viz can re-plot offline.

A probe subclass implements :meth:`Probe.measure` (returns a dict of plain values, or ``None`` to
skip) and names the training hook it measures at (``hook``: ``"on_after_backward"`` sees the
batch and the training gradient before the optimiser step; ``"on_step_end"`` sees the updated
weights; ``"on_epoch_end"`` sees the model after each epoch, and its schedule counts epochs,
``1, 2, ...``). Every record carries ``step`` and ``epoch`` (:meth:`Probe.make_record`). Scalar
values of a record are also written into ``state.logs`` (prefixed with the probe's name), so they
appear in ``fit``'s step log.

The log is plain JSON: ``{"probe": name, "config": {...}, "records": [{"step":..., ...}, ...]}``.
With ``path`` set it is written atomically after every epoch and at the end of the fit;
:func:`load_probe_log` / :meth:`ProbeLog.from_json` read it back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from workbench.callbacks import Callback
from workbench.io import plain, write_json_atomic
from workbench.probes.schedule import StepSchedule, as_schedule  # noqa: F401 - StepSchedule re-exported

HOOKS = ("on_after_backward", "on_step_end", "on_epoch_end")


def check_every(every: Any) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every={every!r} is not valid; allowed: an integer >= 1")
    return every


def probe_inputs(data: Any, max_samples: int) -> torch.Tensor:
    """The first ``max_samples`` inputs of ``data`` (a tensor of inputs, or a dataset of ``(x, y)``)
    as one tensor: the fixed probe set of the probes that measure on held data."""
    if isinstance(data, torch.Tensor):
        return data[:max_samples]
    if isinstance(data, Dataset):
        return torch.stack([data[i][0] for i in range(min(len(data), max_samples))])
    raise ValueError(f"data={type(data).__name__} is not valid; allowed: a tensor of inputs or a dataset")


class Probe(Callback):
    """Base of the measurement callbacks; see the module docstring."""

    name = "probe"
    hook = "on_step_end"

    def __init__(self, every: int | Collection[int] | Callable[[int], bool] = 1,
                 path: str | os.PathLike | None = None) -> None:
        if self.hook not in HOOKS:
            raise ValueError(f"{type(self).__name__}.hook={self.hook!r} is not valid; allowed: {HOOKS}")
        self.schedule = as_schedule(every)
        self.every = every
        self.path = Path(path) if path is not None else None
        self.records: list[dict] = []

    # -- to implement --------------------------------------------------------------------------

    def measure(self, state: Any) -> dict | None:
        raise NotImplementedError

    def config(self) -> dict:
        """Settings written into the log (subclasses extend)."""
        return {"every": self.schedule.describe()}

    # -- schedule ------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether the schedule measures at ``step`` (the epoch, ``1, 2, ...``, for epoch probes)."""
        return self.schedule(step)

    def _maybe_measure(self, state: Any, index: int) -> None:
        if not self.due(index):
            return
        values = self.measure(state)
        if values is None:
            return
        record = self.make_record(state, values)
        self.records.append(record)
        logs = getattr(state, "logs", None)
        if isinstance(logs, dict):
            self.log_values(logs, record)

    def make_record(self, state: Any, values: dict) -> dict:
        """The record kept for one measurement: ``step``, ``epoch`` and the plain ``values``."""
        return {"step": int(state.step), "epoch": int(getattr(state, "epoch", 0)), **plain(values)}

    def log_values(self, logs: dict, record: dict) -> None:
        """Copy a record's scalars into ``state.logs`` as ``<name>/<key>``."""
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                logs[f"{self.name}/{key}"] = value

    # -- callback protocol ---------------------------------------------------------------------

    def on_after_backward(self, state: Any) -> None:
        if self.hook == "on_after_backward":
            self._maybe_measure(state, int(state.step))

    def on_step_end(self, state: Any) -> None:
        if self.hook == "on_step_end":
            self._maybe_measure(state, int(state.step))

    def on_epoch_end(self, state: Any) -> None:
        if self.hook == "on_epoch_end":
            self._maybe_measure(state, int(state.epoch) + 1)
        if self.path is not None:
            self.to_json(self.path)

    def on_fit_end(self, state: Any) -> None:
        if self.path is not None:
            self.to_json(self.path)

    def state_dict(self) -> dict:
        return {"records": self.records}

    def load_state_dict(self, state: dict) -> None:
        self.records = list(state.get("records", []))

    # -- log -----------------------------------------------------------------------------------

    def log(self) -> ProbeLog:
        return ProbeLog(probe=self.name, config=plain(self.config()), records=list(self.records))

    def to_json(self, path: str | os.PathLike | None = None) -> Path:
        """Write the log atomically to ``path`` (default: the probe's ``path``)."""
        path = path if path is not None else self.path
        if path is None:
            raise ValueError("path=None is not valid here; allowed: a file path (or set the probe's path)")
        return self.log().to_json(path)

    @staticmethod
    def from_json(path: str | os.PathLike) -> ProbeLog:
        return ProbeLog.from_json(path)


@dataclass
class ProbeLog:
    """A probe's log as plain data: what viz builders and offline re-plots consume."""

    probe: str
    config: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"probe": self.probe, "config": self.config, "records": self.records}

    def to_json(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> ProbeLog:
        if not isinstance(data, dict) or "probe" not in data or "records" not in data:
            raise ValueError("not a probe log; allowed: a dict with 'probe', 'config' and 'records'")
        return cls(probe=data["probe"], config=dict(data.get("config", {})), records=list(data["records"]))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ProbeLog:
        with open(path) as handle:
            return cls.from_dict(json.load(handle))

    @property
    def steps(self) -> list[int]:
        return [r["step"] for r in self.records]

    def series(self, key: str) -> list[Any]:
        """``key``'s value in every record (``None`` where a record lacks it)."""
        return [r.get(key) for r in self.records]


def load_probe_log(path: str | os.PathLike) -> ProbeLog:
    return ProbeLog.from_json(path)
