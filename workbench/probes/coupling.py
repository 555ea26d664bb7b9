r"""BN coupling gap: the batch noise itself (docs/methods.md, *BN coupling gap*).

Split a batch of :math:`n` samples into :math:`k` micro-batches of :math:`b = n/k`, each normalised
with its own statistics (ghost batches), and compare the mean of their gradients with the gradient
of the whole batch normalised together:
:math:`\lVert\bar g - g_\text{full}\rVert / \lVert g_\text{full}\rVert`. For a mean-reduced loss
without batch statistics the two are the same gradient (the gap is rounding error); with batch
norm every sample's gradient depends on who shares its batch, and the gap grows as :math:`b`
shrinks. Both gradients come from the probe copy at the real model's weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from workbench.probes.base import Probe
from workbench.probes.gsnr import layer_of
from workbench.probes.microbatch import (
    LossFn,
    ProbeCopy,
    batch_gradient,
    check_compiled,
    micro_batch_gradients,
    probe_copy,
)

DEFAULT_MICRO_SIZES = (2, 4, 8, 16, 32)


def coupling_gap(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn,
                 micro_sizes: Sequence[int] = DEFAULT_MICRO_SIZES, clone: nn.Module | None = None,
                 per_layer: bool = False, compiled: bool = False) -> dict:
    """Relative gap between mean micro-batch gradient and full-batch gradient per micro-batch size.

    Sizes ``b`` with ``b >= len(inputs)`` are dropped; for each ``b`` the first ``(n // b) * b``
    samples are used for both gradients. Returns ``{"micro_sizes": [...], "gap": [...]}`` and, with
    ``per_layer``, ``"layers": {layer: [gap per size]}``.
    """
    n_total = inputs.shape[0]
    sizes = sorted({int(b) for b in micro_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"micro_sizes={list(micro_sizes)!r} is not valid; allowed: integers >= 1")
    sizes = [b for b in sizes if b < n_total]
    if not sizes:
        raise ValueError(f"micro_sizes={list(micro_sizes)!r} are all >= the batch of {n_total}; allowed: sizes < "
                         f"{n_total}")
    clone = clone if clone is not None else probe_copy(model)
    fulls: dict[int, dict[str, Tensor]] = {}
    out: dict[str, Any] = {"micro_sizes": sizes, "gap": []}
    layers: dict[str, list[float]] = {}
    for b in sizes:
        k = n_total // b
        n = k * b
        if n not in fulls:
            fulls[n] = batch_gradient(model, inputs[:n], targets[:n], loss_fn, clone=clone, compiled=compiled)
        full = fulls[n]
        micro = micro_batch_gradients(model, inputs[:n], targets[:n], loss_fn, k, clone=clone, compiled=compiled)
        diff_sq, full_sq = 0.0, 0.0
        per: dict[str, list[float]] = {}
        for name, g in micro.items():
            d = float((g.mean(0).double() - full[name].double()).square().sum())
            f = float(full[name].double().square().sum())
            diff_sq += d
            full_sq += f
            acc = per.setdefault(layer_of(name), [0.0, 0.0])
            acc[0] += d
            acc[1] += f
        out["gap"].append(math.sqrt(diff_sq / full_sq) if full_sq > 0 else math.nan)
        for layer, (d, f) in per.items():
            layers.setdefault(layer, []).append(math.sqrt(d / f) if f > 0 else math.nan)
    if per_layer:
        out["layers"] = layers
    return out


class CouplingGap(Probe):
    """Callback recording the coupling gap for several micro-batch sizes every ``every`` steps.

    Records ``micro_sizes`` and ``gap`` (lists), plus ``layers`` with ``per_layer=True``.
    """

    name = "coupling_gap"
    hook = "on_after_backward"

    def __init__(self, every: int = 500, micro_sizes: Sequence[int] = DEFAULT_MICRO_SIZES, per_layer: bool = False,
                 path: str | os.PathLike | None = None, *, compiled: bool = False) -> None:
        super().__init__(every, path)
        self.micro_sizes = tuple(micro_sizes)
        if not self.micro_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                       for b in self.micro_sizes):
            raise ValueError(f"micro_sizes={micro_sizes!r} is not valid; allowed: integers >= 1")
        self.per_layer = per_layer
        self.compiled = check_compiled(compiled)
        self._copy = ProbeCopy()

    def config(self) -> dict:
        return {**super().config(), "micro_sizes": list(self.micro_sizes), "per_layer": self.per_layer,
                "compiled": self.compiled}

    def measure(self, state: Any) -> dict | None:
        return coupling_gap(state.model, state.inputs, state.targets, state.loss_fn, self.micro_sizes,
                            clone=self._copy.get(state.model), per_layer=self.per_layer, compiled=self.compiled)
