"""Pruning to a FLOPs target: the prune ratio at which the pruned network costs a given fraction of
the dense network's FLOPs, so that two pruning methods are compared at equal cost, not at equal
channel ratio (a method that removes cheap channels reaches a ratio with more FLOPs left).

:func:`prune_to_flops` bisects over the global channel count :func:`~workbench.pruning.prune`
removes. With a stable ranking the set of removed channels grows with that count (the per-group
floor and ``round_to`` keep it growing), so the FLOPs fraction ``flops_after / flops_before``
(both from the report, counted by ``torch.utils.flop_counter``) never increases with it and
bisection finds the count whose fraction lies nearest the target. The result must land within
``tolerance`` (relative, 2% by default) of the target, else an error names the two nearest
fractions (one channel apart: a model too small for that tolerance).

Reachable targets: ``[floor, 1)``, where ``floor`` is the fraction left when every group is cut
to its per-layer limit (``min_channels``, ``max_layer_ratio``). The limit is a channel count per
group, independent of the scores, so :func:`flops_floor` of an untrained network is the floor of
the trained one: check targets with :func:`check_flops_target` before training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from workbench.nn.norms import is_iebn
from workbench.pruning.importance import iebn_mean_attention
from workbench.pruning.prune import METHODS, PruneReport, prune

FLOPS_TOLERANCE = 0.02
# the largest ratio prune accepts: every ranked channel is chosen, so only the per-group limit binds
_ALL_CHANNELS = math.nextafter(1.0, 0.0)
_SEARCH_ONLY = ("inplace", "latency", "latency_runs", "latency_inputs")


def _fraction(report: PruneReport) -> float:
    return report.flops_after / report.flops_before


def _check_target(target: Any) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) \
            or not 0 < target < 1:
        raise ValueError(f"target={target!r} is out of reach; allowed: a fraction of the dense network's FLOPs "
                         "in (0, 1), at least what the per-layer limit leaves (see flops_floor)")
    return float(target)


def _fixed_scores(model: nn.Module, example_inputs: Any, method: str, options: dict) -> dict:
    """Guidance (CAP) and IEBN gates computed once, as prune would on every call."""
    options = dict(options)
    if method == "cap" and options.get("guidance") is None and options.get("importance") is None:
        from workbench.pruning.cagm import compute_guidance

        options["guidance"] = compute_guidance(model, example_inputs)
    if options.get("attention") is None and any(is_iebn(m) for m in model.modules()):
        options["attention"] = iebn_mean_attention(model, example_inputs)
    return options


def flops_floor(model: nn.Module, example_inputs: Any, method: str = "slimming", **prune_options: Any) -> float:
    """The smallest FLOPs fraction :func:`prune` can reach on ``model`` (every group at its limit)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not valid; allowed: {METHODS}")
    options = {k: v for k, v in prune_options.items() if k not in _SEARCH_ONLY}
    _, report = prune(model, _ALL_CHANNELS, example_inputs, method, latency=False, **options)
    return _fraction(report)


def check_flops_target(model: nn.Module, target: Any, example_inputs: Any, method: str = "slimming",
                       **prune_options: Any) -> float:
    """Raise ``ValueError`` naming ``target`` and the reachable range unless ``target`` is in
    ``[floor, 1)``; returns the floor. Cheap (one pruning pass, no training): call it before training."""
    target = _check_target(target)
    floor = flops_floor(model, example_inputs, method, **prune_options)
    if target < floor:
        raise ValueError(f"target={target!r} is out of reach for {type(model).__name__}; allowed: a FLOPs fraction "
                         f"in [{floor:.4f}, 1) (below {floor:.4f} the per-layer limit min_channels="
                         f"{prune_options.get('min_channels', 1)}, max_layer_ratio="
                         f"{prune_options.get('max_layer_ratio', 0.9)} binds)")
    return floor


def _nearest_count(fraction_at: Callable[[int], float], total: int, target: float) -> int:
    """The channel count whose fraction is nearest ``target`` (``-1``: prune nothing, fraction 1)."""
    low, high = 0, total - 1  # fraction_at(high) <= target (the floor check)
    while low < high:
        mid = (low + high) // 2
        if fraction_at(mid) <= target:
            high = mid
        else:
            low = mid + 1
    above = fraction_at(low - 1) if low > 0 else 1.0
    return low if abs(fraction_at(low) - target) <= abs(above - target) else low - 1


def prune_to_flops(model: nn.Module, target: float, example_inputs: Any, method: str = "slimming", *,
                   tolerance: float = FLOPS_TOLERANCE, **prune_options: Any) -> tuple[nn.Module, PruneReport]:
    """Prune ``model`` (a copy) so that its FLOPs are ``target`` times the dense network's, within
    ``tolerance`` (relative); see the module docstring. ``prune_options`` go to :func:`prune`
    (``latency`` and its options only to the final call). Returns ``prune``'s ``(model, report)``:
    ``report.ratio`` is the ratio found, ``report.flops_after / report.flops_before`` the fraction."""
    target = _check_target(target)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not valid; allowed: {METHODS}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance={tolerance!r} is not valid; allowed: a relative tolerance in (0, 1)")
    if prune_options.get("inplace"):
        raise ValueError("inplace=True is not valid here; allowed: False (the search prunes copies)")
    options = _fixed_scores(model, example_inputs, method, prune_options)
    search = {k: v for k, v in options.items() if k not in _SEARCH_ONLY}
    check_flops_target(model, target, example_inputs, method, **search)
    _, dense = prune(model, 0.0, example_inputs, method, latency=False, **search)
    total, seen = dense.channels_total, {}

    def fraction_at(count: int) -> float:
        if count not in seen:  # ratio in the middle of the count's interval: floor(ratio * total) == count
            seen[count] = _fraction(prune(model, (count + 0.5) / total, example_inputs, method, latency=False,
                                          **search)[1])
        return seen[count]

    count = _nearest_count(fraction_at, total, target)
    ratio = 0.0 if count < 0 else (count + 0.5) / total
    final = {k: v for k, v in options.items() if k != "inplace"}
    pruned, report = prune(model, ratio, example_inputs, method, **final)
    achieved = _fraction(report)
    if abs(achieved - target) > tolerance * target:
        neighbours = sorted({achieved, fraction_at(count + 1) if count + 1 < total else achieved})
        raise ValueError(f"target={target!r} cannot be met within {tolerance:.0%} on {type(model).__name__}: the "
                         f"nearest FLOPs fractions are {', '.join(f'{f:.4f}' for f in neighbours)}; allowed: a "
                         "larger tolerance or a wider model")
    return pruned, report
