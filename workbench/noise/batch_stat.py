r"""Batch-statistic noise injection: the IEBN paper's noise attack and its random generalisations.

Every selected normalisation layer normalises its training-mode batch with *perturbed* statistics
(docs/methods.md, *Batch-statistic noise attacks*; the equations are the workbench's own, the paper
does not publish its own):

- ``"constant"`` -- the constant attack. The same fixed constants in every layer and step, derived
  from ``level`` = :math:`a`: the mean is shifted by :math:`a` batch standard deviations and the
  standard deviation is scaled by :math:`1 + a`,
  :math:`\tilde\mu = \mu_B + a\sqrt{s_B^2+\epsilon}`,
  :math:`\sqrt{\tilde s^2+\epsilon} = (1+a)\sqrt{s_B^2+\epsilon}`, so that
  :math:`\hat x' = (\hat x - a)/(1 + a)`. Expressed in units of each layer's own batch spread, the
  attack is equally strong in every layer whatever its activation scale. The affine parameters can
  absorb it in training; with clean running statistics (the default) evaluation then normalises
  differently from training, which is what the attack probes.
- ``"mean"`` -- Gaussian noise on the batch mean, per channel and step:
  :math:`\tilde\mu = \mu_B + \ell\,\sqrt{s_B^2+\epsilon}\,\xi`, :math:`\xi\sim\mathcal N(0,1)`.
- ``"var"`` -- log-normal noise on the batch variance: :math:`\tilde s^2 = s_B^2\,e^{\ell\xi}` (stays
  positive).
- ``"both"`` -- both of the above with independent draws.
- ``"feature"`` -- noise on the normalised features, per element:
  :math:`y = \gamma\,(\hat x + \ell\,\xi) + \beta`. For IEBN the gate multiplies the normalised
  feature, so :math:`y = \gamma a\,(\hat x + \ell\xi) + \beta`; this is computed as the layer's own
  output plus :math:`\ell\,\gamma a\,\xi`, with the gate :math:`a` read off the layer's attention
  probe point (so the IEBN forward itself is untouched).

Statistics carry autograd history: gradients flow through the perturbed statistics as through
clean ones. Whether the running averages absorb the clean or the perturbed statistics is the
``running_stats`` option (``"clean"`` by default, so evaluation measures the learned weights).
Evaluation mode is never perturbed. A step whose level is 0 runs the layer's original forward, so
outputs and gradients are bit-identical to an uninstrumented model.

How each layer family is instrumented:

- layers with a ``stat_transform`` hook (``workbench.nn.IEBN2d`` and its synced variant): the
  instance's ``forward`` is wrapped; during a noisy call only, the hook is set (and the
  ``stat_transform_updates_running_stats`` flag, for ``running_stats="noisy"``), or for feature
  noise a forward hook on the gate's probe point; both are gone again when the call returns, so
  the layer's own (possibly fused) path runs whenever the level is 0;
- ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and ``workbench.nn.SyncBatchNorm2d`` (any
  ``_BatchNorm`` whose class does not override ``forward``, and the two synced layers):
  ``forward`` is replaced *on the instance* by a manual batch-norm that uses the perturbed
  statistics and updates the running statistics exactly like ``nn.BatchNorm``. A synced layer
  under an initialised process group pools the statistics over the group first (differentiably),
  so every rank sees the same global statistics; with the same ``seed`` every rank also draws the
  same noise.

Reproducibility: the noise of a call is a pure function of ``(seed, step, layer index, call index
within the step)``. The per-channel draws come from a CPU generator (identical on every device);
feature noise is drawn on the activation's device. Used as a training callback, ``on_step_start``
sets the step from the loop, so a resumed run draws the same noise; used alone, the step stays
where :meth:`BatchStatNoise.set_step` put it and successive forwards draw fresh noise through the
call index. Under ``torch.distributed`` the statistic noise is the same on every rank (the
statistics are the group's, or each rank's under one shared draw), while the per-element feature
noise of rank ``r > 0`` mixes ``r`` into its seed: the ranks hold different samples, whose noise
must be independent (rank 0 draws what a single process draws).

Removal restores the model exactly: the instance ``forward`` attributes, hooks and flags that were
added are removed, nothing is ever added to parameters, buffers or the ``state_dict``. Copies made
with ``copy.deepcopy`` while a hook is installed keep calling into it; remove the hook first (or
strip the copy) when that is not wanted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from workbench.callbacks import Callback
from workbench.nn.functional import running_average_factor, update_running_stats
from workbench.nn.norms import norm_layers
from workbench.nn.sync import SyncBatchNorm2d, pool_moments_over_group
from workbench.noise.schedule import Schedule, check_level, make_schedule

NOISE_KINDS = ("constant", "mean", "var", "both", "feature")
RUNNING_STATS = ("clean", "noisy")
# SyncBatchNorm2d: the workbench's CPU-capable synced BN (DDP over gloo), plain BN otherwise
_PLAIN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward, SyncBatchNorm2d.forward)
_MASK64 = (1 << 64) - 1
# draw streams: independent noise for the mean, the variance and the features of one call
_MEAN, _VAR, _FEATURE = 1, 2, 3


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over each value), well spread even for
    consecutive steps or layer indices."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def normalization_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every batch-normalisation layer of ``model`` by qualified name (:func:`workbench.nn.norms.norm_layers`)."""
    return norm_layers(model)


def select_layers(model: nn.Module, layers: str | Iterable[str] | None) -> dict[str, _BatchNorm]:
    """The normalisation layers the noise perturbs: ``norm_layers(model, layers, required=True)``
    (names or ``fnmatch`` patterns; ``None``: all; ``ValueError`` when there is none or a pattern
    matches none)."""
    return norm_layers(model, layers, required=True)


def _uses_stat_hook(module: nn.Module) -> bool:
    return hasattr(module, "stat_transform") and hasattr(module, "stat_transform_updates_running_stats")


def _is_plain(module: nn.Module) -> bool:
    return type(module).forward in _PLAIN_FORWARDS


class BatchStatNoise(Callback):
    """Handle of an installed batch-statistic noise; see the module docstring for the semantics.

    Use it as a context manager, remove it with :meth:`remove`, and pass it to ``fit(callbacks=...)``
    so the level schedule follows the optimiser steps. ``level`` may be changed while installed
    (e.g. from a slider).
    """

    def __init__(self, model: nn.Module, level: float, kind: str = "mean",
                 layers: str | Iterable[str] | None = None, seed: int = 0,
                 schedule: str | Schedule = "constant", running_stats: str = "clean", ramp_steps: int = 1000) -> None:
        self._level = check_level("level", level)
        if kind not in NOISE_KINDS:
            raise ValueError(f"kind={kind!r} is not valid; allowed: {NOISE_KINDS}")
        if running_stats not in RUNNING_STATS:
            raise ValueError(f"running_stats={running_stats!r} is not valid; allowed: {RUNNING_STATS}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} is not valid; allowed: an integer >= 0")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model={type(model).__name__} is not valid; allowed: an nn.Module")
        self._schedule = make_schedule(schedule, ramp_steps)
        self.kind = kind
        self.seed = seed
        self.running_stats = running_stats
        self.layers = select_layers(model, layers)
        for name, module in self.layers.items():
            if not (_uses_stat_hook(module) or _is_plain(module)):
                raise ValueError(f"layer {name!r} ({type(module).__name__}) overrides forward and has no "
                                 "stat_transform hook; allowed: nn.BatchNorm*d, nn.SyncBatchNorm or layers with "
                                 "a stat_transform hook (IEBN2d)")
            if "forward" in vars(module) or getattr(module, "stat_transform", None) is not None:
                raise ValueError(f"layer {name!r} is already instrumented (an instance forward or stat_transform "
                                 "is set); remove the other noise hook first")
        self._step = 0
        self._calls: dict[tuple[int, int], int] = {}
        self._cpu_gen = torch.Generator()
        self._device_gens: dict[torch.device, torch.Generator] = {}
        self._undo: list[Any] = []
        self._installed = False
        self._install()

    # ------------------------------------------------------------------------------------------
    # level and step

    @property
    def level(self) -> float:
        """The nominal level (before the schedule's factor)."""
        return self._level

    @level.setter
    def level(self, value: float) -> None:
        self._level = check_level("level", value)

    @property
    def step(self) -> int:
        return self._step

    @property
    def current_level(self) -> float:
        """The level applied at the current step: nominal level x schedule factor."""
        factor = self._schedule(self._step)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
                or factor < 0:
            raise ValueError(f"schedule({self._step}) returned {factor!r}; allowed: a finite number >= 0")
        return self._level * float(factor)

    @property
    def installed(self) -> bool:
        return self._installed

    def set_step(self, step: int) -> None:
        """Move to optimiser step ``step``: the level follows the schedule and the draws restart
        from the (seed, step) stream."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} is not valid; allowed: an integer >= 0")
        self._step = step
        self._calls.clear()

    # ------------------------------------------------------------------------------------------
    # installation

    def _install(self) -> None:
        try:
            for index, module in enumerate(self.layers.values()):
                if _uses_stat_hook(module):
                    self._install_hooked(index, module)
                else:
                    self._install_plain(index, module)
        except BaseException:
            self.remove()
            raise
        self._installed = True

    def _install_hooked(self, index: int, module: nn.Module) -> None:
        # The hook and the gate capture are set only for the duration of a noisy call: a layer
        # may take a faster path when nothing observes it, so leaving them set would change the
        # level-0 numerics.
        probe = getattr(module, "attention_probe", None)

        def forward(x: Tensor, module=module, index=index) -> Tensor:
            level = self.current_level if module.training else 0.0
            if level == 0.0:
                return type(module).forward(module, x)
            if self.kind == "feature":
                slot: dict[str, Tensor] = {}
                handle = None
                if isinstance(probe, nn.Module):
                    handle = probe.register_forward_hook(lambda _m, _i, out: slot.__setitem__("gate", out))
                try:
                    y = type(module).forward(module, x)
                finally:
                    if handle is not None:
                        handle.remove()
                scale = _affine_scale(module, y).view(1, -1)
                if "gate" in slot:
                    scale = slot["gate"].to(y.dtype) * scale
                scale = scale.reshape(*scale.shape, *([1] * (y.dim() - 2)))
                return y + level * scale * self._normal(index, _FEATURE, y.shape, y.device, y.dtype)
            old = (module.stat_transform, module.stat_transform_updates_running_stats)
            module.stat_transform = lambda mean, var: self._perturb(index, module, mean, var, level)
            module.stat_transform_updates_running_stats = self.running_stats == "noisy"
            try:
                return type(module).forward(module, x)
            finally:
                module.stat_transform, module.stat_transform_updates_running_stats = old

        self._set_forward(module, forward)

    def _install_plain(self, index: int, module: _BatchNorm) -> None:
        def forward(x: Tensor, module=module, index=index) -> Tensor:
            level = self.current_level if module.training else 0.0
            if level == 0.0:
                return type(module).forward(module, x)
            if self.kind == "feature":
                y = type(module).forward(module, x)
                scale = _affine_scale(module, y).reshape(1, -1, *([1] * (y.dim() - 2)))
                return y + level * scale * self._normal(index, _FEATURE, y.shape, y.device, y.dtype)
            return self._noisy_batch_norm(index, module, x, level)

        self._set_forward(module, forward)

    def _set_forward(self, module: nn.Module, forward) -> None:
        module.forward = forward

        def undo(module=module) -> None:
            vars(module).pop("forward", None)

        self._undo.append(undo)

    def remove(self) -> None:
        """Uninstall: restore every forward, hook and flag; idempotent."""
        while self._undo:
            self._undo.pop()()
        self._installed = False

    def __enter__(self) -> BatchStatNoise:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------------------------------
    # noise

    def _normal(self, index: int, stream: int, shape: torch.Size | tuple[int, ...], device: torch.device,
                dtype: torch.dtype) -> Tensor:
        call = self._calls.get((index, stream), 0)
        self._calls[(index, stream)] = call + 1
        seed = _mix(self.seed, self._step, index, call, stream)
        rank = _process_rank()
        if stream == _FEATURE and rank > 0:
            # per-sample noise: another rank's samples need independent draws (statistic noise stays shared)
            seed = _mix(self.seed, self._step, index, call, stream, rank)
        if stream != _FEATURE or device.type == "cpu":
            self._cpu_gen.manual_seed(seed)
            return torch.randn(tuple(shape), generator=self._cpu_gen, dtype=torch.float32).to(device, dtype)
        gen = self._device_gens.get(device)
        if gen is None:
            gen = self._device_gens[device] = torch.Generator(device=device)
        gen.manual_seed(seed)
        return torch.randn(tuple(shape), generator=gen, device=device, dtype=dtype)

    def _perturb(self, index: int, module: nn.Module, mean: Tensor, var: Tensor,
                 level: float) -> tuple[Tensor, Tensor]:
        eps = module.eps
        if self.kind == "constant":
            std = torch.sqrt(var + eps)
            return mean + level * std, (1.0 + level) ** 2 * (var + eps) - eps
        if self.kind in ("mean", "both"):
            xi = self._normal(index, _MEAN, mean.shape, mean.device, mean.dtype)
            mean = mean + level * torch.sqrt(var + eps) * xi
        if self.kind in ("var", "both"):
            xi = self._normal(index, _VAR, var.shape, var.device, var.dtype)
            var = var * torch.exp(level * xi)
        return mean, var

    def _noisy_batch_norm(self, index: int, module: _BatchNorm, x: Tensor, level: float) -> Tensor:
        module._check_input_dim(x)
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        mean, var, count = _batch_moments(module, xf)
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        noisy_mean, noisy_var = self._perturb(index, module, mean, var, level)
        if module.track_running_stats and module.running_mean is not None:
            factor = running_average_factor(module)
            if self.running_stats == "noisy":
                update_running_stats(module, noisy_mean, noisy_var, count, factor)
            else:
                update_running_stats(module, mean, var, count, factor)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (xf - noisy_mean.view(shape)) * torch.rsqrt(noisy_var.view(shape) + module.eps)
        if module.weight is not None:
            y = y * module.weight.view(shape)
        if module.bias is not None:
            y = y + module.bias.view(shape)
        return y.to(x.dtype)

    # ------------------------------------------------------------------------------------------
    # training callback

    def on_fit_start(self, state: Any) -> None:
        self.set_step(int(state.step))

    def on_step_start(self, state: Any) -> None:
        self.set_step(int(state.step))
        state.logs["noise_level"] = self.current_level

    def state_dict(self) -> dict:
        return {"step": self._step, "level": self._level}

    def load_state_dict(self, state: dict) -> None:
        self.level = state.get("level", self._level)
        self.set_step(int(state.get("step", 0)))

    def __repr__(self) -> str:
        return (f"BatchStatNoise(kind={self.kind!r}, level={self._level}, layers={len(self.layers)}, seed={self.seed}, "
                f"running_stats={self.running_stats!r}, installed={self._installed})")


def _process_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _affine_scale(module: nn.Module, like: Tensor) -> Tensor:
    weight = getattr(module, "weight", None)
    if weight is None:
        return torch.ones(like.shape[1], dtype=like.dtype, device=like.device)
    return weight.to(like.dtype)


def _batch_moments(module: _BatchNorm, x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Biased batch mean and variance per channel (pooled over the process group for a
    ``SyncBatchNorm`` under an initialised group) and the number of values behind them."""
    dims = [0, *range(2, x.dim())]
    count = x.numel() // x.shape[1]
    if isinstance(module, SyncBatchNorm2d) and torch.distributed.is_available() \
            and torch.distributed.is_initialized():
        # the same exact pooling as the layer's own forward, so a noisy step sees the statistics a clean one would
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        mean, var, total = pool_moments_over_group(mean, var, count, module.process_group)
        return mean, var, int(total[0].item())
    if isinstance(module, nn.SyncBatchNorm) and torch.distributed.is_available() \
            and torch.distributed.is_initialized():
        import torch.distributed.nn.functional as dist_fn

        group = module.process_group or torch.distributed.group.WORLD
        if torch.distributed.get_world_size(group) > 1:
            n = torch.full((1,), float(count), dtype=x.dtype, device=x.device)
            packed = torch.cat([x.sum(dims), x.square().sum(dims), n])
            packed = dist_fn.all_reduce(packed, group=group)
            c = x.shape[1]
            total = packed[-1]
            mean = packed[:c] / total
            # E[x^2] - E[x]^2 in float32 can cancel; clamp keeps the variance a variance
            var = (packed[c:2 * c] / total - mean.square()).clamp_min(0)
            return mean, var, int(total.item())
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, var, count


def batch_stat_noise(model: nn.Module, level: float, kind: str = "mean", layers: str | Iterable[str] | None = None,
                     seed: int = 0, schedule: str | Schedule = "constant", running_stats: str = "clean",
                     ramp_steps: int = 1000) -> BatchStatNoise:
    """Install batch-statistic noise on ``model``'s normalisation layers and return its handle.

    ``level``: finite, >= 0 (0 = exact no-op); ``kind`` in :data:`NOISE_KINDS`; ``layers``: ``None``
    (all) or names / ``fnmatch`` patterns of normalisation layers; ``schedule``: ``"constant"``,
    ``"ramp"`` (linear over ``ramp_steps``) or a callable ``step -> factor``; ``running_stats``:
    ``"clean"`` or ``"noisy"`` (which statistics the running averages absorb). The handle is a
    context manager, has ``.remove()``, and is a training callback::

        with batch_stat_noise(model, 0.5, kind="mean") as noise:
            fit(model, loader, callbacks=[noise])
    """
    return BatchStatNoise(model, level, kind=kind, layers=layers, seed=seed, schedule=schedule,
                          running_stats=running_stats, ramp_steps=ramp_steps)
