r"""Per-layer gradient signal-to-noise ratio (Liu et al., ICLR 2020) from micro-batch gradients.

For parameter :math:`\theta_j` with micro-batch gradients :math:`g^{(1)}_j..g^{(k)}_j` (each
micro-batch normalised with its own statistics, docs/methods.md *Micro-batch gradients*):
:math:`r_j = (\bar g_j^2 - \widehat{\mathrm{Var}}_j/k)/\widehat{\mathrm{Var}}_j` with the unbiased
sample variance over the :math:`k` micro-batches; subtracting :math:`\widehat{\mathrm{Var}}_j/k`
makes the numerator unbiased for :math:`(\mathbb E g_j)^2`, so single values can be negative.
This is the GSNR of *micro-batch* gradients; a per-example GSNR is :math:`b` times smaller when
examples are independent. Reported per layer (all parameters of a module together) as mean and
median, plus the variance-weighted mean over the whole network, which is
:math:`|\widehat G|^2/\widehat{\mathrm{tr}}\,\mathrm{Cov}(g)`, i.e. :math:`b/B_\text{simple}` (docs/methods.md, *GSNR*).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from workbench.probes.base import Probe
from workbench.probes.microbatch import ProbeCopy, check_compiled, check_micro_batches, micro_batch_gradients


def layer_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def gsnr_from_micro_gradients(grads: dict[str, Tensor], eps: float = 1e-30) -> dict:
    """GSNR statistics from ``{name: (k, *shape)}`` micro-batch gradients.

    Returns ``{"layers": {layer: {"mean", "median", "numel"}}, "mean", "median", "weighted"}``.
    Entries whose gradient never varies (variance <= ``eps``, e.g. unused parameters) are skipped.
    """
    groups: dict[str, list[Tensor]] = {}
    num_total, var_total = 0.0, 0.0
    all_r: list[Tensor] = []
    for name, g in grads.items():
        k = g.shape[0]
        if k < 2:
            raise ValueError(f"got {k} micro-batch gradient(s) for {name!r}; allowed: at least 2")
        flat = g.reshape(k, -1).double()
        mean = flat.mean(0)
        var = flat.var(0, correction=1)
        num = mean.square() - var / k
        keep = var > eps
        num_total += float(num[keep].sum())
        var_total += float(var[keep].sum())
        r = num[keep] / var[keep]
        groups.setdefault(layer_of(name), []).append(r)
        all_r.append(r)
    layers = {}
    for layer, rs in groups.items():
        r = torch.cat(rs)
        if r.numel():
            layers[layer] = {"mean": float(r.mean()), "median": float(r.median()), "numel": int(r.numel())}
    r = torch.cat(all_r) if all_r else torch.zeros(0, dtype=torch.float64)
    return {
        "layers": layers,
        "mean": float(r.mean()) if r.numel() else math.nan,
        "median": float(r.median()) if r.numel() else math.nan,
        "weighted": num_total / var_total if var_total > 0 else math.nan,
    }


class GradientSNR(Probe):
    """Callback recording per-layer micro-batch GSNR every ``every`` steps.

    Records ``layers`` (``{layer: {mean, median, numel}}``), ``mean``, ``median``, ``weighted``,
    and ``b`` (micro-batch size).
    """

    name = "gsnr"
    hook = "on_after_backward"

    # every=100: a firing step costs ~8 ordinary steps on an H100 (resnet20, batch 64; ~2.4 on CPU), so
    # the default schedule stays under the 1.1x overhead budget (benchmarks/probes-cuda-h100.md).
    def __init__(self, every: int = 100, micro_batches: int = 8, path: str | os.PathLike | None = None, *,
                 compiled: bool = False) -> None:
        super().__init__(every, path)
        check_micro_batches(micro_batches, micro_batches)
        self.micro_batches = micro_batches
        self.compiled = check_compiled(compiled)
        self._copy = ProbeCopy()

    def config(self) -> dict:
        return {**super().config(), "micro_batches": self.micro_batches, "compiled": self.compiled}

    def measure(self, state: Any) -> dict | None:
        b = check_micro_batches(state.inputs.shape[0], self.micro_batches)
        grads = micro_batch_gradients(state.model, state.inputs, state.targets, state.loss_fn, self.micro_batches,
                                      clone=self._copy.get(state.model), compiled=self.compiled)
        return {**gsnr_from_micro_gradients(grads), "b": b}
