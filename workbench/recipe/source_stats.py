"""Fair BN statistics for the mix-dataset control: evaluate each source with statistics of its own.

The control of the mix-dataset attack (:class:`workbench.data.mixed.SourceBatchSampler`) trains
on single-source batches, so its BN layers learn to normalise each source by that source's batch
statistics. Its running statistics, however, average the batches of both sources: the running
mean lies between the two sources' means and the running variance is the average of the
within-source variances, which matches neither source. Evaluating the control with them puts it at
a disadvantage that has nothing to do with batch noise.

:func:`evaluate_per_source` with ``statistics="per_source"`` re-estimates every BN layer's running
statistics on each source's own calibration items (``torch.optim.swa_utils.update_bn``: a
cumulative average over single-source batches in training mode, on a copy of the model) and
evaluates that source's test items with them. ``statistics="mixture"`` evaluates with the model's
running statistics as they are (the handicapped evaluation), for comparison.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

from workbench.data.mixed import MixedDataset
from workbench.train import evaluate

STATISTICS = ("per_source", "mixture")


def _model_device(model: nn.Module) -> torch.device:
    ref = next(iter(model.parameters()), None)
    return ref.device if ref is not None else torch.device("cpu")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, device: torch.device | str | None = None) -> nn.Module:
    """A copy of ``model`` whose BN running statistics (IEBN's included) are re-estimated over
    ``loader`` (batches of inputs, or of ``(inputs, targets)``); ``model`` is untouched."""
    net = copy.deepcopy(model)
    update_bn(loader, net, device=torch.device(device) if device is not None else _model_device(model))
    return net


def _check(model: nn.Module, test: MixedDataset, calibration: MixedDataset | None, statistics: str,
           batch_size: int) -> None:
    if statistics not in STATISTICS:
        raise ValueError(f"statistics={statistics!r} is not valid; allowed: {STATISTICS}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__} is not valid; allowed: an nn.Module")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size={batch_size!r} is not valid; allowed: an integer >= 2 (BN batch statistics)")
    for name, ds in (("test", test), ("calibration", calibration)):
        if ds is not None and not isinstance(ds, MixedDataset):
            raise ValueError(f"{name}={type(ds).__name__} is not valid; allowed: a workbench.data.mixed.MixedDataset")
    if statistics == "per_source":
        if calibration is None:
            raise ValueError("calibration=None is not valid with statistics='per_source'; allowed: the MixedDataset "
                             "(training split, no augmentation) whose sources re-estimate the BN statistics")
        if tuple(calibration.source_names) != tuple(test.source_names):
            raise ValueError(f"calibration sources {calibration.source_names} differ from test sources "
                             f"{test.source_names}; allowed: the same two sources")


def evaluate_per_source(model: nn.Module, test: MixedDataset, calibration: MixedDataset | None = None,
                        statistics: str = "per_source", batch_size: int = 256,
                        device: torch.device | str | None = None) -> dict[str, dict[str, float]]:
    """Accuracy and loss on each source's part of ``test``, with the BN statistics ``statistics`` picks
    (see the module docstring). Returns ``{source_name: {"acc", "loss", "count"}, "all": {...}}``
    (``"all"`` weights the sources by their test counts)."""
    _check(model, test, calibration, statistics, batch_size)
    device = torch.device(device) if device is not None else _model_device(model)
    out: dict[str, dict[str, float]] = {}
    for source in test.source_names:
        net = model
        if statistics == "per_source":
            part = calibration.source_subset(source)
            net = recalibrate_bn(model, DataLoader(part, batch_size=batch_size, drop_last=len(part) >= batch_size),
                                 device)
        part = test.source_subset(source)
        metrics = evaluate(net, DataLoader(part, batch_size=batch_size), device=device)
        out[source] = {"acc": metrics["acc"], "loss": metrics["loss"], "count": len(part)}
    total = sum(v["count"] for v in out.values())
    out["all"] = {key: sum(v[key] * v["count"] for v in out.values()) / total for key in ("acc", "loss")}
    out["all"]["count"] = total
    return out
