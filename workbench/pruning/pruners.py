"""Torch-Pruning layer pruners for the workbench's own layers.

Torch-Pruning's batch-norm pruner cuts ``weight``, ``bias`` and the running statistics only. A
BatchNorm subclass with more per-channel tensors (IEBN's ``attn_weight``/``attn_bias``) needs its
own pruner or the pruned model fails at its first forward; :class:`PerChannelNormPruner` cuts
*every* parameter and buffer of shape ``(C,)`` along the channel axis, so it serves IEBN and any
similar norm layer without knowing their attribute names.

:class:`DIAPruner` treats a DIA-LSTM cell (one cell shared by all blocks of a stage) as a single
node whose input and output channels are the stage's channels: pruning channel ``c`` removes
input feature ``c`` of both first-layer transforms and rows ``c, C+c, 2C+c, 3C+c`` (the i, f, g, o
gate chunks) of both second-layer transforms, so the gates stay aligned. The bottleneck width
``C/4`` of the transforms is left alone: it carries no BN scale to rank it by.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn


def _keep(n: int, idxs: Sequence[int]) -> list[int]:
    drop = set(int(i) for i in idxs)
    return [i for i in range(n) if i not in drop]


def _select(t: torch.Tensor, keep: list[int], dim: int = 0) -> torch.Tensor:
    return torch.index_select(t.data, dim, torch.as_tensor(keep, device=t.device, dtype=torch.long)).contiguous()


class PerChannelNormPruner(tp.pruner.BasePruningFunc):
    """Prune a BatchNorm-like layer: every ``(num_features,)`` parameter and buffer loses the channels."""

    TARGET_MODULES = (nn.modules.batchnorm._BatchNorm,)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        n = layer.num_features
        keep = _keep(n, idxs)
        for name, param in list(layer.named_parameters(recurse=False)):
            if param.dim() >= 1 and param.shape[0] == n:
                new = nn.Parameter(_select(param, keep), requires_grad=param.requires_grad)
                setattr(layer, name, new)
        for name, buf in list(layer.named_buffers(recurse=False)):
            if buf is not None and buf.dim() >= 1 and buf.shape[0] == n:
                setattr(layer, name, _select(buf, keep))
        layer.num_features = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.num_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.num_features


def _linear_rows(layer: nn.Linear | nn.Conv2d, keep: list[int]) -> None:
    layer.weight = nn.Parameter(_select(layer.weight, keep, 0))
    if layer.bias is not None:
        layer.bias = nn.Parameter(_select(layer.bias, keep, 0))
    if isinstance(layer, nn.Linear):
        layer.out_features = len(keep)
    else:
        layer.out_channels = len(keep)


def _linear_cols(layer: nn.Linear | nn.Conv2d, keep: list[int]) -> None:
    layer.weight = nn.Parameter(_select(layer.weight, keep, 1))
    if isinstance(layer, nn.Linear):
        layer.in_features = len(keep)
    else:
        layer.in_channels = len(keep)


def _first_last(transform: nn.Module) -> tuple[nn.Module, nn.Module]:
    """First and last Linear/Conv of a transform (a bare layer or a small Sequential MLP)."""
    layers = [m for m in transform.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))]
    if not layers:
        raise TypeError(f"no Linear/Conv layer found in DIA transform {type(transform).__name__}")
    return layers[0], layers[-1]


class DIAPruner(tp.pruner.BasePruningFunc):
    """Prune a DIA-LSTM cell's stage channels consistently across its input/hidden transforms.

    The cell exposes its two transforms ``phi_ih`` and ``phi_hh`` (``workbench.nn.DIALSTMCell``:
    ``Linear(C, C/r) -> ReLU -> Linear(C/r, 4C)`` each), or the names given in ``transforms``. Any
    other ``(C,)`` or ``(4C,)`` parameter of the cell is pruned along the same channel map.
    """

    def __init__(self, transforms: Sequence[str] = ("phi_ih", "phi_hh")) -> None:
        super().__init__()
        self.transforms = tuple(transforms)

    def _parts(self, cell: nn.Module) -> list[nn.Module]:
        parts = [getattr(cell, name, None) for name in self.transforms]
        if any(p is None for p in parts):
            raise TypeError(f"DIA cell {type(cell).__name__} lacks one of {self.transforms}")
        return parts

    def get_out_channels(self, cell: nn.Module) -> int:
        first, _ = _first_last(self._parts(cell)[0])
        return first.in_features if isinstance(first, nn.Linear) else first.in_channels

    get_in_channels = get_out_channels

    def prune_out_channels(self, cell: nn.Module, idxs: Sequence[int]) -> nn.Module:
        channels = self.get_out_channels(cell)
        keep = _keep(channels, idxs)
        keep4 = [k + g * channels for g in range(4) for k in keep]
        for part in self._parts(cell):
            first, last = _first_last(part)
            _linear_cols(first, keep)
            _linear_rows(last, keep4)
        transform_params = {id(p) for part in self._parts(cell) for p in part.parameters()}
        for name, param in list(cell.named_parameters(recurse=False)):
            if id(param) in transform_params or param.dim() < 1:
                continue
            if param.shape[0] == 4 * channels:
                setattr(cell, name, nn.Parameter(_select(param, keep4)))
            elif param.shape[0] == channels:
                setattr(cell, name, nn.Parameter(_select(param, keep)))
        for attr in ("channels", "num_features", "hidden_size", "input_size"):
            if isinstance(getattr(cell, attr, None), int) and getattr(cell, attr) == channels:
                setattr(cell, attr, len(keep))
        return cell

    prune_in_channels = prune_out_channels


def default_customized_pruners(model: nn.Module) -> dict[type, tp.pruner.BasePruningFunc]:
    """Pruners for the layer types in ``model`` that Torch-Pruning's built-ins would cut wrongly.

    Every BatchNorm subclass that carries extra ``(C,)`` tensors (IEBN) gets
    :class:`PerChannelNormPruner`; DIA-LSTM cells get :class:`DIAPruner`.
    """
    pruners: dict[type, tp.pruner.BasePruningFunc] = {}
    norm_pruner = PerChannelNormPruner()
    for m in model.modules():
        cls = type(m)
        if cls in pruners:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and _has_extra_channel_tensors(m):
            pruners[cls] = norm_pruner
        elif is_dia_cell(m):
            pruners[cls] = DIAPruner()
    return pruners


_BN_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def _has_extra_channel_tensors(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    names = [n for n, _ in bn.named_parameters(recurse=False)] + [n for n, _ in bn.named_buffers(recurse=False)]
    return any(n not in _BN_TENSORS for n in names)


def is_dia_cell(m: nn.Module) -> bool:
    """A DIA-LSTM cell: a module with both transforms ``phi_ih`` and ``phi_hh`` (``DIALSTMCell``)."""
    return isinstance(getattr(m, "phi_ih", None), nn.Module) and isinstance(getattr(m, "phi_hh", None), nn.Module)
