"""Save and load pruned models without pickling code.

A pruned model's architecture differs from what its builder makes, and ``torch.save(model)``
pickles classes (not loadable with ``weights_only=True``). Instead the file holds plain data:

- ``spec``: how to build the unpruned model, ``{"builder": "package.module:function", "args": [...],
  "kwargs": {...}, "transforms": ["package.module:function", ...]}`` (transforms, e.g.
  ``workbench.nn:convert_bn_to_iebn``, are applied to the built model in order). Only builders
  in ``workbench`` and ``torchvision.models`` are accepted, so a file cannot name arbitrary code;
- the pruning record :func:`~workbench.pruning.prune` attached to the model: Torch-Pruning's
  pruning history (root layer, channel indices, in order), the example input shape and dtype, and
  the coupled layer names;
- the pruned ``state_dict``.

:func:`load_pruned` builds the model from the spec, replays the history on a fresh dependency
graph (same couplings and custom pruners), then loads the state dict with ``weights_only=True``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.io import atomic_open
from workbench.pruning.graph import build_graph

FORMAT = "workbench.pruned-model/1"
ALLOWED_PACKAGES = ("workbench", "torchvision.models")


def make_spec(builder: str, *args: Any, transforms: Sequence[str] = (), **kwargs: Any) -> dict:
    """A build spec: ``builder`` is ``"package.module:function"``; args/kwargs must be plain data."""
    spec = {"builder": builder, "args": list(args), "kwargs": dict(kwargs), "transforms": list(transforms)}
    _resolve(builder)
    for t in transforms:
        _resolve(t)
    return spec


def attach_spec(model: nn.Module, spec: dict) -> nn.Module:
    """Remember how ``model`` was built (``save_pruned`` reads it); returns ``model``."""
    _check_spec(spec)
    model.build_spec = spec
    return model


def _resolve(path: str) -> Callable:
    if not isinstance(path, str) or ":" not in path:
        raise ValueError(f"builder {path!r} must be a 'package.module:function' string")
    module_name, _, attr = path.partition(":")
    if not any(module_name == p or module_name.startswith(p + ".") for p in ALLOWED_PACKAGES):
        raise ValueError(f"builder {path!r} is outside the allowed packages {ALLOWED_PACKAGES}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"builder {path!r} cannot be imported: {exc}") from exc
    if not callable(fn):
        raise ValueError(f"builder {path!r} is not callable")
    return fn


def _check_spec(spec: Any) -> dict:
    if not isinstance(spec, dict) or "builder" not in spec:
        raise ValueError("spec must be a dict with a 'builder' ('package.module:function'), optional 'args', "
                         f"'kwargs' and 'transforms'; got {spec!r}")
    _resolve(spec["builder"])
    for t in spec.get("transforms", []):
        _resolve(t)
    return spec


def build_from_spec(spec: dict) -> nn.Module:
    _check_spec(spec)
    model = _resolve(spec["builder"])(*spec.get("args", []), **spec.get("kwargs", {}))
    for t in spec.get("transforms", []):
        out = _resolve(t)(model)
        model = out if isinstance(out, nn.Module) else model
    return attach_spec(model, spec)


def save_pruned(model: nn.Module, path: str | os.PathLike, spec: dict | None = None) -> Path:
    """Write ``model`` (pruned or not) so :func:`load_pruned` can rebuild it; atomic write."""
    spec = _check_spec(spec if spec is not None else getattr(model, "build_spec", None)
                       or _missing_spec(model))
    record = getattr(model, "_pruning_record", None) or {"history": [], "couplings": []}
    payload = {
        "format": FORMAT,
        "spec": spec,
        "record": record,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)
    return Path(path)


def _missing_spec(model: nn.Module) -> dict:
    raise ValueError(f"{type(model).__name__} carries no build spec: pass spec=make_spec('package.module:"
                     "function', ...) (or build it with build_from_spec / attach_spec)")


def load_pruned(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save_pruned` (``torch.load(weights_only=True)``)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pruned-model file ({FORMAT})")
    model = build_from_spec(payload["spec"])
    record = payload["record"]
    if record.get("history"):
        dtype = getattr(torch, record.get("input_dtype", "float32"))
        example = torch.zeros(record["input_shape"], dtype=dtype)
        named = dict(model.named_modules())
        couplings = [(named[a], named[b]) for a, b in record.get("couplings", [])]
        graph = build_graph(model, example, couplings=couplings)
        graph.load_pruning_history([list(h) for h in record["history"]])
    model.load_state_dict(payload["state_dict"])
    model._pruning_record = record
    return model.to(map_location)
