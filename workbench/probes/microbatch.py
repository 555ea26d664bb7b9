"""Micro-batch gradients: a batch split into ``k`` micro-batches, one gradient each, every
micro-batch normalised with its own batch statistics (ghost batches; docs/methods.md, *Micro-batch gradients*).

The vectorised path runs ``torch.func.vmap`` over ``torch.func.grad`` of a ``functional_call`` on a
*probe copy* of the model: a deep copy with its batch norms made functional
(``torch.func.replace_all_batch_norm_modules_``: batch statistics always, running statistics
dropped), so vmap can run and the real model's running statistics are never touched. The copy
also loses instrumentation that would misbehave or leak through it: instance ``forward`` patches
(noise hooks), ``stat_transform`` hooks, forward/backward hooks (recorders). The probes therefore
measure the uninstrumented network at the real model's current weights, which are passed in on
every call (the copy's own parameters are never used).

:func:`micro_batch_gradients_loop` is the reference: a Python loop of ordinary autograd passes on a
plain deep copy in training mode. Both return ``{parameter name: (k, *shape)}``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

from workbench.nn.compiled import unwrap_model

LossFn = Callable[[Any, Tensor], Tensor]


def strip_instrumentation(model: nn.Module) -> nn.Module:
    """Remove instance ``forward`` patches, ``stat_transform`` hooks and module hooks in place."""
    for module in model.modules():
        vars(module).pop("forward", None)
        if getattr(module, "stat_transform", None) is not None:
            module.stat_transform = None
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            hooks = getattr(module, attr, None)
            if hooks is not None:
                hooks.clear()
    return model


def probe_copy(model: nn.Module) -> nn.Module:
    """A training-mode deep copy for functional probing (see the module docstring)."""
    clone = copy.deepcopy(unwrap_model(model, parallel=False))
    strip_instrumentation(clone)
    for p in clone.parameters():
        p.grad = None
        p.requires_grad_(False)
    replace_all_batch_norm_modules_(clone)
    return clone.train()


def _signature(model: nn.Module) -> tuple:
    return tuple((n, tuple(p.shape), p.dtype, p.device) for n, p in model.named_parameters())


class ProbeCopy:
    """Keeps one probe copy per model and rebuilds it when the parameter set changes (pruning)."""

    def __init__(self) -> None:
        self._clone: nn.Module | None = None
        self._sig: tuple | None = None

    def get(self, model: nn.Module) -> nn.Module:
        model = unwrap_model(model, parallel=False)
        sig = _signature(model)
        if self._clone is None or sig != self._sig:
            self._clone, self._sig = probe_copy(model), sig
        return self._clone


def split_params(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(trainable, other) detached parameter/buffer tensors of the real model for ``functional_call``.

    Buffers the probe copy dropped (running statistics) are left out; the copy then uses batch
    statistics.
    """
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    return trainable, frozen


def _buffers_for(clone: nn.Module, model: nn.Module) -> dict[str, Tensor]:
    kept = {n for n, b in clone.named_buffers() if b is not None}
    return {n: b for n, b in model.named_buffers() if n in kept}


def check_micro_batches(batch: int, micro_batches: int) -> int:
    """Micro-batch size for splitting ``batch`` samples into ``micro_batches`` (the remainder is
    dropped)."""
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 2:
        raise ValueError(f"micro_batches={micro_batches!r} is not valid; allowed: an integer >= 2")
    if batch < micro_batches:
        raise ValueError(f"micro_batches={micro_batches} is not valid for a batch of {batch}; allowed: 2..{batch}")
    return batch // micro_batches


def check_compiled(compiled: bool) -> bool:
    if not isinstance(compiled, bool):
        raise ValueError(f"compiled={compiled!r} is not valid; allowed: True, False")
    return compiled


def _vmapped_gradients(clone: nn.Module, trainable: dict[str, Tensor], rest: dict[str, Tensor], xs: Tensor,
                       ys: Tensor, loss_fn: LossFn, chunk_size: int | None) -> dict[str, Tensor]:
    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(clone, {**params, **rest}, (x,)), y)

    return vmap(grad(loss), in_dims=(None, 0, 0), randomness="different", chunk_size=chunk_size)(trainable, xs, ys)


def _whole_gradient(clone: nn.Module, trainable: dict[str, Tensor], rest: dict[str, Tensor], x: Tensor, y: Tensor,
                    loss_fn: LossFn) -> dict[str, Tensor]:
    def loss(params: dict[str, Tensor]) -> Tensor:
        return loss_fn(functional_call(clone, {**params, **rest}, (x,)), y)

    return grad(loss)(trainable)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # one compiled wrapper per function for the whole process, so every probe shares dynamo's cache
    return torch.compile(fn)


def micro_batch_gradients(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn, micro_batches: int,
                          clone: nn.Module | None = None, chunk_size: int | None = None,
                          compiled: bool = False) -> dict[str, Tensor]:
    """Gradients of ``loss_fn`` on ``micro_batches`` equal micro-batches of ``inputs``, in one
    vectorised pass; ``{name: (k, *param.shape)}`` for every trainable parameter.

    ``clone``: a :func:`probe_copy` of ``model`` to reuse (built when ``None``). ``chunk_size``
    bounds how many micro-batches vmap evaluates at once (memory). ``compiled``: run the pass
    through ``torch.compile`` (see the module docstring).
    """
    b = check_micro_batches(inputs.shape[0], micro_batches)
    check_compiled(compiled)
    model = unwrap_model(model, parallel=False)
    k = micro_batches
    clone = clone if clone is not None else probe_copy(model)
    trainable, frozen = split_params(model)
    rest = {**frozen, **_buffers_for(clone, model)}
    xs = inputs[: k * b].reshape(k, b, *inputs.shape[1:])
    ys = targets[: k * b].reshape(k, b, *targets.shape[1:])
    run = _compiled(_vmapped_gradients) if compiled else _vmapped_gradients
    return run(clone, trainable, rest, xs, ys, loss_fn, chunk_size)


def batch_gradient(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn,
                   clone: nn.Module | None = None, compiled: bool = False) -> dict[str, Tensor]:
    """Gradient of ``loss_fn`` on the whole of ``inputs``, normalised together, on the probe copy
    (the real model's gradients and running statistics are untouched)."""
    check_compiled(compiled)
    model = unwrap_model(model, parallel=False)
    clone = clone if clone is not None else probe_copy(model)
    trainable, frozen = split_params(model)
    rest = {**frozen, **_buffers_for(clone, model)}
    run = _compiled(_whole_gradient) if compiled else _whole_gradient
    return run(clone, trainable, rest, inputs, targets, loss_fn)


def micro_batch_gradients_loop(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn,
                               micro_batches: int, clone: nn.Module | None = None) -> dict[str, Tensor]:
    """The reference for :func:`micro_batch_gradients`: one ordinary autograd pass per
    micro-batch on a plain training-mode deep copy (``clone``, built when ``None``; its running
    statistics advance, the real model's do not)."""
    b = check_micro_batches(inputs.shape[0], micro_batches)
    model = unwrap_model(model, parallel=False)
    if clone is None:
        clone = strip_instrumentation(copy.deepcopy(model))
    clone.train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for (_, dst), (_, src) in zip(clone.named_parameters(), model.named_parameters()):
            dst.copy_(src)
    params = dict(clone.named_parameters())
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for i in range(micro_batches):
        sl = slice(i * b, (i + 1) * b)
        grads = torch.autograd.grad(loss_fn(clone(inputs[sl]), targets[sl]), [params[n] for n in names],
                                    allow_unused=True)
        for n, g in zip(names, grads):
            out[n].append(torch.zeros_like(params[n]) if g is None else g)
    return {n: torch.stack(gs) for n, gs in out.items()}


def flat_norm_sq(grads: dict[str, Tensor], dim0: bool = False) -> Tensor:
    """Squared L2 norm over all parameters; with ``dim0`` one value per leading index."""
    if dim0:
        return sum(g.reshape(g.shape[0], -1).double().square().sum(1) for g in grads.values())
    return sum(g.double().square().sum() for g in grads.values())
