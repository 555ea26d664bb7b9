r"""Gradient noise scale :math:`B_\text{simple} = \mathrm{tr}(\Sigma)/|G|^2` (McCandlish et al. 2018).

From :math:`\mathbb E|G_B|^2 = |G|^2 + \mathrm{tr}(\Sigma)/B` at two batch sizes :math:`b < B`
(docs/methods.md, *Gradient noise scale*), each step gives unbiased estimates

.. math::
    \widehat{|G|^2} = \frac{B|G_B|^2 - b|G_b|^2}{B - b},\qquad
    \widehat{\mathrm{tr}\Sigma} = \frac{|G_b|^2 - |G_B|^2}{1/b - 1/B}.

Their ratio is biased and single-step values are noisy (often negative), so the probe keeps
separate exponential moving averages of the two (bias-corrected, as Adam's) and divides only at
read-out. Two ways to get :math:`G_b` and :math:`G_B`:

- ``method="two_batch"``: :math:`G_B` is the training gradient of the step (batch :math:`B`, read
  from ``.grad`` after ``backward``, so it includes whatever the training forward did, injected
  noise too), :math:`G_b` the gradient of the first :math:`b = B/k` samples on the probe copy.
  One extra small backward per measurement.
- ``method="micro"``: the batch is split into :math:`k` micro-batches of :math:`b` samples, each
  normalised with its own statistics, and their gradients come from one vectorised pass
  (:func:`~workbench.probes.microbatch.micro_batch_gradients`); :math:`|G_b|^2` is the mean of the
  micro-gradient norms and :math:`G_B` their mean (exactly the data-parallel situation with
  :math:`k` devices, docs/methods.md *Micro-batch gradients*). This equals the sample-variance form
  :math:`\widehat{\mathrm{tr}\Sigma} = b\,\widehat{\mathrm{Var}}`,
  :math:`\widehat{|G|^2} = |\bar g|^2 - \widehat{\mathrm{Var}}/k`.

With batch norm, per-example gradients do not exist; :math:`\Sigma` here is the covariance of
*micro-batch* gradients scaled by :math:`b`, the quantity that matters for the batch size.

Under DistributedDataParallel, :class:`DDPGradientNoiseScale` is McCandlish et al.'s nearly free
estimator (their Appendix A; docs/methods.md, *Gradient noise scale*): every rank's own gradient is a :math:`G_b` with
:math:`b` = the per-rank batch, the all-reduced gradient DDP hands the optimiser is :math:`G_B` with
:math:`B` = the global batch, and the same two formulas apply, with :math:`|G_b|^2` averaged over
the ranks (same expectation, lower variance). No extra forward or backward runs.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from workbench.probes.base import Probe
from workbench.probes.microbatch import (
    ProbeCopy,
    batch_gradient,
    check_compiled,
    check_micro_batches,
    flat_norm_sq,
    micro_batch_gradients,
)

METHODS = ("two_batch", "micro")
DDP_METHOD = "ddp"


def two_batch_estimates(sq_small: float, sq_big: float, b: int, big: int) -> tuple[float, float]:
    """Unbiased ``(|G|^2, tr Sigma)`` from squared gradient norms at batch sizes ``b < big``."""
    if not 0 < b < big:
        raise ValueError(f"batch sizes b={b}, B={big} are not valid; allowed: 0 < b < B")
    g2 = (big * sq_big - b * sq_small) / (big - b)
    trace = (sq_small - sq_big) / (1.0 / b - 1.0 / big)
    return g2, trace


class EMA:
    """Bias-corrected exponential moving average (``value`` is ``None`` before the first update)."""

    def __init__(self, beta: float) -> None:
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"ema={beta!r} is not valid; allowed: a number in [0, 1)")
        self.beta = float(beta)
        self.raw = 0.0
        self.count = 0

    def update(self, value: float) -> float:
        self.raw = self.beta * self.raw + (1.0 - self.beta) * value
        self.count += 1
        return self.value

    @property
    def value(self) -> float | None:
        if self.count == 0:
            return None
        return self.raw / (1.0 - self.beta ** self.count)

    def state_dict(self) -> dict:
        return {"raw": self.raw, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.raw, self.count = float(state["raw"]), int(state["count"])


def _ratio(num: float | None, den: float | None) -> float:
    if num is None or den is None or den <= 0:
        return math.nan
    return num / den


class _NoiseScaleProbe(Probe):
    """The bookkeeping every ``B_simple`` probe shares: unbiased estimates from a pair of squared
    gradient norms, their moving averages, the record, and the checkpointed state."""

    name = "gradient_noise_scale"
    hook = "on_after_backward"

    def __init__(self, every: int, ema: float, path: str | os.PathLike | None) -> None:
        super().__init__(every, path)
        self._g2, self._trace = EMA(ema), EMA(ema)

    @property
    def b_simple(self) -> float:
        return _ratio(self._trace.value, self._g2.value)

    def _estimate(self, sq_small: float, sq_big: float, b: int, big: int) -> dict:
        g2, trace = two_batch_estimates(sq_small, sq_big, b, big)
        g2_ema, trace_ema = self._g2.update(g2), self._trace.update(trace)
        return {"g2": g2, "trace": trace, "g2_ema": g2_ema, "trace_ema": trace_ema,
                "b_simple": _ratio(trace_ema, g2_ema), "b": b, "B": big}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "g2": self._g2.state_dict(), "trace": self._trace.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "g2" in state:
            self._g2.load_state_dict(state["g2"])
            self._trace.load_state_dict(state["trace"])


class GradientNoiseScale(_NoiseScaleProbe):
    """Callback recording ``B_simple`` every ``every`` steps; see the module docstring.

    Records: ``g2``, ``trace`` (this step's unbiased estimates), ``g2_ema``, ``trace_ema``,
    ``b_simple`` (ratio of the averages), ``b``, ``B``.
    """

    def __init__(self, every: int = 50, micro_batches: int = 4, method: str = "micro", ema: float = 0.9,
                 path: str | os.PathLike | None = None, *, compiled: bool = False) -> None:
        super().__init__(every, ema, path)
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not valid; allowed: {METHODS}")
        check_micro_batches(micro_batches, micro_batches)
        self.method = method
        self.micro_batches = micro_batches
        self.compiled = check_compiled(compiled)
        self._copy = ProbeCopy()

    def config(self) -> dict:
        return {**super().config(), "method": self.method, "micro_batches": self.micro_batches, "ema": self._g2.beta,
                "compiled": self.compiled}

    def measure(self, state: Any) -> dict | None:
        model, x, y = state.model, state.inputs, state.targets
        k = self.micro_batches
        b = check_micro_batches(x.shape[0], k)
        clone = self._copy.get(model)
        if self.method == "micro":
            grads = micro_batch_gradients(model, x, y, state.loss_fn, k, clone=clone, compiled=self.compiled)
            sq_small = float(flat_norm_sq(grads, dim0=True).mean())
            sq_big = float(flat_norm_sq({n: g.mean(0) for n, g in grads.items()}))
            big = k * b
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            if any(p.grad is None for p in params):
                full = batch_gradient(model, x, y, state.loss_fn, clone=clone, compiled=self.compiled)
                sq_big = float(flat_norm_sq(full))
            else:
                sq_big = float(sum(p.grad.detach().double().square().sum() for p in params))
            small = batch_gradient(model, x[:b], y[:b], state.loss_fn, clone=clone, compiled=self.compiled)
            sq_small = float(flat_norm_sq(small))
            big = x.shape[0]
        return self._estimate(sq_small, sq_big, b, big)


def _record_comm_hook(probe: DDPGradientNoiseScale, bucket):  # no annotations: DDP checks them by identity
    """DDP communication hook: DDP's own averaging all-reduce, with the squared norm of this rank's
    bucket taken before it and that of the averaged bucket after it, on the steps being measured."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    if not probe._armed:
        return allreduce_hook(probe._group, bucket)
    # before the hook: allreduce_hook divides the buffer in place
    probe._local.append(bucket.buffer().detach().double().square().sum())

    def averaged(fut):
        tensor = fut.value()
        probe._global.append(tensor.detach().double().square().sum())
        return tensor

    return allreduce_hook(probe._group, bucket).then(averaged)


class DDPGradientNoiseScale(_NoiseScaleProbe):
    """``B_simple`` under DistributedDataParallel from the per-rank vs all-reduced gradient pair
    (McCandlish et al. 2018, Appendix A; see the module docstring), every ``every`` steps.

    Every rank must hold one (the measurement ends in a two-number all-reduce); give ``path`` on
    rank 0 only. Call :meth:`attach` on the DDP-wrapped model before the first backward.

    The per-rank gradient is read in a DDP communication hook, which sees each gradient bucket once,
    as this rank computed it, just before DDP's own all-reduce averages it, and sees the averaged
    bucket right after; the hook then hands DDP exactly what its default hook would. The
    alternative, ``no_sync()`` plus a hand-made all-reduce of every gradient, would duplicate DDP's
    communication and lose its overlap with the backward pass. Cost on a measured step: one squared
    norm per bucket before and after the all-reduce plus one all-reduce of two numbers; on other
    steps nothing but a Python call per bucket.

    ``sq_small`` is the mean over ranks of :math:`|G_b|^2` and ``sq_big`` :math:`|G_B|^2`; both are
    the data gradient only (read before any callback, e.g. a sparsity subgradient, edits ``.grad``).
    With synchronised batch statistics a rank's gradient still depends on the other ranks' samples
    through the shared statistics (with BN only batch-level gradients exist; docs/methods.md,
    *Gradient noise scale*); with
    ``sync_bn`` off every rank's batch is normalised on its own, exactly the ghost-batch situation
    of the ``micro`` method with ``k`` = the number of ranks.

    Records: ``g2``, ``trace``, ``g2_ema``, ``trace_ema``, ``b_simple``, ``b`` (per-rank batch),
    ``B`` (global batch), ``sq_small``, ``sq_big``, ``ranks``.
    """

    def __init__(self, every: int = 50, ema: float = 0.9, path: str | os.PathLike | None = None) -> None:
        super().__init__(every, ema, path)
        self._armed = False
        self._local: list[torch.Tensor] = []
        self._global: list[torch.Tensor] = []
        self._group: Any = None
        self._model: nn.Module | None = None

    def config(self) -> dict:
        return {**super().config(), "method": DDP_METHOD, "ema": self._g2.beta}

    def attach(self, model: nn.Module) -> DDPGradientNoiseScale:
        """Register the communication hook on ``model`` (a ``DistributedDataParallel``); once per
        model, before its first backward."""
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(f"model={type(model).__name__} is not valid; allowed: a DistributedDataParallel model "
                             "(use GradientNoiseScale in a single process)")
        if self._model is not None:
            raise ValueError("this DDPGradientNoiseScale is already attached to a model")
        ranks = dist.get_world_size(model.process_group)
        if ranks < 2:
            raise ValueError(f"the process group has {ranks} rank(s); allowed: 2 or more (b < B needs several ranks; "
                             "use GradientNoiseScale in a single process)")
        model.register_comm_hook(self, _record_comm_hook)
        self._group = model.process_group
        self._model = model
        return self

    def on_fit_start(self, state: Any) -> None:
        if self._model is None or self._model is not state.model:
            raise ValueError("DDPGradientNoiseScale is not attached to the model being trained; call "
                             "attach(ddp_model) before fit")
        if getattr(state, "amp_dtype", None) == torch.float16:
            # GradScaler's scale is inside the buckets and changes over training: the averages would mix scales
            raise ValueError("DDPGradientNoiseScale under fp16 autocast is not supported (loss-scaled gradients); "
                             "allowed: amp 'off' or 'bf16'")

    def on_step_start(self, state: Any) -> None:
        self._armed = self.due(int(state.step))
        self._local.clear()
        self._global.clear()

    def measure(self, state: Any) -> dict | None:
        self._armed = False
        if not self._local:  # no bucket was reduced this step (e.g. inside no_sync)
            return None
        local = torch.stack(self._local).sum()
        big_sq = float(torch.stack(self._global).sum())
        self._local.clear()
        self._global.clear()
        packed = torch.stack([local, local.new_tensor(float(state.inputs.shape[0]))])
        dist.all_reduce(packed, group=self._group)
        ranks = dist.get_world_size(self._group)
        sq_small = float(packed[0]) / ranks
        big = int(round(float(packed[1])))
        b = big // ranks  # the sampler gives every rank the same share of the global batch
        return {**self._estimate(sq_small, big_sq, b, big), "sq_small": sq_small, "sq_big": big_sq, "ranks": ranks}
