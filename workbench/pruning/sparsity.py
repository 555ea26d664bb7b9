"""Sparsity training on BN scales as training callbacks (``on_after_backward`` / ``on_step_end``).

- :class:`BNScaleSparsity`: Network Slimming, ``gamma.grad += lam_t * sign(gamma)`` on every BN
  (docs/methods.md, *Network Slimming*), applied by Torch-Pruning's ``BNScalePruner.regularize``
  (built once, on the first batch; ``group_lasso=True`` switches to its group-lasso variant).
- :class:`CAGSSparsity`: CAP's context-aware guided sparsification (docs/methods.md, *CAP: CAGM and CAGS*):
  ``gamma.grad += lam_t * w * sign(gamma)`` with ``w = 2 (1 - a)`` from the CAGM guiding vector ``a``
  at the CAGM sites and ``w = 1`` (plain L1, ``other_bns="l1"``) or ``w = 0`` (``"none"``) at the
  other BNs: the same regulariser, weighted per channel.
- :func:`bn_scales` / :func:`sparsity_fraction`: ``|gamma|`` of every BN and the share below a
  threshold (recorded over training by :class:`workbench.probes.BNScaleProbe`).

Two ways to apply the penalty (``mode``):

- ``"subgradient"`` (default, the papers'): added to ``gamma.grad`` in ``on_after_backward``, before
  the optimiser step. With SGD this is Network Slimming exactly.
- ``"proximal"``: after the optimiser step, soft-threshold ``gamma <- sign(gamma) max(|gamma| - t, 0)``
  with ``t = lr * lam_t * w`` (ISTA, the proximal form of the same L1 objective; exact zeros). Under
  Adam/AdamW (the optimiser keeps ``exp_avg_sq``) the step is taken in Adam's metric,
  ``t = lr * lam_t * w / (sqrt(v_hat) + eps)``: Adam normalises a subgradient added to the gradient,
  which shrinks every scale alike instead of selecting channels, whereas the preconditioned proximal
  step zeroes exactly the scales whose loss gradient stays below ``lam`` in magnitude, as L1 should.

Lambda schedule: ``lam_t = lam * min(1, (step + 1) / warmup_steps) * schedule(epoch, step)``;
``warmup_steps=0`` and ``schedule=None`` give a constant lambda, as in Network Slimming. Defaults
per architecture (Network Slimming's; CAP's own values are not published): 1e-4 for VGG-style nets (SegNet),
1e-5 for ResNet-style nets (:data:`DEFAULT_LAMBDA`), for SGD with the subgradient. In proximal mode
under AdamW lambda compares with gradient magnitudes instead: 2e-3 gave PSPNet-18 (width 0.25, 8
epochs on digit-scenes) 65% of its scales below 1e-2 at the plain run's mIoU, 1e-2 emptied 91% and
cost the mIoU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from workbench.callbacks import Callback
from workbench.nn.norms import is_affine_norm, norm_layers
from workbench.pruning.cagm import AFFINITIES, REDUCTIONS, CAGMSet, default_sites
from workbench.pruning.graph import _trace_forward, flatten_outputs, opaque_cells, preserved_modes
from workbench.pruning.importance import EffectiveScaleImportance
from workbench.pruning.pruners import default_customized_pruners

Schedule = Callable[[int, int], float]

DEFAULT_LAMBDA = {"segnet": 1e-4, "vgg": 1e-4, "pspnet": 1e-5, "icnet": 1e-5, "resnet": 1e-5}


def default_lambda(model_name: str) -> float:
    """Network Slimming's lambda for the architecture family of ``model_name`` (1e-5 if unknown)."""
    for prefix, lam in DEFAULT_LAMBDA.items():
        if model_name.startswith(prefix):
            return lam
    return 1e-5


TrainState = Any


def _check_lambda(lam: Any) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
        raise ValueError(f"lam={lam!r} must be a non-negative number")
    return float(lam)


MODES = ("subgradient", "proximal")


def _param_lrs(optimizer: Any) -> dict[int, Any]:
    """Per parameter: the proximal step size ``lr``, divided by Adam's ``sqrt(v_hat) + eps`` where
    the optimiser keeps a second-moment estimate for it."""
    out: dict[int, Any] = {}
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            v = state.get("exp_avg_sq")
            if v is not None and "betas" in group:
                step = float(state.get("step", 1))
                v_hat = v / (1.0 - group["betas"][1] ** max(step, 1.0))
                out[id(p)] = lr / (v_hat.sqrt() + group.get("eps", 1e-8))
            else:
                out[id(p)] = lr
    return out


@torch.no_grad()
def soft_threshold_(weight: torch.Tensor, amount: torch.Tensor | float) -> None:
    """``weight <- sign(weight) * max(|weight| - amount, 0)`` in place."""
    weight.copy_(torch.sign(weight) * torch.clamp(weight.abs() - amount, min=0.0))


class _ScheduledLambda(Callback):
    def __init__(self, lam: float, schedule: Schedule | None, warmup_steps: int,
                 mode: str = "subgradient") -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not valid; allowed: {MODES}")
        self.mode = mode
        self.lam = _check_lambda(lam)
        if schedule is not None and not callable(schedule):
            raise ValueError(f"schedule={schedule!r} must be None or a callable (epoch, step) -> factor")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps!r} must be a non-negative integer")
        self.schedule = schedule
        self.warmup_steps = warmup_steps

    def current_lambda(self, epoch: int, step: int) -> float:
        lam = self.lam
        if self.warmup_steps:
            lam *= min(1.0, (step + 1) / self.warmup_steps)
        if self.schedule is not None:
            lam *= float(self.schedule(epoch, step))
        return lam


class BNScaleSparsity(_ScheduledLambda):
    """Network Slimming's L1 subgradient on BN scales, via Torch-Pruning's ``BNScalePruner``.

    ``layers`` restricts the penalty to the named BN layers (default: all). The pruner (and its
    dependency graph) is built on the first training batch, with the model's modes preserved and no
    running statistic touched.
    """

    def __init__(self, lam: float = 1e-4, schedule: Schedule | None = None, warmup_steps: int = 0,
                 layers: Sequence[str] | None = None, group_lasso: bool = False, mode: str = "subgradient") -> None:
        super().__init__(lam, schedule, warmup_steps, mode)
        if group_lasso and mode == "proximal":
            raise ValueError("group_lasso=True works with mode='subgradient' only")
        self.layers = None if layers is None else list(layers)
        self.group_lasso = bool(group_lasso)
        self.pruner: tp.pruner.BNScalePruner | None = None
        self._model: nn.Module | None = None

    def _excluded(self, model: nn.Module) -> list[nn.Module]:
        named = dict(model.named_modules())
        if self.layers is None:
            return []
        unknown = [n for n in self.layers if n not in named or not is_affine_norm(named[n])]
        if unknown:
            raise ValueError(f"layers {unknown} are not affine BatchNorm layers of {type(model).__name__}")
        keep = {named[n] for n in self.layers}
        return [m for m in model.modules() if is_affine_norm(m) and m not in keep]

    def build(self, model: nn.Module, example_inputs: Any) -> tp.pruner.BNScalePruner:
        """Build the Torch-Pruning regulariser for ``model`` (done automatically on the first batch)."""
        if not any(is_affine_norm(m) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} has no affine BatchNorm layer to sparsify")
        with preserved_modes(model), torch.enable_grad(), opaque_cells(model):
            self.pruner = tp.pruner.BNScalePruner(
                model, example_inputs, importance=EffectiveScaleImportance(), reg=self.lam,
                group_lasso=self.group_lasso, global_pruning=True, ignored_layers=self._excluded(model),
                customized_pruners=default_customized_pruners(model), forward_fn=_trace_forward,
                output_transform=flatten_outputs)
        self._model = model
        return self.pruner

    def on_after_backward(self, state: TrainState) -> None:
        if self.mode != "subgradient":
            return
        if self.pruner is None or self._model is not state.model:
            self.build(state.model, state.inputs[: min(2, state.inputs.shape[0])])
        lam = self.current_lambda(state.epoch, state.step)
        self.pruner.regularize(state.model, reg=lam)
        state.logs["sparsity_lambda"] = lam

    def on_step_end(self, state: TrainState) -> None:
        if self.mode != "proximal":
            return
        lam = self.current_lambda(state.epoch, state.step)
        lrs = _param_lrs(state.optimizer)
        excluded = set(self._excluded(state.model))
        for m in state.model.modules():
            if is_affine_norm(m) and m not in excluded and id(m.weight) in lrs:
                soft_threshold_(m.weight, lrs[id(m.weight)] * lam)
        state.logs["sparsity_lambda"] = lam


class CAGSSparsity(_ScheduledLambda):
    """CAP's context-aware guided sparsification: a CAGM-weighted L1 subgradient on BN scales.

    CAGMs (:class:`workbench.pruning.cagm.CAGM`) are attached at ``sites`` (default: the model's
    ``cagm_sites()``, e.g. PSPNet's backbone stages and pyramid branches, else every BN) when
    training starts and removed when it ends, or by :meth:`remove` / the context manager.
    :meth:`guidance` returns the guiding vectors by layer name for ``prune(method="cap")``.
    """

    def __init__(self, lam: float = 1e-4, schedule: Schedule | None = None, warmup_steps: int = 0,
                 sites: Sequence[str] | None = None, affinity: str | Callable = "softmax_dot",
                 reduction: str | Callable = "colmean_sigmoid", activation: str = "relu",
                 momentum: float = 0.1, other_bns: str = "l1", max_positions: int | None = 4096,
                 mode: str = "subgradient") -> None:
        super().__init__(lam, schedule, warmup_steps, mode)
        if other_bns not in ("l1", "none"):
            raise ValueError(f"other_bns={other_bns!r} is not valid; allowed: ('l1', 'none')")
        if not callable(affinity) and affinity not in AFFINITIES:
            raise ValueError(f"affinity={affinity!r} is not valid; allowed: {tuple(AFFINITIES)} or a callable")
        if not callable(reduction) and reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} is not valid; allowed: {tuple(REDUCTIONS)} or a callable")
        self.sites = None if sites is None else list(sites)
        self.other_bns = other_bns
        self.cagm_options = {"affinity": affinity, "reduction": reduction, "activation": activation,
                             "momentum": momentum, "max_positions": max_positions}
        self.cagms: CAGMSet | None = None
        self._model: nn.Module | None = None
        self._pending: dict | None = None
        self._last: dict[str, torch.Tensor] = {}

    def attach(self, model: nn.Module) -> CAGSSparsity:
        self.remove()
        self.cagms = CAGMSet(model, self.sites if self.sites is not None else default_sites(model),
                             **self.cagm_options)
        self._model = model
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
        return self

    def remove(self) -> None:
        if self.cagms is not None:
            self._last = self.cagms.guidance()
            self.cagms.remove()
            self.cagms = None

    def __enter__(self) -> CAGSSparsity:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def guidance(self) -> dict[str, torch.Tensor]:
        """Current guiding vectors ``{bn_name: a (C,)}`` (kept after the CAGMs are removed)."""
        return self.cagms.guidance() if self.cagms is not None else dict(self._last)

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: 2.0 * (1.0 - g) for name, g in self.guidance().items()}

    def _weight_of(self, m: nn.Module, guided: dict) -> torch.Tensor | float | None:
        if m in guided:
            return guided[m].weights().to(m.weight.device).reshape(m.weight.shape)
        return 1.0 if self.other_bns == "l1" else None

    @torch.no_grad()
    def apply(self, model: nn.Module, lam: float, lrs: dict[int, float] | None = None) -> None:
        """Subgradient mode: add ``lam * w * sign(gamma)`` to every BN scale's gradient. Proximal mode
        (``lrs`` given): soft-threshold every BN scale by ``lr * lam * w``."""
        guided = {m.bn: m for _, m in self.cagms} if self.cagms is not None else {}
        for m in model.modules():
            if not is_affine_norm(m):
                continue
            w = self._weight_of(m, guided)
            if w is None:
                continue
            if lrs is None:
                if m.weight.grad is not None:
                    m.weight.grad.add_(lam * w * torch.sign(m.weight))
            elif id(m.weight) in lrs:
                soft_threshold_(m.weight, lrs[id(m.weight)] * lam * w)

    def on_fit_start(self, state: TrainState) -> None:
        self.attach(state.model)

    def on_after_backward(self, state: TrainState) -> None:
        if self.cagms is None or self._model is not state.model:
            self.attach(state.model)
        if self.mode != "subgradient":
            return
        lam = self.current_lambda(state.epoch, state.step)
        self.apply(state.model, lam)
        state.logs["sparsity_lambda"] = lam

    def on_step_end(self, state: TrainState) -> None:
        if self.mode != "proximal":
            return
        lam = self.current_lambda(state.epoch, state.step)
        self.apply(state.model, lam, _param_lrs(state.optimizer))
        state.logs["sparsity_lambda"] = lam

    def on_fit_end(self, state: TrainState) -> None:
        self.remove()

    def state_dict(self) -> dict:
        return {"guidance": self.guidance(),
                "updates": {n: m.updates for n, m in self.cagms} if self.cagms is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        if self.cagms is None:
            self._pending = state  # fit() restores callbacks before on_fit_start attaches the CAGMs
        else:
            self._restore(state)

    def _restore(self, state: dict) -> None:
        for name, g in state.get("guidance", {}).items():
            if name in self.cagms.modules:
                cagm = self.cagms.modules[name]
                cagm.guidance = g.to(cagm.bn.weight.device)
                cagm.updates = int(state.get("updates", {}).get(name, 1))


def bn_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """``|gamma|`` of every affine BN layer, by name (CPU copies)."""
    return {n: m.weight.detach().abs().flatten().cpu().clone()
            for n, m in norm_layers(model, predicate=is_affine_norm).items()}


def sparsity_fraction(scales: dict[str, torch.Tensor] | nn.Module, thresholds: Sequence[float] = (1e-2,)
                      ) -> dict[float, float]:
    """Fraction of all BN scales with ``|gamma|`` below each threshold."""
    if isinstance(scales, nn.Module):
        scales = bn_scales(scales)
    if not scales:
        raise ValueError("no BN scales given")
    flat = torch.cat([s.flatten().abs().float() for s in scales.values()])
    return {float(t): float((flat < t).float().mean()) for t in thresholds}
