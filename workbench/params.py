"""Declared notebook parameters: one spec validates a notebook's values in the notebook itself and in
the runner, before any cell runs, so a bad value is refused with the same message in both places."""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "list"}


@dataclass(frozen=True)
class Param:
    """One notebook parameter: its type and the values it may take.

    ``type`` is one of bool/int/float/str/list; an int is accepted where a float is declared.
    ``choices`` restricts to a set of values (for a list: every element); ``min``/``max`` bound
    numbers (inclusive, or exclusive with ``min_open``/``max_open``) and, for lists, every element;
    ``item_type`` types list elements. Every float must be finite. ``validator(name, value)`` runs
    last for checks no type or range expresses (a dataset folder's contents); it returns the value
    to use (a folder path made absolute) or raises ``ValueError``. ``help`` is what ``workbench
    params`` and ``--help`` show.
    """

    type: type
    choices: Sequence[Any] | None = None
    min: float | None = None
    max: float | None = None
    item_type: type | None = None
    help: str = ""
    nullable: bool = False
    validator: Callable[[str, Any], Any] | None = None
    min_open: bool = False
    max_open: bool = False

    def describe(self) -> str:
        """The allowed values in words: ``float >= 0.0 < 1.0``, ``list of str, each one of 'bn', 'iebn'``."""
        parts = [_TYPE_NAMES.get(self.type, self.type.__name__)]
        if self.item_type is not None:
            parts[0] += f" of {_TYPE_NAMES.get(self.item_type, self.item_type.__name__)}"
        if self.choices is not None:
            each = "each " if self.type is list else ""
            parts.append(f"{each}one of " + ", ".join(repr(c) for c in self.choices))
        if self.min is not None:
            parts.append(f"{'>' if self.min_open else '>='} {self.min}")
        if self.max is not None:
            parts.append(f"{'<' if self.max_open else '<='} {self.max}")
        if self.nullable:
            parts.append("or None")
        return " ".join(parts)

    def check(self, name: str, value: Any) -> Any:
        if value is None and self.nullable:
            return None
        value = _check_type(name, value, self.type, self)
        if self.type is list:
            if self.item_type is not None:
                value = [_check_type(f"{name}[{i}]", v, self.item_type, self) for i, v in enumerate(value)]
            for i, v in enumerate(value):
                self._check_bounds(f"{name}[{i}]", v)
                self._check_choice(f"{name}[{i}]", v)
        else:
            self._check_bounds(name, value)
            self._check_choice(name, value)
        if self.validator is not None:
            value = self.validator(name, value)
        return value

    def _check_choice(self, name: str, value: Any) -> None:
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"parameter {name}={value!r} is not allowed; allowed: {self.describe()}")

    def _check_bounds(self, name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"parameter {name}={value!r} must be finite; allowed: {self.describe()}")
        below = self.min is not None and (value <= self.min if self.min_open else value < self.min)
        above = self.max is not None and (value >= self.max if self.max_open else value > self.max)
        if below or above:
            raise ValueError(f"parameter {name}={value!r} is out of range; allowed: {self.describe()}")


def _check_type(name: str, value: Any, expected: type, param: Param) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list and isinstance(value, tuple):
        value = list(value)
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
        raise ValueError(f"parameter {name}={value!r} has type {type(value).__name__}; "
                         f"allowed: {param.describe()}")
    return value


PRESETS = ("quick", "full")
# every preset some notebook has: the CLI's --preset offers these, and each notebook's own "preset"
# parameter refuses the ones it lacks (only the evidence notebooks 01, 03 and 04 have "standard")
ALL_PRESETS = ("quick", "standard", "full")
DEVICE_CHOICES_HELP = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
AMP_CHOICES = ("off", "bf16", "fp16", "auto")  # autocast precision; "auto": bf16 on CUDA, off elsewhere

# Parameters every notebook shares.
COMMON = {
    "preset": Param(str, choices=PRESETS, help="quick: minutes on 2 CPU cores; full: paper-sized runs"),
    "device": Param(str, help=DEVICE_CHOICES_HELP),
    "seed": Param(int, min=0, help="seed of the weights, the batch order and the noise draws"),
}


# How a notebook's training runs on its device (resolved by workbench.device.resolve_acceleration).
ACCELERATION = {
    "amp": Param(str, choices=AMP_CHOICES, help="autocast: 'auto' is bf16 on CUDA and off elsewhere; "
                                                 "'bf16'/'fp16' need CUDA"),
    "channels_last": Param(bool, nullable=True, help="channels-last memory format; None: on with CUDA, "
                                                     "off elsewhere"),
    "compile": Param(bool, help="train the forward through torch.compile"),
}


# Where the paired trial of an evidence notebook (01, 03, 04) runs its points: the sweep's execution
# options under the same names (workbench.sweep.trial_executor).
EXECUTOR_CHOICES = ("local", "ray")
EXECUTION = {
    "jobs": Param(int, min=1, max=512, help="trial points run at once: worker processes (local, each with its share "
                                            "of the cores) or Ray tasks in flight (ray); 1 with local: one after "
                                            "the other in the notebook's kernel"),
    "executor": Param(str, choices=EXECUTOR_CHOICES, help="where the trial's points run: 'local' processes or "
                                                          "'ray' tasks (the ray extra)"),
    "gpus_per_point": Param(float, min=0.0, help="GPUs each Ray task asks for, fractions allowed (0.25: four "
                                                 "points share a GPU); ray only"),
    "ray_address": Param(str, nullable=True, help="the Ray cluster to run on (host:port or ray://host:port); "
                                                  "None: a local Ray instance; ray only"),
}


def resolve_execution(params: dict[str, Any]) -> dict[str, Any]:
    """Fill the execution parameters a caller left out (one local point at a time); refuse Ray-only
    values with ``executor='local'`` and ``executor='ray'`` without Ray installed, before any training
    (a Ray address that does not answer is refused when the trial connects, before its first point).
    Returns ``params``."""
    for name, default in (("jobs", 1), ("executor", "local"), ("gpus_per_point", 0.0), ("ray_address", None)):
        params.setdefault(name, default)
    if params["executor"] == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ValueError("parameter executor='ray' needs Ray, which is not installed; allowed: 'local', or "
                             "install the ray extra (pip install 'workbench[ray]')")
    if params["executor"] == "local":
        ray_only = {k: params[k] for k in ("gpus_per_point", "ray_address") if params[k]}
        if ray_only:
            given = ", ".join(f"{k}={v!r}" for k, v in ray_only.items())
            raise ValueError(f"parameter(s) {given} apply to executor='ray'; allowed with executor='local': "
                             "gpus_per_point=0 and ray_address=None (local points run on the notebook's device)")
    return params


def execution_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`workbench.sweep.trial_executor`'s arguments from parameters :func:`resolve_execution` resolved."""
    return {"jobs": params["jobs"], "executor": params["executor"], "gpus_per_point": params["gpus_per_point"],
            "address": params["ray_address"]}


def validate(values: Mapping[str, Any], spec: Mapping[str, Param], where: str = "notebook") -> dict:
    """Check every value against ``spec``; unknown names and bad values raise ``ValueError``."""
    unknown = sorted(set(values) - set(spec))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for {where}; "
                         f"allowed: {', '.join(sorted(spec))}")
    checked = {name: spec[name].check(name, value) for name, value in values.items()}
    if "device" in checked:
        from workbench.device import _DEVICE_PATTERN

        if not _DEVICE_PATTERN.match(str(checked["device"]).lower()):
            raise ValueError(f"parameter device={checked['device']!r} is not valid; allowed: "
                             f"{DEVICE_CHOICES_HELP}")
    return checked


def parse_cli_value(text: str) -> Any:
    """A command-line value as a Python literal when it is one (``0.1``, ``[1, 2]``, ``True``),
    otherwise as the string itself (``resnet20``). ``nan`` and ``inf`` are floats, so that they are
    refused as non-finite numbers rather than as strings."""
    if text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return float(text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def literal_assignments(source: str) -> dict:
    """``name = literal`` statements of a parameters cell; anything else is an error, since
    papermill can only inject literals and derived values would silently go stale."""
    tree = ast.parse(source)
    values = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"parameters cell may hold only `name = literal` lines, found: "
                             f"{ast.unparse(node)!r}")
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError as exc:
            raise ValueError(f"parameter {node.targets[0].id} is not a literal: "
                             f"{ast.unparse(node.value)!r}") from exc
    return values
