"""Model converters: BatchNorm2d -> IEBN2d in any model, and IEBN-aware SyncBatchNorm conversion."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch.distributed as dist
from torch import nn

from workbench.nn.iebn import IEBN2d
from workbench.nn.sync import SyncBatchNorm2d, SyncIEBN2d

SkipSpec = Iterable[str] | Callable[[str, nn.Module], bool] | None


def _skip_predicate(skip: SkipSpec) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, module: False
    if callable(skip):
        return skip
    if isinstance(skip, str):
        raise ValueError(f"skip={skip!r} is not valid; allowed: None, an iterable of module names, or a "
                         "callable (name, module) -> bool")
    names = set(skip)
    return lambda name, module: name in names


def _replace_children(module: nn.Module, convert: Callable[[str, nn.Module], nn.Module | None],
                      prefix: str = "", memo: dict[int, nn.Module] | None = None) -> None:
    memo = {} if memo is None else memo
    # _modules, not named_children(): the latter yields a module shared by two slots only once.
    for child_name, child in list(module._modules.items()):
        if child is None:
            continue
        name = f"{prefix}.{child_name}" if prefix else child_name
        if id(child) in memo:
            # A module shared by two parents stays shared after the conversion.
            setattr(module, child_name, memo[id(child)])
            continue
        new = convert(name, child)
        if new is not None:
            memo[id(child)] = new
            setattr(module, child_name, new)
        else:
            memo[id(child)] = child
            _replace_children(child, convert, name, memo)


def _check_module(module: object) -> None:
    if not isinstance(module, nn.Module):
        raise ValueError(f"module={type(module).__name__} is not valid; allowed: an nn.Module")


def _convert_tree(module: nn.Module, convert) -> nn.Module:
    """``convert`` the root if it converts (its replacement is returned), else every descendant in place."""
    root = convert("", module)
    if root is not None:
        return root
    _replace_children(module, convert)
    return module


def convert_bn_to_iebn(module: nn.Module, skip: SkipSpec = None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` (in place) by :class:`IEBN2d` and return it.

    Works on any model (torchvision's included). Each IEBN2d takes over its BN's configuration,
    affine parameters and running statistics (same tensors, so device, dtype and an existing
    optimiser's references are kept); the gate parameters start at their init (w=0, b=-1).
    ``skip``: qualified module names to leave as plain BN, or a predicate ``(name, module) -> bool``.
    Already-IEBN layers and ``SyncBatchNorm`` are left alone. If ``module`` itself is a BatchNorm2d,
    the new IEBN2d is returned.
    """
    _check_module(module)
    should_skip = _skip_predicate(skip)

    def convert(name: str, child: nn.Module) -> nn.Module | None:
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, IEBN2d) and not should_skip(name, child):
            return IEBN2d.from_batchnorm(child)
        return None

    return _convert_tree(module, convert)


def _on_cuda(module: nn.Module) -> bool:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return tensor is not None and tensor.is_cuda


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, but IEBN-aware: every :class:`IEBN2d`
    becomes a :class:`SyncIEBN2d` (attention parameters kept), every other ``_BatchNorm`` an
    ``nn.SyncBatchNorm`` -- except a ``BatchNorm2d`` on the CPU, which becomes a
    :class:`SyncBatchNorm2d` (torch's layer refuses CPU modules; move the model to its device
    before converting). Converts in place where it can and returns the module.

    Use this rather than torch's function on IEBN models: torch's rebuilds every ``_BatchNorm`` as
    a plain ``SyncBatchNorm`` and silently drops ``attn_weight``/``attn_bias``.
    """
    _check_module(module)

    def convert(name: str, child: nn.Module) -> nn.Module | None:
        if isinstance(child, SyncIEBN2d | nn.SyncBatchNorm | SyncBatchNorm2d):
            return None
        if isinstance(child, IEBN2d):
            return SyncIEBN2d.from_iebn(child, process_group)
        if isinstance(child, nn.BatchNorm2d) and not _on_cuda(child):
            # torch's SyncBatchNorm refuses CPU modules; ours pools the same way over gloo
            return SyncBatchNorm2d.from_batchnorm(child, process_group)
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            return nn.SyncBatchNorm.convert_sync_batchnorm(child, process_group)
        return None

    return _convert_tree(module, convert)
