"""Global BN-scale channel pruning with physical removal (Network Slimming / CAP).

Threshold (Network Slimming, docs/methods.md): gather the importance of every prunable channel (one
score per channel of each Torch-Pruning group, i.e. per set of coupled channels), sort ascending,
take ``threshold = sorted[floor(ratio * total)]`` and prune the channels whose importance is
``<= threshold`` (the paper keeps ``> threshold``), i.e. the ``floor(ratio * total) + 1`` lowest;
ties at the threshold are broken by a stable sort so that count holds. ``ratio = 0`` prunes nothing
(the paper's rule would still remove the single lowest channel). Per-layer floor:
a group keeps at least ``min_channels`` channels and loses at most ``floor(max_layer_ratio * C)``;
when the floor bites, that group keeps its highest-scoring channels and the achieved global ratio
ends up below the asked one (reported as ``channel_ratio``); the threshold is not lowered to make
up for it, as in the paper.

Removal is Torch-Pruning's dependency graph: residual couplings, concatenations (pyramid pooling,
ASPP), SE/DIA attention and IEBN's extra tensors are cut consistently (:mod:`.graph`,
:mod:`.pruners`). Groups without any BN (e.g. SE's bottleneck) are not pruned: a BN scale is the
only criterion here. Layers producing the outputs (classifier, auxiliary classifiers) are kept
whole automatically.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from workbench.nn.norms import is_affine_norm, is_iebn, is_norm
from workbench.pruning.cost import count_flops, count_params, measure_latency, preferred_round_to
from workbench.pruning.graph import (
    PRUNABLE_LEAVES,
    as_args,
    build_graph,
    dry_run,
    flatten_outputs,
    module_names,
    output_heads,
    preserved_modes,
    resolve_layers,
)
from workbench.pruning.importance import EffectiveScaleImportance, iebn_mean_attention

METHODS = ("slimming", "cap")


@dataclass
class PruneReport:
    """What pruning did: sizes, costs and channels per layer, before and after."""

    method: str
    ratio: float
    threshold: float | None
    channels_total: int
    channels_pruned: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    flops_detail_before: dict[str, int] = field(default_factory=dict)
    flops_detail_after: dict[str, int] = field(default_factory=dict)
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    latency_device: str | None = None
    input_shape: list[int] | None = None
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)
    floored_groups: list[str] = field(default_factory=list)
    ignored_layers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    round_to: int | None = None

    @property
    def channel_ratio(self) -> float:
        """Fraction of prunable channels actually removed (below ``ratio`` when the floor bites)."""
        return self.channels_pruned / self.channels_total if self.channels_total else 0.0

    @property
    def params_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def flops_reduction(self) -> float:
        return 1.0 - self.flops_after / self.flops_before if self.flops_before else 0.0

    @property
    def flops_ratio(self) -> float:
        """``flops_before / flops_after`` (how many times fewer FLOPs)."""
        return self.flops_before / self.flops_after if self.flops_after else float("inf")

    @property
    def speedup(self) -> float | None:
        if self.latency_ms_before is None or not self.latency_ms_after:
            return None
        return self.latency_ms_before / self.latency_ms_after

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = {k: list(v) for k, v in self.layers.items()}
        d.update(channel_ratio=self.channel_ratio, params_reduction=self.params_reduction,
                 flops_reduction=self.flops_reduction, flops_ratio=self.flops_ratio, speedup=self.speedup)
        return d


def _check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"ratio={ratio!r} is not valid; allowed: a number in [0, 1)")
    return float(ratio)


def _validate(model: nn.Module, ratio: Any, example_inputs: Any, method: str, min_channels: Any,
              max_layer_ratio: Any, importance: Any, round_to: Any = None) -> float:
    ratio = _check_ratio(ratio)
    if round_to is not None and round_to != "auto" and (isinstance(round_to, bool) or not isinstance(round_to, int)
                                                        or round_to < 1):
        raise ValueError(f"round_to={round_to!r} is not valid; allowed: None, 'auto' or a positive integer")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not valid; allowed: {METHODS}")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels={min_channels!r} must be an integer >= 1")
    if isinstance(max_layer_ratio, bool) or not isinstance(max_layer_ratio, (int, float)) \
            or not 0 < max_layer_ratio <= 1:
        raise ValueError(f"max_layer_ratio={max_layer_ratio!r} is not valid; allowed: a number in (0, 1]")
    if importance is not None and not callable(importance):
        raise ValueError(f"importance={importance!r} must be a Torch-Pruning importance (callable on a group)")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not any(is_affine_norm(m) for m in model.modules()):
        raise ValueError(f"model {type(model).__name__} has no affine BatchNorm layer: BN-scale pruning "
                         "(slimming/cap) needs BN scales to rank channels")
    args = as_args(example_inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise ValueError("example_inputs must be a tensor (or a tuple of tensors) the model accepts, "
                         f"got {type(example_inputs).__name__}")
    try:
        out = dry_run(model, example_inputs)
    except Exception as exc:  # noqa: BLE001 - any failure here means the inputs do not fit the model
        shapes = [tuple(a.shape) for a in args]
        raise ValueError(f"example_inputs of shape {shapes[0] if len(shapes) == 1 else shapes} do not run "
                         f"through {type(model).__name__}: {type(exc).__name__}: {exc}") from exc
    if not flatten_outputs(out):
        raise ValueError(f"{type(model).__name__} returned no tensor for example_inputs")
    return ratio


def _by_module(model: nn.Module, values: dict | None, what: str) -> dict[nn.Module, torch.Tensor]:
    """Key a ``{name or module: tensor}`` dict by the modules of ``model``."""
    if not values:
        return {}
    named = dict(model.named_modules())
    out = {}
    for key, value in values.items():
        name = key if isinstance(key, str) else None
        if name is None:
            raise ValueError(f"{what}: keys must be layer names (strings)")
        if name not in named:
            raise ValueError(f"{what}: no layer named {name!r}")
        layer = named[name]
        if not is_affine_norm(layer) or torch.as_tensor(value).numel() != layer.num_features:
            raise ValueError(f"{what}[{name!r}] must be a vector of {getattr(layer, 'num_features', '?')} values "
                             "for a BatchNorm layer")
        out[layer] = torch.as_tensor(value).detach().float()
    return out


def _channels(model: nn.Module) -> dict[str, int]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
        elif is_norm(m):
            out[name] = m.num_features
    return out


def _names_for(model: nn.Module, layers: Iterable[nn.Module]) -> list[str]:
    names = module_names(model)
    return [names[m] for m in layers]


@dataclass
class PrunePlan:
    """Which channels :func:`apply_plan` cuts from ``model``, as :func:`plan_pruning` chose them.

    ``groups`` holds ``(root module, Torch-Pruning handler, channel indices)`` per group of coupled
    channels; ``graph`` is the dependency graph of ``model`` they refer to; ``names`` maps the
    modules to their qualified names.
    """

    model: nn.Module
    method: str
    ratio: float
    example_inputs: Any
    graph: Any
    groups: list[tuple[nn.Module, Callable, list[int]]]
    threshold: float | None
    channels_total: int
    floored: list[nn.Module]
    ignored: list[nn.Module]
    couplings: list[list[str]]
    round_to: int | None
    names: dict[nn.Module, str]

    @property
    def channels_pruned(self) -> int:
        return sum(len(idxs) for _, _, idxs in self.groups)


@dataclass
class PruneCost:
    """A model's size and cost at one moment: channels per layer, parameters, FLOPs, latency."""

    channels: dict[str, int]
    params: int
    flops: dict[str, int]
    latency_ms: float | None
    latency_device: str | None


def plan_pruning(model: nn.Module, ratio: float, example_inputs: Any, method: str = "slimming", *,
                 importance: Callable | None = None, inplace: bool = False, min_channels: int = 1,
                 max_layer_ratio: float = 0.9, ignored_layers: Sequence[nn.Module | str] | None = None,
                 guidance: dict[str, torch.Tensor] | None = None, attention: dict[str, torch.Tensor] | Any = None,
                 couplings: Sequence[tuple[nn.Module | str, nn.Module | str]] = (), group_reduction: str = "mean",
                 customized_pruners: dict | None = None, round_to: int | str | None = None) -> PrunePlan:
    """Validate, copy ``model`` (unless ``inplace``), rank its channels and choose those to cut.

    Arguments as for :func:`prune`; nothing is cut yet (see :func:`apply_plan`).
    """
    ratio = _validate(model, ratio, example_inputs, method, min_channels, max_layer_ratio, importance, round_to)
    if round_to == "auto":
        round_to = preferred_round_to(next(model.parameters()).device)
    # resolve every layer reference on the original, by name, before copying
    ignored_names = _names_for(model, resolve_layers(model, ignored_layers, "ignored_layers"))
    coupling_names = _coupling_names(model, couplings)
    guidance_by_name = _rekey(model, _by_module(model, guidance, "guidance")) if guidance is not None else None
    attention_by_name = _rekey(model, _by_module(model, attention, "attention")) if isinstance(attention, dict) \
        else None

    work = model if inplace else copy.deepcopy(model)
    named = dict(work.named_modules())
    with preserved_modes(work):
        attention_by_layer, guidance_by_layer = _scorer_inputs(
            work, method, example_inputs, attention if attention_by_name is None else attention_by_name,
            guidance_by_name)
        graph = build_graph(work, example_inputs, customized_pruners,
                            [(named[a], named[b]) for a, b in coupling_names])
        ignored = [named[n] for n in ignored_names]
        ignored += [h for h in output_heads(graph) if h not in ignored]
        scorer = importance or EffectiveScaleImportance(
            attention=attention_by_layer, guidance=guidance_by_layer if method == "cap" else None,
            group_reduction=group_reduction)
        groups, threshold, total, floored = _plan(graph, ignored, scorer, ratio, min_channels, max_layer_ratio,
                                                  round_to)
    return PrunePlan(model=work, method=method, ratio=ratio, example_inputs=example_inputs, graph=graph,
                     groups=groups, threshold=threshold, channels_total=total, floored=floored, ignored=ignored,
                     couplings=coupling_names, round_to=round_to, names=module_names(work))


def _coupling_names(model: nn.Module, couplings: Sequence[tuple[nn.Module | str, nn.Module | str]]) -> list[list[str]]:
    names = []
    for pair in couplings:
        if len(pair) != 2:
            raise ValueError(f"couplings entries must be pairs of layers, got {pair!r}")
        names.append(_names_for(model, resolve_layers(model, list(pair), "couplings")))
    return names


def _scorer_inputs(work: nn.Module, method: str, example_inputs: Any, attention: Any,
                   guidance_by_name: dict[str, torch.Tensor] | None) -> tuple[dict | None, dict | None]:
    """The IEBN mean gates and (for CAP) the CAGM guidance the default importance weighs scales by,
    keyed by the modules of ``work``: as given (by name), else computed on the data."""
    named = dict(work.named_modules())
    if isinstance(attention, dict):
        attention_by_layer = {named[n]: v for n, v in attention.items()}
    elif any(is_iebn(m) for m in work.modules()):
        data = example_inputs if attention is None else attention
        attention_by_layer = {named[n]: v for n, v in iebn_mean_attention(work, data).items()}
    else:
        attention_by_layer = None
    if guidance_by_name is not None:
        guidance_by_layer = {named[n]: v for n, v in guidance_by_name.items()}
    elif method == "cap":
        from workbench.pruning.cagm import compute_guidance

        guidance_by_layer = {named[n]: v for n, v in compute_guidance(work, example_inputs).items()}
    else:
        guidance_by_layer = None
    return attention_by_layer, guidance_by_layer


def apply_plan(plan: PrunePlan) -> nn.Module:
    """Cut the planned channels out of ``plan.model`` (physically), check it still runs and attach
    the record :func:`save_pruned` replays; returns the pruned model."""
    work, graph = plan.model, plan.graph
    with preserved_modes(work):
        for root, fn, idxs in plan.groups:
            group = graph.get_pruning_group(root, fn, idxs)
            if not graph.check_pruning_group(group):
                raise RuntimeError(f"pruning {plan.names.get(root, root)} would empty a layer; this is a bug")
            group.prune()
        history = [list(h) for h in graph.pruning_history()]
        _forward_check(work, plan.example_inputs, model_name=type(work).__name__)
    _record(work, history, plan.example_inputs, plan.couplings)
    return work


def measure_cost(model: nn.Module, example_inputs: Any, *, latency: bool = True, latency_runs: int = 10,
                 latency_inputs: Any = None) -> PruneCost:
    """Channels per layer, parameters, FLOPs on ``example_inputs`` and (with ``latency``) the median
    eval latency of ``latency_runs`` forwards on ``latency_inputs`` (default ``example_inputs``)."""
    lat_inputs = as_args(latency_inputs if latency_inputs is not None else example_inputs)
    with preserved_modes(model):
        return PruneCost(
            channels=_channels(model), params=count_params(model), flops=count_flops(model, example_inputs),
            latency_ms=measure_latency(model, lat_inputs, runs=latency_runs) if latency else None,
            latency_device=str(lat_inputs[0].device) if latency else None)


def prune(model: nn.Module, ratio: float, example_inputs: Any, method: str = "slimming", *,
          importance: Callable | None = None, inplace: bool = False, min_channels: int = 1,
          max_layer_ratio: float = 0.9, ignored_layers: Sequence[nn.Module | str] | None = None,
          guidance: dict[str, torch.Tensor] | None = None, attention: dict[str, torch.Tensor] | Any = None,
          couplings: Sequence[tuple[nn.Module | str, nn.Module | str]] = (), group_reduction: str = "mean",
          customized_pruners: dict | None = None, round_to: int | str | None = None, latency: bool = True,
          latency_runs: int = 10, latency_inputs: Any = None) -> tuple[nn.Module, PruneReport]:
    """Prune ``ratio`` of the BN-ranked channels of ``model`` globally and remove them physically:
    :func:`plan_pruning`, :func:`measure_cost` before, :func:`apply_plan`, :func:`measure_cost` after.

    Args:
        model: any Conv/BN network (ours, torchvision's segmentation and classification models...).
        ratio: fraction of prunable channels to remove, in ``[0, 1)``; 0 returns an unchanged copy.
        example_inputs: an input batch the model accepts (used for tracing, FLOPs and latency).
        method: ``"slimming"`` (importance ``|gamma|``, effective scale for IEBN) or ``"cap"``
            (the same, times the normalised CAGM guidance at guided sites; see ``guidance``).
        importance: a Torch-Pruning importance to use instead (callable on a group -> scores).
        inplace: prune ``model`` itself; by default a deep copy is pruned and ``model`` is untouched.
        min_channels, max_layer_ratio: per-group floor (see module docstring).
        ignored_layers: extra layers (modules or names) to keep whole; output heads are added.
        guidance: ``{bn_name: guiding vector (C,)}`` for ``method="cap"``, e.g.
            ``CAGSSparsity.guidance()``; if omitted, computed on ``example_inputs`` with CAGMs at the
            model's default sites (data that looks like training data gives a better guide).
        attention: for IEBN models, ``{iebn_name: mean gate (C,)}`` or data (a tensor or loader) to
            compute it with :func:`iebn_mean_attention`; by default ``example_inputs``.
        couplings: extra pairs of layers whose output channels must be pruned together.
        group_reduction: how the scores of coupled BNs combine (``mean``/``max``/``sum``).
        customized_pruners: extra Torch-Pruning pruners ``{layer type: pruner}`` (not replayed by
            :func:`load_pruned`, which uses the defaults).
        round_to: keep a multiple of this many channels per group (rounding the kept count up),
            which GPU/CPU convolution kernels run much faster on; ``"auto"``: the multiple the model's
            device prefers (:func:`~workbench.pruning.cost.preferred_round_to`: 16 on AVX-512 CPUs,
            else 8); ``None`` keeps the paper's count.
        latency: measure eval latency (median of ``latency_runs``) on the model's device, on
            ``latency_inputs`` (default ``example_inputs``).

    Returns:
        ``(pruned_model, PruneReport)``; the pruned model is in the same train/eval mode as given.
    """
    started = time.perf_counter()
    plan = plan_pruning(model, ratio, example_inputs, method, importance=importance, inplace=inplace,
                        min_channels=min_channels, max_layer_ratio=max_layer_ratio, ignored_layers=ignored_layers,
                        guidance=guidance, attention=attention, couplings=couplings,
                        group_reduction=group_reduction, customized_pruners=customized_pruners, round_to=round_to)
    cost = {"latency": latency, "latency_runs": latency_runs, "latency_inputs": latency_inputs}
    before = measure_cost(plan.model, example_inputs, **cost)
    work = apply_plan(plan)
    after = measure_cost(work, example_inputs, **cost)
    return work, _report(plan, before, after, time.perf_counter() - started)


def _report(plan: PrunePlan, before: PruneCost, after: PruneCost, seconds: float) -> PruneReport:
    names = plan.names
    return PruneReport(
        method=plan.method, ratio=plan.ratio, threshold=plan.threshold, channels_total=plan.channels_total,
        channels_pruned=plan.channels_pruned, params_before=before.params, params_after=after.params,
        flops_before=before.flops["total"], flops_after=after.flops["total"],
        flops_detail_before=before.flops, flops_detail_after=after.flops,
        latency_ms_before=before.latency_ms, latency_ms_after=after.latency_ms, latency_device=before.latency_device,
        input_shape=list(as_args(plan.example_inputs)[0].shape),
        layers={n: (c, after.channels.get(n, 0)) for n, c in before.channels.items()},
        floored_groups=[names.get(m, str(m)) for m in plan.floored],
        ignored_layers=[names.get(m, str(m)) for m in plan.ignored],
        seconds=seconds, round_to=plan.round_to)


def _rekey(model: nn.Module, by_layer: dict[nn.Module, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = module_names(model)
    return {names[m]: v for m, v in by_layer.items()}


def _plan(graph: Any, ignored: list[nn.Module], scorer: Callable, ratio: float, min_channels: int,
          max_layer_ratio: float, round_to: int | None = None) -> tuple[list, float | None, int, list[nn.Module]]:
    """Score every group, take the global threshold, apply the per-group floor."""
    records = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE_LEAVES):
        scores = scorer(group)
        if scores is None:
            continue
        scores = torch.as_tensor(scores).detach().float().cpu().flatten()
        root, fn = group[0].dep.target.module, group[0].dep.handler
        records.append((root, fn, scores))
    flat_scores, flat_group, flat_channel = [], [], []
    for g, (_, _, scores) in enumerate(records):
        keep = torch.nonzero(torch.isfinite(scores)).flatten()
        flat_scores.append(scores[keep])
        flat_group.append(torch.full((len(keep),), g, dtype=torch.long))
        flat_channel.append(keep)
    scores_all = torch.cat(flat_scores) if flat_scores else torch.zeros(0)
    total = int(scores_all.numel())
    if total == 0:
        raise ValueError("no prunable channel found: every BN-scored layer is an output head or ignored")
    if ratio == 0:
        return [], None, total, []
    # a stable sort gives the paper's set (all scores <= sorted[k]) when scores are distinct and
    # exactly k + 1 channels when ties straddle the threshold (e.g. an untrained net, all gamma = 1)
    order = torch.argsort(scores_all, stable=True)
    k = math.floor(ratio * total)
    threshold = float(scores_all[order[k]])
    chosen = order[: k + 1]
    group_of, channel_of = torch.cat(flat_group)[chosen], torch.cat(flat_channel)[chosen]
    plan, floored = [], []
    for g, (root, fn, scores) in enumerate(records):
        idxs = channel_of[group_of == g]  # ascending score order
        n = len(scores)
        limit = max(0, min(n - min_channels, math.floor(max_layer_ratio * n)))
        if len(idxs) > limit:
            floored.append(root)
            idxs = idxs[:limit]
        if round_to and len(idxs):
            kept = min(n, math.ceil((n - len(idxs)) / round_to) * round_to)
            idxs = idxs[: n - kept]
        if len(idxs):
            plan.append((root, fn, sorted(int(i) for i in idxs)))
    return plan, threshold, total, floored


def _forward_check(model: nn.Module, example_inputs: Any, model_name: str) -> None:
    try:
        dry_run(model, example_inputs)
    except Exception as exc:  # pragma: no cover - a failure here is a pruning bug worth surfacing
        raise RuntimeError(f"the pruned {model_name} no longer runs: {type(exc).__name__}: {exc}") from exc


def _record(work: nn.Module, history: list, example_inputs: Any,
            coupling_names: list[list[str]]) -> None:
    """Attach what :func:`save_pruned` needs to rebuild the pruned architecture."""
    # a deep copy carries the original's record along, so earlier prunings replay first
    previous = getattr(work, "_pruning_record", None)
    record = {
        "history": (list(previous["history"]) if previous else []) + history,
        "input_shape": list(as_args(example_inputs)[0].shape),
        "input_dtype": str(as_args(example_inputs)[0].dtype).replace("torch.", ""),
        "couplings": (list(previous["couplings"]) if previous else []) + [list(c) for c in coupling_names],
    }
    work._pruning_record = record
