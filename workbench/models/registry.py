"""Model registry: builders register under a name; ``build_model`` validates and builds."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

Builder = Callable[..., nn.Module]

_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(num_classes, **options)`` under ``name``.

    Registering the same builder twice is a no-op; a different builder under a taken name is an error.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} is not valid; allowed: a non-empty string")

    def decorator(builder: Builder) -> Builder:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not builder:
            raise ValueError(f"model name {name!r} is already registered to {existing.__module__}."
                             f"{existing.__qualname__}")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _accepted_options(builder: Builder) -> tuple[list[str], bool]:
    params = inspect.signature(builder).parameters.values()
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "num_classes"]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
    return names, takes_any


def build_model(name: str, num_classes: int = 10, **options) -> nn.Module:
    """Build the registered model ``name`` with ``num_classes`` outputs and builder ``options``.

    Unknown names and unknown option names raise ``ValueError`` listing the allowed ones; builders
    validate option values themselves (also with ``ValueError``) before building anything.
    """
    if name not in _REGISTRY:
        raise ValueError(f"model name={name!r} is not valid; allowed: {', '.join(list_models())}")
    builder = _REGISTRY[name]
    accepted, takes_any = _accepted_options(builder)
    unknown = sorted(set(options) - set(accepted))
    if unknown and not takes_any:
        raise ValueError(f"option(s) {unknown} are not valid for model {name!r}; allowed: {', '.join(accepted)}")
    model = builder(num_classes=num_classes, **options)
    if _plain_data(options):
        # How to build this model again, as plain data (the format of workbench.pruning's build
        # specs): a pruned copy can then be saved with save_pruned(model, path) and no spec argument.
        model.build_spec = {"builder": "workbench.models:build_model", "args": [name],
                            "kwargs": {"num_classes": num_classes, **options}, "transforms": []}
    return model


def _plain_data(value) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
    return False
