"""Fold eval-mode BatchNorm into the convolution that feeds it: the form a network is deployed in.

At inference a BN is a per-channel affine map, so ``bn(conv(x))`` equals one convolution with
rescaled weights and a bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``). Eager PyTorch does not
do this by itself; inference engines (TensorRT, ONNX Runtime, inductor's freezing) do. Timing
unfolded networks charges every model for a memory pass per BN that a deployed one never makes.

The Conv -> BN pairs are found by running the model once, not by symbolic tracing (``torch.fx``
cannot trace forwards that read shapes, e.g. ICNet's resizes): a BN folds into a convolution when
its input is that convolution's output tensor, unmodified since (version counter), and each module
ran exactly once. A conv output that also feeds another layer would be changed for that layer
too, which the closing check (folded and original outputs must agree) catches.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from workbench.nn.compiled import watch_hooks

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# exact types only: a subclass (IEBN) adds behaviour a per-channel affine map does not capture
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _as_args(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def _conv_bn_pairs(model: nn.Module, args: tuple) -> list[tuple[str, str]]:
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[nn.Module, torch.Tensor, int]] = {}
    calls: Counter = Counter()
    candidates: list[tuple[nn.Module, nn.Module]] = []

    def conv_hook(module: nn.Module, _inputs: tuple, out: Any) -> None:
        calls[module] += 1
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (module, out, out._version)  # holding ``out`` keeps its id unique

    def norm_hook(module: nn.Module, inputs: tuple) -> None:
        calls[module] += 1
        hit = produced.get(id(inputs[0])) if inputs else None
        if hit is not None and hit[1] is inputs[0] and hit[1]._version == hit[2]:
            candidates.append((hit[0], module))

    watch_hooks()
    handles = []
    for m in model.modules():
        if type(m) in _CONVS:
            handles.append(m.register_forward_hook(conv_hook))
        elif type(m) in _NORMS and m.track_running_stats:
            handles.append(m.register_forward_pre_hook(norm_hook))
    try:
        with torch.no_grad():  # not inference_mode: inference tensors have no version counter
            model(*args)
    finally:
        for h in handles:
            h.remove()
    per_conv = Counter(conv for conv, _ in candidates)
    return [(names[c], names[b]) for c, b in candidates
            if calls[c] == 1 and calls[b] == 1 and per_conv[c] == 1]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def fold_batchnorm(model: nn.Module, example_inputs: Any, rtol: float = 1e-3) -> nn.Module:
    """An eval-mode copy of ``model`` with every foldable BN merged into its convolution.

    Args:
        model: any module; it is not modified.
        example_inputs: a tensor (or tuple of tensors) the model accepts, used to find the Conv -> BN
            pairs and to check the folded copy against the original.
        rtol: the largest allowed ``max|folded - original| / max|original|`` over the outputs.

    Raises:
        ValueError: bad ``rtol`` or ``example_inputs``.
        RuntimeError: the folded copy computes something else (a conv output feeding more than its BN).
    """
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0:
        raise ValueError(f"rtol={rtol!r} must be a positive number")
    args = _as_args(example_inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise ValueError("example_inputs must be a tensor (or a tuple of tensors) the model accepts, "
                         f"got {type(example_inputs).__name__}")
    folded = copy.deepcopy(model).eval()
    pairs = _conv_bn_pairs(folded, args)
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        _set(folded, conv_name, fuse_conv_bn_eval(conv, bn))
        _set(folded, bn_name, nn.Identity())
    was_training = {m: m.training for m in model.modules()}
    tf32 = torch.backends.cudnn.allow_tf32
    model.eval()
    try:
        # TF32 convolutions (cuDNN's default) would blur a real mismatch into rounding noise
        torch.backends.cudnn.allow_tf32 = False
        with torch.no_grad():
            expected, got = _flat(model(*args)), _flat(folded(*args))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        for m, mode in was_training.items():
            m.training = mode
    for e, g in zip(expected, got, strict=True):
        err = (g - e).abs().max().item() / max(e.abs().max().item(), 1e-12)
        if not err <= rtol:
            raise RuntimeError(f"folding {len(pairs)} Conv->BN pairs changed the output (relative error "
                               f"{err:.2e} > rtol={rtol}): a folded convolution's output feeds another layer")
    return folded
