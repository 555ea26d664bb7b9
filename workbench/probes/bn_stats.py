r"""BN estimation noise per layer: how far batch statistics stray from population statistics, as a
function of the batch size (docs/methods.md, *BN estimation noise*).

One eval-mode pass over a data set records, at the input of every normalisation layer, each
sample's per-channel mean :math:`m_{n,c}` and (biased, over the spatial positions) variance
:math:`v_{n,c}`. Eval mode fixes every layer's input (no layer's output depends on the rest of its
batch), so the remaining randomness is exactly the estimation noise of the statistics. From these
per-sample moments the statistics of *any* batch follow without another forward pass:
:math:`\mu_B = \overline{m}_B`, :math:`s_B^2 = \overline{v}_B + \mathrm{Var}_B(m)` (law of total
variance), and the population :math:`\mu, \sigma^2` the same way over all samples. Batches are
drawn without replacement; per layer and batch size the result is the RMS over batches and
channels of :math:`(\mu_B-\mu)/\sigma` (``mean_dev``; shrinks like :math:`1/\sqrt B` for independent
samples) and of :math:`s_B^2/\sigma^2 - 1` (``var_dev``). Channels with zero population variance are
skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from workbench.nn.norms import norm_layers
from workbench.probes.base import Probe, probe_inputs

DEFAULT_BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128)


def _batches(data: Tensor | Dataset | Iterable, batch_size: int) -> Iterable[Tensor]:
    if isinstance(data, Tensor):
        yield from data.split(batch_size)
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        for start in range(0, len(data), batch_size):
            items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            yield torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])
    else:
        for batch in data:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def bn_input_moments(model: nn.Module, data: Tensor | Dataset | Iterable, layers: str | Sequence[str] | None = None,
                     device: torch.device | str | None = None,
                     batch_size: int = 256) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-sample, per-channel mean and variance ``(N, C)`` (float64, CPU) of every selected
    normalisation layer's input over ``data`` (a tensor of inputs, a dataset of ``(x, y)`` or an
    iterable of batches), from one eval-mode pass. The model's mode is restored afterwards."""
    selected = norm_layers(model, layers, required=True)
    if device is None:
        ref = next(iter(model.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
    store: dict[str, tuple[list[Tensor], list[Tensor]]] = {n: ([], []) for n in selected}

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            dims = tuple(range(2, x.dim()))
            xf = x.double()
            if dims:
                var, mean = torch.var_mean(xf, dim=dims, correction=0)
            else:
                mean, var = xf, torch.zeros_like(xf)
            store[name][0].append(mean.cpu())
            store[name][1].append(var.cpu())
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in selected.items()]
    was_training = model.training
    model.eval()
    try:
        for x in _batches(data, batch_size):
            model(x.to(device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not any(store[n][0] for n in store):
        raise ValueError("data is empty; allowed: at least one sample")
    return {n: (torch.cat(means), torch.cat(vars_)) for n, (means, vars_) in store.items()}


def estimation_noise(moments: dict[str, tuple[Tensor, Tensor]], batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                     n_batches: int = 256, seed: int = 0) -> dict:
    """Per-layer RMS deviation of batch from population statistics for each batch size.

    Returns ``{"batch_sizes": [...], "n_samples": N, "layers": {layer: {"mean_dev": [...],
    "var_dev": [...]}}}``; batch sizes larger than the number of samples are dropped.
    """
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches={n_batches!r} is not valid; allowed: an integer >= 1")
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch_sizes={list(batch_sizes)!r} is not valid; allowed: integers >= 1")
    n = next(iter(moments.values()))[0].shape[0]
    sizes = [b for b in sizes if b <= n]
    if not sizes:
        raise ValueError(f"batch_sizes={list(batch_sizes)!r} all exceed the {n} samples; allowed: sizes <= {n}")
    gen = torch.Generator().manual_seed(seed)
    # one set of random orders shared by all layers: the layers see the same batches, as in training
    orders = torch.rand(n_batches, n, generator=gen).argsort(1)
    result: dict[str, Any] = {"batch_sizes": sizes, "n_samples": n, "layers": {}}
    for name, (m, v) in moments.items():
        mu = m.mean(0)
        sigma2 = v.mean(0) + m.var(0, correction=0)
        live = sigma2 > 1e-12 * sigma2.max().clamp_min(1e-300)
        if not bool(live.any()):
            continue
        m, v, mu, sigma2 = m[:, live], v[:, live], mu[live], sigma2[live]
        mean_dev, var_dev = [], []
        for b in sizes:
            idx = orders[:, :b]
            mb = m[idx]  # (n_batches, b, C)
            mu_b = mb.mean(1)
            s2_b = v[idx].mean(1) + mb.var(1, correction=0)
            mean_dev.append(float(((mu_b - mu) / sigma2.sqrt()).square().mean().sqrt()))
            var_dev.append(float((s2_b / sigma2 - 1).square().mean().sqrt()))
        result["layers"][name] = {"mean_dev": mean_dev, "var_dev": var_dev}
    return result


class BNEstimationNoise(Probe):
    """Callback measuring per-layer estimation noise on a fixed probe set every ``every`` steps.

    ``data``: the probe set (a tensor of inputs or a dataset; at most ``max_samples`` are used),
    population statistics are taken over it. Records ``batch_sizes``, ``layers`` and the average
    over layers ``mean_dev_avg`` / ``var_dev_avg`` (lists per batch size).
    """

    name = "bn_estimation_noise"
    hook = "on_step_end"

    # every=400: a firing step costs ~27 ordinary steps on an H100 (resnet20, batch 64; ~8 on CPU), so
    # the default schedule stays under the 1.1x overhead budget (benchmarks/probes-cuda-h100.md).
    def __init__(self, data: Tensor | Dataset, every: int = 400, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                 n_batches: int = 128, layers: str | Sequence[str] | None = None, max_samples: int = 512,
                 seed: int = 0, path: str | os.PathLike | None = None) -> None:
        super().__init__(every, path)
        inputs = probe_inputs(data, max_samples)
        if inputs.shape[0] < 2:
            raise ValueError(f"data has {inputs.shape[0]} sample(s); allowed: at least 2")
        self.inputs = inputs
        self.batch_sizes = tuple(batch_sizes)
        self.n_batches = n_batches
        self.layers = layers
        self.seed = seed

    def config(self) -> dict:
        return {**super().config(), "batch_sizes": list(self.batch_sizes), "n_batches": self.n_batches,
                "n_samples": int(self.inputs.shape[0])}

    def measure(self, state: Any) -> dict | None:
        moments = bn_input_moments(state.model, self.inputs, self.layers)
        result = estimation_noise(moments, self.batch_sizes, self.n_batches, self.seed)
        layers = list(result["layers"].values())
        sizes = result["batch_sizes"]
        result["mean_dev_avg"] = [sum(lay["mean_dev"][i] for lay in layers) / len(layers) for i in range(len(sizes))]
        result["var_dev_avg"] = [sum(lay["var_dev"][i] for lay in layers) / len(layers) for i in range(len(sizes))]
        return result
