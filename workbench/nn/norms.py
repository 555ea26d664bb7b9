"""The norm toolkit: one factory for the normalisation layers the models use, one finder for the
normalisation layers of any model, and the predicates both rest on.

- :func:`create_norm` / :func:`get_norm_layer`: ``kind`` in :data:`NORM_KINDS` -> a layer / its
  constructor (``"bn"``: ``nn.BatchNorm2d``, ``"iebn"``: :class:`~workbench.nn.IEBN2d`, ``"none"``:
  ``nn.Identity``, which takes and ignores the channel count so it fits every ``norm_layer`` slot).
- :func:`norm_layers`: the normalisation layers of a model by qualified name, optionally filtered
  by names or ``fnmatch`` patterns and by a predicate (:func:`is_norm`, :func:`is_affine_norm`,
  :func:`is_iebn`).

A "normalisation layer" is any ``torch.nn.modules.batchnorm._BatchNorm``: ``nn.BatchNorm1d/2d/3d``,
``nn.SyncBatchNorm``, :class:`~workbench.nn.IEBN2d` and the synced variants; IEBN is recognised by
its gate parameters, so a layer of another class that carries them is treated alike.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from workbench.nn.iebn import IEBN2d

NormLayer = Callable[..., nn.Module]

NORM_KINDS = ("bn", "iebn", "none")
_CONSTRUCTORS: dict[str, NormLayer] = {"bn": nn.BatchNorm2d, "iebn": IEBN2d, "none": nn.Identity}


def get_norm_layer(kind: str, allowed: Iterable[str] = NORM_KINDS) -> NormLayer:
    """The constructor ``norm_layer(num_features, **kwargs)`` of ``kind``, one of ``allowed``
    (a subset of :data:`NORM_KINDS`, for callers that accept fewer kinds)."""
    allowed = tuple(allowed)
    if not isinstance(kind, str) or kind not in allowed or kind not in _CONSTRUCTORS:
        raise ValueError(f"norm={kind!r} is not valid; allowed: {allowed}")
    return _CONSTRUCTORS[kind]


def create_norm(kind: str, num_features: int, **kwargs: Any) -> nn.Module:
    """A normalisation layer of ``kind`` over ``num_features`` channels (``kwargs``: the layer's own,
    such as ``eps`` or ``momentum``; ignored by ``"none"``)."""
    return get_norm_layer(kind)(num_features, **kwargs)


def is_identity_norm(norm_layer: NormLayer | None) -> bool:
    """Whether ``norm_layer`` stands for no normalisation (a convolution feeding it needs a bias)."""
    return norm_layer is None or norm_layer is nn.Identity


def is_norm(module: nn.Module) -> bool:
    """Any batch-normalisation layer (a ``_BatchNorm``: BN, SyncBN, IEBN and their synced variants)."""
    return isinstance(module, _BatchNorm)


def is_affine_norm(module: nn.Module) -> bool:
    """A normalisation layer with a learnt scale ``weight`` and shift ``bias``."""
    return is_norm(module) and bool(module.affine)


def is_iebn(module: nn.Module) -> bool:
    """An affine normalisation layer carrying IEBN's gate (``attn_weight``, ``attn_bias``)."""
    return is_affine_norm(module) and hasattr(module, "attn_weight") and hasattr(module, "attn_bias")


def norm_layers(model: nn.Module, patterns: str | Iterable[str] | None = None, *,
                predicate: Callable[[nn.Module], bool] = is_norm, required: bool = False) -> dict[str, nn.Module]:
    """The layers of ``model`` that satisfy ``predicate`` (default :func:`is_norm`), by qualified name
    in definition order; with ``patterns`` (a name or ``fnmatch`` pattern, or a list of them) only
    those matched.

    Raises ``ValueError`` when a pattern matches no such layer, and (with ``required=True`` or
    ``patterns``) when the model has none at all.
    """
    found = {name: m for name, m in model.named_modules() if predicate(m)}
    if not found and (required or patterns is not None):
        raise ValueError(f"model={type(model).__name__} has no batch-normalisation layer; allowed: a model with "
                         "nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm or IEBN2d layers")
    if patterns is None:
        return found
    return {name: found[name] for name in _matching(list(found), patterns)}


def _matching(names: list[str], patterns: str | Iterable[str]) -> list[str]:
    """``names`` matched by any of ``patterns``, in the order of ``names``."""
    listed = [patterns] if isinstance(patterns, str) else list(patterns) if isinstance(patterns, Iterable) else []
    if not listed or not all(isinstance(p, str) for p in listed):
        raise ValueError(f"layers={patterns!r} is not valid; allowed: None, a name or fnmatch pattern, or a "
                         "non-empty list of them")
    chosen: set[str] = set()
    for pattern in listed:
        hits = [name for name in names if name == pattern or fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            shown = ", ".join(repr(n) for n in names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            raise ValueError(f"layers pattern {pattern!r} matches no normalisation layer; allowed: names or "
                             f"fnmatch patterns of {shown}")
        chosen.update(hits)
    return [name for name in names if name in chosen]
