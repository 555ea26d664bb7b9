"""CAGM, CAP's context-aware guiding module (docs/methods.md, *CAP: CAGM and CAGS*), as a removable forward hook.

A CAGM sits at a BN site and reads the feature after that BN and its activation (``ReLU(BN(x))``,
as in the figure's ``Conv -> BN -> activation``), with gradients stopped. From the per-sample
feature ``F`` in ``R^{C x HW}`` it builds a ``C x C`` channel-affinity matrix and reduces it to a
guiding vector ``a`` in ``(0, 1)^C``, averaged over the batch and kept as an exponential moving
average over steps. It changes nothing in the forward pass and acts only through the sparsity
gradient (:class:`workbench.pruning.sparsity.CAGSSparsity`).

The paper publishes neither formula; the choices here (both are parameters):

- ``affinity="softmax_dot"`` (default): ``A = softmax_row(F F^T / sqrt(HW))``, the channel
  attention of DANet's channel-attention module; ``"cosine"``: ``A = |cos(F_i, F_j)|``.
- ``reduction="colmean_sigmoid"`` (default): ``m_j = mean_i A_ij`` (how much context channel ``j``
  gives the others), standardised over channels and squashed, ``a = sigmoid((m - mean m) / std m)``,
  so the mean guide is about 0.5 and the CAGS weight ``2 (1 - a)`` averages about 1 (lambda keeps
  its Network-Slimming scale); ``"rowmean_sigmoid"``: the same on ``mean_j A_ij``.

Custom callables ``affinity(F: (N, C, HW)) -> (N, C, C)`` and ``reduction(A) -> (N, C)`` with values
in (0, 1) work too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.nn.compiled import watch_hooks
from workbench.nn.norms import is_affine_norm

Affinity = Callable[[torch.Tensor], torch.Tensor]
Reduction = Callable[[torch.Tensor], torch.Tensor]


def softmax_dot_affinity(f: torch.Tensor) -> torch.Tensor:
    energy = torch.bmm(f, f.transpose(1, 2)) / math.sqrt(f.shape[-1])
    return torch.softmax(energy, dim=-1)


def cosine_affinity(f: torch.Tensor) -> torch.Tensor:
    fn = F.normalize(f, dim=-1, eps=1e-6)
    return torch.bmm(fn, fn.transpose(1, 2)).abs()


def _standardised_sigmoid(m: torch.Tensor) -> torch.Tensor:
    if m.shape[-1] < 2:
        return torch.full_like(m, 0.5)
    z = (m - m.mean(-1, keepdim=True)) / (m.std(-1, keepdim=True) + 1e-6)
    return torch.sigmoid(z)


def colmean_sigmoid(a: torch.Tensor) -> torch.Tensor:
    return _standardised_sigmoid(a.mean(dim=1))


def rowmean_sigmoid(a: torch.Tensor) -> torch.Tensor:
    return _standardised_sigmoid(a.mean(dim=2))


AFFINITIES: dict[str, Affinity] = {"softmax_dot": softmax_dot_affinity, "cosine": cosine_affinity}
REDUCTIONS: dict[str, Reduction] = {"colmean_sigmoid": colmean_sigmoid, "rowmean_sigmoid": rowmean_sigmoid}
ACTIVATIONS = ("relu", "none")


def _pick(value: str | Callable, table: dict[str, Callable], what: str) -> Callable:
    if callable(value):
        return value
    if value not in table:
        raise ValueError(f"{what}={value!r} is not valid; allowed: {tuple(table)} or a callable")
    return table[value]


class CAGM:
    """Context-aware guiding module on one BN layer (a forward hook; no parameters, no forward effect).

    ``guidance`` is the running guiding vector (starts at 0.5 for every channel). With
    ``average="ema"`` each training batch moves it by ``momentum``; with ``average="mean"`` it is the
    plain mean over all batches seen (used by :func:`compute_guidance`). ``train_only`` skips
    forwards in eval mode.
    """

    def __init__(self, bn: nn.Module, affinity: str | Affinity = "softmax_dot",
                 reduction: str | Reduction = "colmean_sigmoid", activation: str = "relu",
                 momentum: float = 0.1, average: str = "ema", train_only: bool = True,
                 max_positions: int | None = 4096) -> None:
        if not is_affine_norm(bn):
            raise ValueError(f"a CAGM sits on an affine BatchNorm layer, got {type(bn).__name__}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not valid; allowed: {ACTIVATIONS}")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum={momentum!r} must be in (0, 1]")
        if average not in ("ema", "mean"):
            raise ValueError(f"average={average!r} is not valid; allowed: ('ema', 'mean')")
        self.affinity = _pick(affinity, AFFINITIES, "affinity")
        self.reduction = _pick(reduction, REDUCTIONS, "reduction")
        self.activation = activation
        self.momentum = momentum
        self.average = average
        self.train_only = train_only
        self.max_positions = max_positions
        self.bn = bn
        self.guidance = torch.full((bn.num_features,), 0.5, device=bn.weight.device)
        self.updates = 0
        watch_hooks()
        self._handle = bn.register_forward_hook(self._hook)

    @torch.no_grad()
    def _hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if self.train_only and not module.training:
            return
        feat = out.detach().float()
        if self.activation == "relu":
            feat = F.relu(feat)
        feat = feat.flatten(2)
        if self.max_positions is not None and feat.shape[-1] > self.max_positions:
            # a strided subsample of positions keeps the C x C product affordable on large maps
            step = math.ceil(feat.shape[-1] / self.max_positions)
            feat = feat[..., ::step]
        batch = self.reduction(self.affinity(feat)).mean(0)
        if batch.shape != self.guidance.shape:
            raise RuntimeError(f"CAGM reduction returned shape {tuple(batch.shape)}, expected "
                               f"{tuple(self.guidance.shape)}")
        guidance = self.guidance.to(batch.device)
        if self.average == "mean":
            guidance = guidance + (batch - guidance) / (self.updates + 1)
        elif self.updates == 0:
            guidance = batch
        else:
            guidance = (1 - self.momentum) * guidance + self.momentum * batch
        self.guidance = guidance
        self.updates += 1

    def weights(self) -> torch.Tensor:
        """CAGS weights ``2 (1 - a)``: in (0, 2), about 1 on average; small for guided channels."""
        return 2.0 * (1.0 - self.guidance)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None


def default_sites(model: nn.Module, every: int = 1) -> list[str]:
    """The model's own CAGM placement (``model.cagm_sites()``), else every ``every``-th affine BN."""
    fn = getattr(model, "cagm_sites", None)
    if callable(fn):
        return list(fn())
    if every < 1:
        raise ValueError(f"every={every!r} must be a positive integer")
    return [n for n, m in model.named_modules() if is_affine_norm(m)][::every]


class CAGMSet:
    """CAGMs on several BN sites of one model; a context manager that removes them on exit."""

    def __init__(self, model: nn.Module, sites: Sequence[str] | None = None, **cagm_options: Any) -> None:
        sites = default_sites(model) if sites is None else list(sites)
        named = dict(model.named_modules())
        bad = [s for s in sites if s not in named or not is_affine_norm(named[s])]
        if bad:
            raise ValueError(f"sites {bad} are not affine BatchNorm layers of {type(model).__name__}")
        self.modules: dict[str, CAGM] = {}
        try:
            for s in sites:
                self.modules[s] = CAGM(named[s], **cagm_options)
        except Exception:
            self.remove()
            raise

    def guidance(self) -> dict[str, torch.Tensor]:
        return {name: m.guidance.detach().cpu().clone() for name, m in self.modules.items()}

    def remove(self) -> None:
        for m in self.modules.values():
            m.remove()

    def __enter__(self) -> CAGMSet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __iter__(self) -> Iterator[tuple[str, CAGM]]:
        return iter(self.modules.items())


def attach_cagms(model: nn.Module, sites: Sequence[str] | None = None, **cagm_options: Any) -> CAGMSet:
    """Attach CAGMs (default placement: :func:`default_sites`); use as ``with attach_cagms(m) as s:``."""
    return CAGMSet(model, sites, **cagm_options)


def _inputs(data: Any) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield data
        return
    if isinstance(data, tuple) and data and all(isinstance(d, torch.Tensor) for d in data) and len(data) == 1:
        yield data[0]
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def compute_guidance(model: nn.Module, data: Any, sites: Sequence[str] | None = None,
                     max_batches: int | None = None, **cagm_options: Any) -> dict[str, torch.Tensor]:
    """Guiding vectors averaged over ``data`` (a tensor, tensors or a loader), eval mode, hooks removed."""
    cagm_options = {**cagm_options, "average": "mean", "train_only": False}
    modes = {m: m.training for m in model.modules()}
    device = next(model.parameters()).device
    model.eval()
    try:
        with attach_cagms(model, sites, **cagm_options) as cagms:
            for i, x in enumerate(_inputs(data)):
                if max_batches is not None and i >= max_batches:
                    break
                model(x.to(device))
            return cagms.guidance()
    finally:
        for m, mode in modes.items():
            m.training = mode
