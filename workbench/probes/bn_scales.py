"""BN-scale history: ``|gamma|`` of every affine normalisation layer before training and after
each scheduled epoch, with the fraction of scales below each threshold (the histograms and sparsity
curves of the pruning notebook)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from workbench.probes.base import Probe
from workbench.pruning.sparsity import bn_scales, sparsity_fraction


class BNScaleProbe(Probe):
    """Records ``{"epoch", "scales": {layer: [|gamma|, ...]}, "fraction_below": {threshold: f}}``
    at the start of the fit (epoch 0, unless records were restored) and after every epoch the
    schedule names (``every`` counts epochs; default every epoch)."""

    name = "bn_scales"
    hook = "on_epoch_end"

    def __init__(self, thresholds: Sequence[float] = (1e-3, 1e-2, 1e-1),
                 every: int | Collection[int] | Callable[[int], bool] = 1, path: str | None = None) -> None:
        super().__init__(every, path)
        self.thresholds = tuple(float(t) for t in thresholds)

    def config(self) -> dict:
        return {**super().config(), "thresholds": list(self.thresholds)}

    def measure(self, state: Any) -> dict:
        scales = bn_scales(state.model)
        return {"scales": {n: s.tolist() for n, s in scales.items()},
                "fraction_below": sparsity_fraction(scales, self.thresholds)}

    def make_record(self, state: Any, values: dict) -> dict:
        # Counted in epochs done; ``fraction_below`` stays keyed by the float thresholds.
        return {"epoch": int(state.epoch) + 1, **values}

    def on_fit_start(self, state: Any) -> None:
        if not self.records:
            self.records.append({"epoch": 0, **self.measure(state)})
