"""Channel importance from BN scales, for Torch-Pruning groups.

Torch-Pruning's ``BNScaleImportance`` only scores layers pruned by its own batch-norm function, so
a BatchNorm subclass with a registered custom pruner (IEBN) would score nothing and nothing would be
pruned. :class:`EffectiveScaleImportance` recognises every ``_BatchNorm`` in a group whatever its
pruner, and scores a channel by its *effective* scale:

- BN: ``|gamma_c|`` (Network Slimming);
- IEBN: ``|gamma_c| * mean_n a_{n,c}``, the mean of the instance gate over data (docs/methods.md, *Network Slimming*),
  when a per-layer mean attention is given (:func:`iebn_mean_attention`);
- CAP (``guidance``): at CAGM sites the score is further multiplied by ``g_c / mean_c(g)``, the
  layer-normalised context guiding vector, so the context that steered the sparsity during CAGS
  training also ranks channels at pruning time (a project choice; the paper gives no formula).

Coupled layers (residual additions, SegNet's pooling pairs) put several BNs in one group; their
per-channel scores are averaged (``group_reduction="mean"``; ``"max"`` and ``"sum"`` also work).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from workbench.nn.compiled import watch_hooks
from workbench.nn.norms import is_affine_norm, is_iebn

# ``is_norm`` here has always meant "an affine normalisation layer" (what pruning can score).
is_norm = is_affine_norm

GROUP_REDUCTIONS = ("mean", "max", "sum")


def effective_scale(bn: nn.Module, attention: torch.Tensor | None = None,
                    guidance: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel ``|gamma|`` (times the mean IEBN gate and the normalised guidance when given)."""
    score = bn.weight.detach().abs().flatten().float()
    if attention is not None:
        score = score * attention.detach().to(score.device).flatten().float()
    if guidance is not None:
        g = guidance.detach().to(score.device).flatten().float()
        score = score * g / g.mean().clamp_min(1e-12)
    return score


class EffectiveScaleImportance(tp.importance.Importance):
    """Torch-Pruning importance: effective BN scale of each channel in a group (None if no BN)."""

    def __init__(self, attention: dict[nn.Module, torch.Tensor] | None = None,
                 guidance: dict[nn.Module, torch.Tensor] | None = None, group_reduction: str = "mean") -> None:
        if group_reduction not in GROUP_REDUCTIONS:
            raise ValueError(f"group_reduction={group_reduction!r} is not valid; allowed: {GROUP_REDUCTIONS}")
        self.attention = attention or {}
        self.guidance = guidance or {}
        self.group_reduction = group_reduction

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        n_root = len(group[0].idxs)
        total = torch.zeros(n_root)
        count = torch.zeros(n_root)
        best = torch.full((n_root,), -float("inf"))
        seen = set()
        for item in group:
            layer = item.dep.target.module
            if not is_affine_norm(layer) or layer in seen:
                continue
            root_idxs = item.root_idxs
            if any(r is None for r in root_idxs):
                continue
            seen.add(layer)
            score = effective_scale(layer, self.attention.get(layer), self.guidance.get(layer)).cpu()
            local = score[torch.as_tensor(item.idxs, dtype=torch.long)]
            where = torch.as_tensor(root_idxs, dtype=torch.long)
            total.index_add_(0, where, local)
            count.index_add_(0, where, torch.ones_like(local))
            best[where] = torch.maximum(best[where], local)
        if not seen:
            return None
        if self.group_reduction == "max":
            out = torch.where(count > 0, best, torch.zeros_like(best))
        elif self.group_reduction == "sum":
            out = total
        else:
            out = total / count.clamp_min(1)
        # channels no BN covers cannot be ranked by a BN scale: never prune them
        return torch.where(count > 0, out, torch.full_like(out, float("inf")))


def _batches(data: Any) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield data
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _iebn_gate(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``sigmoid(attn_weight * GAP(x) + attn_bias)`` per sample and channel, ``(N, C)`` (docs/methods.md, *IEBN*)."""
    gap = x.float().mean(dim=(2, 3))
    w = layer.attn_weight.detach().float().reshape(1, -1)
    b = layer.attn_bias.detach().float().reshape(1, -1)
    return torch.sigmoid(w * gap + b)


@torch.no_grad()
def iebn_mean_attention(model: nn.Module, data: Any, device: str | torch.device | None = None,
                        max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Mean IEBN gate per channel over the samples of ``data``, for every IEBN layer (by name).

    ``data`` is one input tensor, an iterable of tensors or a loader of ``(inputs, targets)``; the
    model runs in eval mode (running statistics; the gate stays per sample) and its modes are
    restored. Returns an empty dict for a model without IEBN.
    """
    names = {m: n for n, m in model.named_modules() if is_iebn(m)}
    if not names:
        return {}
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches={max_batches!r} must be a positive integer or None")
    if device is None:
        device = next(model.parameters()).device
    sums = {m: torch.zeros(m.num_features, dtype=torch.float64) for m in names}
    count = 0

    def input_hook(layer: nn.Module, args: tuple, _out: Any) -> None:
        sums[layer] += _iebn_gate(layer, args[0]).sum(0).double().cpu()

    def probe_hook(layer: nn.Module) -> Callable:
        def hook(_probe: nn.Module, _args: tuple, gate: torch.Tensor) -> None:
            sums[layer] += gate.detach().double().sum(0).cpu()
        return hook

    def attach(layer: nn.Module) -> Any:
        # the layer's own probe sees the gate it really used; else recompute it from the input
        probe = getattr(layer, "attention_probe", None)
        if isinstance(probe, nn.Module):
            return probe.register_forward_hook(probe_hook(layer))
        return layer.register_forward_hook(input_hook)

    modes = {m: m.training for m in model.modules()}
    watch_hooks()
    handles = [attach(m) for m in names]
    model.eval()
    try:
        for i, x in enumerate(_batches(data)):
            if max_batches is not None and i >= max_batches:
                break
            model(x.to(device))
            count += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    if count == 0:
        raise ValueError("iebn_mean_attention got no batches")
    return {names[m]: (s / count).float() for m, s in sums.items()}
