"""Attention recorders: the ``(N, C)`` channel attention of every IEBN, SE and DIA site, per sample.

Every attention-bearing layer routes its attention vector through an
:class:`~workbench.nn.probe.AttentionProbe` (an identity). A recorder hooks those probes, so it sees
exactly the attention the forward used and never changes it: the hook returns ``None`` and stores a
detached copy.

Captum-shaped use: configure once on a model, then use as a context manager (hooks live only inside
the ``with``, and are removed on exceptions too) or call :meth:`AttentionRecorder.attribute`::

    rec = AttentionRecorder(model, kinds="iebn", layers=["layer1.0.bn1"])
    with rec:
        model(x)
    rec.attention["layer1.0.bn1"]          # (N, C), on x's device

    stats = collect_attention(model, loader, device, num_classes=10)   # per-layer statistics

Recorded tensors stay on the model's device; only reductions (:meth:`AttentionStats` fields) move
to the CPU, so a GPU run does not synchronise on every batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from workbench.nn.probe import ATTENTION_KINDS, AttentionProbe, attention_probes
from workbench.probes.base import Probe
from workbench.probes.hooks import HookRecorder

DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _site_names(probes: dict[str, AttentionProbe]) -> dict[str, str]:
    """Short site name -> qualified probe name. A probe is named after the module that owns it
    (``layer1.0.bn1`` for ``layer1.0.bn1.attention_probe``) unless two probes share an owner."""
    owners = {name: name.rsplit(".", 1)[0] if "." in name else name for name in probes}
    counts: dict[str, int] = {}
    for owner in owners.values():
        counts[owner] = counts.get(owner, 0) + 1
    return {(owner if counts[owner] == 1 else name): name for name, owner in owners.items()}


def attention_sites(model: nn.Module, kinds: str | Sequence[str] | None = None) -> dict[str, str]:
    """Site name -> attention kind (``"iebn"``, ``"se"``, ``"dia"``) of every attention site in
    ``model``, in forward-definition order."""
    kinds = _check_kinds(kinds)
    probes = attention_probes(model, kinds)
    return {short: probes[full].kind for short, full in _site_names(probes).items()}


def _check_kinds(kinds: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if kinds is None:
        return None
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in ATTENTION_KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds={kinds!r} is not valid; allowed: None or a subset of {ATTENTION_KINDS}")
    return kinds


def resolve_sites(model: nn.Module, kinds: str | Sequence[str] | None = None,
                  layers: str | Sequence[str] | None = None) -> dict[str, AttentionProbe]:
    """Site name -> probe for the requested kinds/layers, with a clear error for a model without
    attention sites and for a layer name that does not exist (listing the ones that do).

    A layer may be given by its site name (``layer1.0.bn1``) or the probe's qualified name."""
    kinds = _check_kinds(kinds)
    probes = attention_probes(model, kinds)
    if not probes:
        which = "attention sites" if kinds is None else f"attention sites of kind {'/'.join(kinds)}"
        present = sorted({p.kind for p in attention_probes(model).values()})
        hint = f" (it has: {', '.join(present)})" if present else (
            "; build it with norm='iebn' or attention='se'/'dia'")
        raise ValueError(f"model {type(model).__name__} has no {which}{hint}")
    names = _site_names(probes)
    if layers is None:
        return {short: probes[full] for short, full in names.items()}
    layers = [layers] if isinstance(layers, str) else list(layers)
    by_full = {full: short for short, full in names.items()}
    chosen: dict[str, AttentionProbe] = {}
    missing = []
    for layer in layers:
        short = layer if layer in names else by_full.get(layer)
        if short is None:
            missing.append(layer)
        else:
            chosen[short] = probes[names[short]]
    if missing or not layers:
        raise ValueError(f"layers={missing or layers!r} not found among the attention sites; available: "
                         f"{', '.join(names)}")
    return chosen


class AttentionRecorder(HookRecorder):
    """Records the per-sample attention ``(N, C)`` of the chosen sites while active.

    ``kinds``: ``None`` (all) or any of ``"iebn"``, ``"se"``, ``"dia"``; ``layers``: ``None`` (all
    sites of those kinds) or site names. A site whose probe runs several times in one forward (a
    module shared by several blocks) is recorded per call as ``name[i]``. Recordings accumulate
    across forwards until :meth:`clear`: ``attention[name]`` concatenates them along the batch.
    """

    def __init__(self, model: nn.Module, kinds: str | Sequence[str] | None = None,
                 layers: str | Sequence[str] | None = None) -> None:
        super().__init__(model)
        self.probes = resolve_sites(model, kinds, layers)
        self.kinds = {name: probe.kind for name, probe in self.probes.items()}
        self._batches: dict[str, list[Tensor]] = {}
        self._shared: set[str] = set()

    def _register(self) -> None:
        for name, probe in self.probes.items():
            self._keep(probe.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(_module: nn.Module, _args: Any, output: Tensor) -> None:
            call = self._next_call(name)
            if call == 1 and name not in self._shared:  # a shared probe: key every call by its index
                self._shared.add(name)
                self._batches[f"{name}[0]"] = self._batches.pop(name, [])
            key = f"{name}[{call}]" if name in self._shared else name
            self._batches.setdefault(key, []).append(output.detach().clone())

        return hook

    # -- results --------------------------------------------------------------------------
    def clear(self) -> None:
        self._batches = {}

    @property
    def attention(self) -> dict[str, Tensor]:
        """Site name -> ``(N_total, C)`` attention recorded so far (on the model's device)."""
        return {name: torch.cat(chunks) if len(chunks) > 1 else chunks[0]
                for name, chunks in self._batches.items() if chunks}

    @torch.no_grad()
    def attribute(self, inputs: Tensor, **forward_kwargs: Any) -> dict[str, Tensor]:
        """One forward of ``inputs`` (model left in its current mode) and its attention per site."""
        self.clear()
        with self:
            self.model(inputs, **forward_kwargs)
        out = self.attention
        self.clear()
        return out


# ----------------------------------------------------------------------------------------------
# Statistics over a loader


@dataclass
class AttentionStats:
    """Per-layer attention statistics over a data set, on the CPU.

    ``mean``/``std``: ``(C,)`` per channel over all samples; ``quantiles``: ``(Q, C)`` at
    ``quantile_levels`` over the retained samples; ``class_mean``: ``(K, C)`` (NaN rows for classes
    without samples); ``samples``: the first ``len(sample_targets)`` per-sample vectors ``(S, C)``.
    """

    layers: list[str]
    kinds: dict[str, str]
    count: int
    mean: dict[str, Tensor]
    std: dict[str, Tensor]
    quantile_levels: tuple[float, ...]
    quantiles: dict[str, Tensor]
    class_mean: dict[str, Tensor] = field(default_factory=dict)
    class_count: Tensor | None = None
    samples: dict[str, Tensor] = field(default_factory=dict)
    sample_targets: Tensor | None = None

    def spread(self) -> dict[str, float]:
        """Per layer: the mean over channels of the across-sample std of the attention."""
        return {name: float(self.std[name].mean()) for name in self.layers}

    def to_dict(self) -> dict:
        """Plain lists and numbers (JSON-safe) for logs and offline plotting."""
        def plain(d: dict[str, Tensor]) -> dict[str, list]:
            return {k: v.tolist() for k, v in d.items()}

        return {
            "layers": list(self.layers), "kinds": dict(self.kinds), "count": self.count,
            "mean": plain(self.mean), "std": plain(self.std), "quantile_levels": list(self.quantile_levels),
            "quantiles": plain(self.quantiles), "class_mean": plain(self.class_mean),
            "class_count": None if self.class_count is None else self.class_count.tolist(),
            "samples": plain(self.samples),
            "sample_targets": None if self.sample_targets is None else self.sample_targets.tolist(),
        }


class AttentionAccumulator:
    """Streams recorded attention into per-channel statistics without keeping every sample.

    Mean and variance combine batch moments (Chan et al.'s parallel update, stable in float32);
    class means are per-class sums; the first ``keep`` samples are retained for quantiles,
    distributions and per-sample views. Everything stays on the device until :meth:`result`.
    """

    def __init__(self, num_classes: int | None = None, keep: int = 1024,
                 quantile_levels: Sequence[float] = DEFAULT_QUANTILES) -> None:
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes={num_classes!r} is not valid; allowed: None or a positive int")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r} is not valid; allowed: a positive int")
        levels = tuple(float(q) for q in quantile_levels)
        if not levels or any(not 0.0 <= q <= 1.0 for q in levels):
            raise ValueError(f"quantile_levels={quantile_levels!r} is not valid; allowed: values in [0, 1]")
        self.num_classes, self.keep, self.quantile_levels = num_classes, keep, levels
        self.count = 0
        self._mean: dict[str, Tensor] = {}
        self._m2: dict[str, Tensor] = {}
        self._class_sum: dict[str, Tensor] = {}
        self._class_count: Tensor | None = None
        self._kept: dict[str, list[Tensor]] = {}
        self._kept_targets: list[Tensor] = []
        self._kept_n = 0

    @torch.no_grad()
    def update(self, attention: dict[str, Tensor], targets: Tensor | None = None) -> None:
        if not attention:
            raise ValueError("attention is empty: nothing was recorded (did the forward run inside the recorder?)")
        n = next(iter(attention.values())).shape[0]
        if any(a.shape[0] != n or a.dim() != 2 for a in attention.values()):
            raise ValueError("every attention tensor must be (N, C) with the same N")
        if self.num_classes is not None and targets is None:
            raise ValueError("targets is None but num_classes was given: class statistics need targets")
        take = min(n, self.keep - self._kept_n)
        total = self.count + n
        for name, a in attention.items():
            a = a.float()
            b_mean = a.mean(0)
            b_m2 = (a - b_mean).square().sum(0)
            if name not in self._mean:
                if self.count:
                    raise ValueError(f"site {name!r} appeared after the first batch")
                self._mean[name], self._m2[name] = b_mean, b_m2
            else:
                delta = b_mean - self._mean[name]
                self._mean[name] = self._mean[name] + delta * (n / total)
                self._m2[name] = self._m2[name] + b_m2 + delta.square() * (self.count * n / total)
            if self.num_classes is not None:
                sums = self._class_sum.setdefault(name, a.new_zeros(self.num_classes, a.shape[1]))
                sums.index_add_(0, targets.to(a.device, torch.long), a)
            if take > 0:
                self._kept.setdefault(name, []).append(a[:take])
        if self.num_classes is not None:
            t = targets.to(next(iter(attention.values())).device, torch.long)
            counts = torch.bincount(t, minlength=self.num_classes)
            self._class_count = counts if self._class_count is None else self._class_count + counts
        if take > 0:
            if targets is not None:
                self._kept_targets.append(targets[:take].detach())
            self._kept_n += take
        self.count = total

    def result(self, kinds: dict[str, str] | None = None) -> AttentionStats:
        if not self.count:
            raise ValueError("no samples were accumulated")
        layers = list(self._mean)
        kept = {name: torch.cat(chunks) for name, chunks in self._kept.items()}
        q = torch.tensor(self.quantile_levels)
        quantiles = {name: torch.quantile(v, q.to(v.device), dim=0).cpu() for name, v in kept.items()}
        denom = max(self.count - 1, 1)
        class_mean, class_count = {}, None
        if self.num_classes is not None:
            class_count = self._class_count.cpu()
            safe = class_count.clamp_min(1).unsqueeze(1).float()
            empty = (class_count == 0).unsqueeze(1)
            class_mean = {name: torch.where(empty, torch.nan, s.cpu() / safe) for name, s in self._class_sum.items()}
        return AttentionStats(
            layers=layers,
            kinds={name: (kinds or {}).get(name.split("[")[0], "") for name in layers},
            count=self.count,
            mean={name: m.cpu() for name, m in self._mean.items()},
            std={name: (m2 / denom).sqrt().cpu() for name, m2 in self._m2.items()},
            quantile_levels=self.quantile_levels,
            quantiles=quantiles,
            class_mean=class_mean,
            class_count=class_count,
            samples={name: v.cpu() for name, v in kept.items()},
            sample_targets=torch.cat(self._kept_targets).cpu() if self._kept_targets else None,
        )


@torch.no_grad()
def collect_attention(model: nn.Module, loader: Iterable, device: str | torch.device | None = None,
                      kinds: str | Sequence[str] | None = None, layers: str | Sequence[str] | None = None,
                      num_classes: int | None = None, max_samples: int | None = None, keep: int = 1024,
                      quantile_levels: Sequence[float] = DEFAULT_QUANTILES, train_mode: bool = False) -> AttentionStats:
    """Run ``model`` over ``loader`` (eval mode unless ``train_mode``; the mode is restored) and
    return per-layer attention statistics. ``max_samples`` stops after that many samples."""
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples={max_samples!r} is not valid; allowed: None or a positive int")
    recorder = AttentionRecorder(model, kinds, layers)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    acc = AttentionAccumulator(num_classes=num_classes, keep=keep, quantile_levels=quantile_levels)
    was_training = model.training
    model.train(train_mode)
    seen = 0
    try:
        for batch in loader:
            inputs, targets = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            if max_samples is not None:
                inputs = inputs[: max_samples - seen]
                targets = None if targets is None else targets[: max_samples - seen]
            inputs = inputs.to(device, non_blocking=True)
            targets = None if targets is None else targets.to(device, non_blocking=True)
            acc.update(recorder.attribute(inputs), targets)
            seen += inputs.shape[0]
            if max_samples is not None and seen >= max_samples:
                break
    finally:
        model.train(was_training)
    return acc.result(recorder.kinds)


# ----------------------------------------------------------------------------------------------
# During training


class AttentionMonitor(Probe):
    """Training probe: every ``every`` optimiser steps, the attention of that step's training
    forward, reduced to per-layer, per-channel mean and std over the batch (a record
    ``{"step", "epoch", "layers": {site: {"mean": [...], "std": [...]}}}``); the JSON log is written
    to ``path`` after every epoch (see :class:`workbench.probes.base.Probe`).

    Nothing extra runs: the hooks see the forward the loop does anyway and are attached only
    from ``on_step_start`` of a due step to its ``on_step_end``. Use the monitor as a context
    manager around ``fit`` so they are removed when training raises mid-step, too::

        with AttentionMonitor(model, every=10, path="attention.json") as monitor:
            fit(model, loader, callbacks=[monitor])
    """

    name = "attention"
    hook = "on_step_end"

    def __init__(self, model: nn.Module, every: int = 10, path: str | None = None,
                 kinds: str | Sequence[str] | None = None, layers: str | Sequence[str] | None = None) -> None:
        super().__init__(every=every, path=path)
        self.recorder = AttentionRecorder(model, kinds, layers)

    def config(self) -> dict:
        return {**super().config(), "kinds": dict(self.recorder.kinds)}

    def __enter__(self) -> AttentionMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.recorder.remove()

    def on_step_start(self, state: Any) -> None:
        self.recorder.clear()
        if self.due(int(state.step)) and not self.recorder.active:
            self.recorder.__enter__()

    @torch.no_grad()
    def measure(self, state: Any) -> dict | None:
        if not self.recorder.active:
            return None
        self.recorder.remove()
        layers = {}
        for name, a in self.recorder.attention.items():
            std, mean = torch.std_mean(a.float(), dim=0, correction=0)
            layers[name] = {"mean": mean.cpu().tolist(), "std": std.cpu().tolist()}
        self.recorder.clear()
        return {"layers": layers}

    def on_fit_end(self, state: Any) -> None:
        self.recorder.remove()
        super().on_fit_end(state)
