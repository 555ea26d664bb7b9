"""Fit and evaluate loops for classification and segmentation, with callbacks and checkpoints.

The loop is deliberately small: everything an experiment wants to observe or change during training
(noise schedules, probes, sparsity subgradients, recorders) plugs in as a :class:`Callback` and sees
the whole :class:`TrainState`. History comes back as plain data (a list of dicts, one per epoch).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.callbacks import Callback
from workbench.device import autocast_dtype, resolve_device
from workbench.io import atomic_open
from workbench.nn.compiled import unwrap_model, watch_hooks

TASKS = ("classification", "segmentation")


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    task: str
    loss_fn: Callable
    amp_dtype: torch.dtype | None = None
    epoch: int = 0
    step: int = 0
    inputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    outputs: Any = None
    loss: torch.Tensor | None = None
    history: list[dict] = field(default_factory=list)
    logs: dict = field(default_factory=dict)
    step_log: list[dict] = field(default_factory=list)
    stop: bool = False


@dataclass
class FitResult:
    history: list[dict]
    step_log: list[dict]
    model: nn.Module

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


class _Unset:
    """The default of :func:`fit`'s loop keywords: not given, so the value comes from :class:`FitOptions`."""

    def __repr__(self) -> str:
        return "<FitOptions default>"


_UNSET: Any = _Unset()
SCHEDULER_INTERVALS = ("epoch", "step")


@dataclass(frozen=True)
class FitOptions:
    """How :func:`fit` runs its loop: length, scheduler interval, clipping, precision and memory
    layout, compilation, checkpoints, progress and logging.

    What is trained (model, data, optimiser, scheduler, loss, task) and where (``device``) stay
    arguments of :func:`fit`; the options are plain values, so one ``FitOptions`` can be kept,
    compared, printed and varied with :func:`dataclasses.replace`. Pass it as
    ``fit(model, train_loader, val_loader, options=FitOptions(...))``, or give the same names as
    keywords of :func:`fit` (not both). A value of the wrong type or out of range raises
    ``ValueError`` naming the field when the options are built, before any training; ``amp`` is
    checked against the device when :func:`fit` starts.

    Attributes:
        epochs: passes over the training loader, a non-negative integer (0 trains nothing).
        max_steps: stop once this many optimiser steps have run in total (a resumed run counts the
            steps before it), even mid-epoch; the shortened epoch is still validated, recorded and
            checkpointed. ``None``: no limit.
        scheduler_interval: ``"epoch"`` steps the scheduler once after each epoch, ``"step"`` after
            each optimiser step.
        grad_clip: clip the total L2 norm of the gradients to this value after the callbacks'
            ``on_after_backward`` and before the optimiser step; ``None``: no clipping.
        amp: autocast precision, as :func:`workbench.device.autocast_dtype` takes it (``"off"``,
            ``"auto"``, ``"bf16"``, ``"fp16"`` or a bool); fp16 runs with a gradient scaler.
        channels_last: the model's parameters and every 4-d input batch in the channels-last memory
            format (the layout of the tensor cores' convolutions); validation runs in it too.
        compile: train through ``torch.compile(model)`` (eager GPU steps are bound by kernel
            launches: an IEBN ResNet-164 step costs 2.3-2.8x a BN step on an H100, a compiled IEBN
            layer 1.14-1.30x a compiled BN layer). Only the training forward runs compiled (the first
            steps compile); callbacks, checkpoints, validation and :class:`FitResult` see the plain
            model, and hooks added or removed on it during training reach the compiled graph
            (dynamo's hook guards are turned on, :func:`workbench.nn.compiled.watch_hooks`).
        checkpoint_dir: folder of the checkpoint ``last.pt`` (model, optimiser, scheduler, callbacks,
            history, step, RNG state), written atomically after every epoch; ``None``: no checkpoint.
        resume: continue from ``checkpoint_dir``'s ``last.pt`` when it exists (from scratch when it
            does not); needs ``checkpoint_dir``.
        write_checkpoints: whether this process writes the checkpoint (under DDP only rank 0 does;
            every rank reads it on resume).
        progress: a tqdm bar per epoch, showing the batch loss.
        log_every: append ``{"step", "epoch", "loss", "lr"}`` and the callbacks' ``state.logs`` to the
            step log every this many optimiser steps.

    :func:`workbench.device.resolve_acceleration` gives the device's defaults for ``amp``,
    ``channels_last`` and ``compile``.
    """

    epochs: int = 1
    max_steps: int | None = None
    scheduler_interval: str = "epoch"
    grad_clip: float | None = None
    amp: str | bool = "off"
    channels_last: bool = False
    compile: bool = False
    checkpoint_dir: str | os.PathLike | None = None
    resume: bool = False
    write_checkpoints: bool = True
    progress: bool = True
    log_every: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile={self.compile!r} is not valid; allowed: True, False")
        _check_channels_last(self.channels_last)
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs={self.epochs!r} must be a non-negative integer")
        if self.scheduler_interval not in SCHEDULER_INTERVALS:
            raise ValueError(f"scheduler_interval={self.scheduler_interval!r}; allowed: 'epoch', 'step'")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        _check_positive_int("max_steps", self.max_steps, nullable=True)
        _check_positive_int("log_every", self.log_every, nullable=False)
        clip = self.grad_clip
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
            # clip_grad_norm_ to 0 would silently zero every gradient
            raise ValueError(f"grad_clip={self.grad_clip!r} is not valid; allowed: None or a number > 0")

    @property
    def checkpoint_path(self) -> Path | None:
        """``checkpoint_dir/last.pt``, or ``None`` without a checkpoint folder."""
        return Path(self.checkpoint_dir) / "last.pt" if self.checkpoint_dir else None


def _check_positive_int(name: str, value: Any, nullable: bool) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "None or an integer >= 1" if nullable else "an integer >= 1"
        raise ValueError(f"{name}={value!r} is not valid; allowed: {allowed}")


# ----------------------------------------------------------------------------------------------
# Outputs and losses


def main_output(outputs: Any) -> torch.Tensor:
    """The main logits of a model output: a tensor, ``{"out": ...}`` or a ``(main, *aux)`` tuple."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        return outputs["out"]
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    raise TypeError(f"cannot find the logits in a model output of type {type(outputs).__name__}")


def aux_outputs(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, dict):
        aux = outputs.get("aux", [])
        return list(aux) if isinstance(aux, (list, tuple)) else [aux]
    if isinstance(outputs, (tuple, list)):
        return list(outputs[1:])
    return []


def default_loss_fn(task: str, ignore_index: int = 255, aux_weight: float = 0.4) -> Callable:
    """Cross entropy on the main logits plus ``aux_weight`` times each auxiliary head's loss.

    Auxiliary logits at a lower resolution are upsampled to the label size, as PSPNet/ICNet do.
    """

    def loss_fn(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        kwargs = {"ignore_index": ignore_index} if task == "segmentation" else {}
        loss = F.cross_entropy(_match_size(main_output(outputs), targets), targets, **kwargs)
        for aux in aux_outputs(outputs):
            loss = loss + aux_weight * F.cross_entropy(_match_size(aux, targets), targets, **kwargs)
        return loss

    return loss_fn


def _match_size(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if logits.dim() == 4 and logits.shape[-2:] != targets.shape[-2:]:
        return F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    return logits


# ----------------------------------------------------------------------------------------------
# Metrics


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int,
                     ignore_index: int | None = None) -> torch.Tensor:
    """``(num_classes, num_classes)`` counts, rows = true class, columns = prediction."""
    preds, targets = preds.reshape(-1), targets.reshape(-1)
    if ignore_index is not None:
        keep = targets != ignore_index
        preds, targets = preds[keep], targets[keep]
    index = targets.to(torch.int64) * num_classes + preds.to(torch.int64)
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def metrics_from_confusion(conf: torch.Tensor, task: str) -> dict:
    conf = conf.double()
    total = conf.sum().item()
    correct = conf.diag().sum().item()
    out = {"acc": correct / total if total else float("nan")}
    if task == "segmentation":
        inter = conf.diag()
        union = conf.sum(0) + conf.sum(1) - inter
        present = union > 0
        iou = torch.where(present, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))
        out["miou"] = iou[present].mean().item() if present.any() else float("nan")
        out["per_class_iou"] = [None if math.isnan(v) else v for v in iou.tolist()]
        out["pixel_acc"] = out["acc"]
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "auto",
             task: str = "classification", num_classes: int | None = None, ignore_index: int = 255,
             loss_fn: Callable | None = None, amp: str | bool = "off",
             return_confusion: bool = False, progress: bool = False, channels_last: bool = False) -> dict:
    """Top-1 accuracy (classification) or pixel accuracy, mIoU and per-class IoU (segmentation).

    The confusion matrix is accumulated over the whole split before IoU is taken, as the
    Cityscapes benchmark does; pixels labelled ``ignore_index`` are skipped. ``amp`` and
    ``channels_last`` as in :class:`FitOptions` (``channels_last`` also converts the model's parameters).
    """
    _check_task(task)
    device = resolve_device(device)
    loss_fn = loss_fn or default_loss_fn(task, ignore_index)
    was_training = model.training
    model.eval()
    _check_channels_last(channels_last)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    dtype = autocast_dtype(device, amp)
    conf = None
    loss_sum, count = 0.0, 0
    try:
        for inputs, targets in _progress(loader, progress, "eval"):
            inputs, targets = _to_device(inputs, device, channels_last), targets.to(device, non_blocking=True)
            with _autocast(device, dtype):
                outputs = model(inputs)
            logits = _match_size(main_output(outputs), targets).float()
            if num_classes is None:
                num_classes = logits.shape[1]
            loss_sum += float(loss_fn(logits, targets)) * targets.shape[0]
            count += targets.shape[0]
            batch_conf = confusion_matrix(logits.argmax(1), targets, num_classes,
                                          ignore_index if task == "segmentation" else None).cpu()
            conf = batch_conf if conf is None else conf + batch_conf
    finally:
        model.train(was_training)
    if conf is None:
        raise ValueError("evaluate() got an empty loader")
    result = metrics_from_confusion(conf, task)
    result["loss"] = loss_sum / max(count, 1)
    if return_confusion:
        result["confusion"] = conf.tolist()
    return result


# ----------------------------------------------------------------------------------------------
# Checkpoints


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`fit` (tensors and plain containers only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel/DataParallel and ``torch.compile`` wrappers
    (checkpoints hold its keys, so a DDP or compiled run's checkpoint loads into a plain model in
    one process and vice versa)."""
    return unwrap_model(model)


def _checkpoint(state: TrainState, callbacks: Sequence[Callback]) -> dict:
    return {
        "model": unwrap(state.model).state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "epoch": state.epoch,
        "step": state.step,
        "history": state.history,
        "callbacks": [cb.state_dict() for cb in callbacks],
        "rng": torch.get_rng_state(),
    }


# ----------------------------------------------------------------------------------------------
# Training


def default_optimizer(model: nn.Module, lr: float = 0.1, momentum: float = 0.9,
                      weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 and weight decay 1e-4 on every parameter, as in the IEBN/DIANet code
    (IEBN's attention parameters get weight decay too; docs/methods.md, *IEBN*)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(model: nn.Module, kind: str, lr: float, weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """``"sgd"``: :func:`default_optimizer` (momentum 0.9, the papers'); ``"adamw"``: AdamW. Weight decay
    on every parameter either way."""
    if kind == "sgd":
        return default_optimizer(model, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer={kind!r} is not valid; allowed: {OPTIMIZERS}")


@dataclass(frozen=True)
class _Loop:
    """What one :func:`fit` call fixes for all its steps. The :class:`TrainState` beside it is what
    callbacks see and change; the loop keeps using these objects whatever a callback does to the state."""

    model: nn.Module
    net: nn.Module  # runs the training forward: ``torch.compile``'s wrapper of ``model``, or ``model``
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: Callable
    device: torch.device
    amp_dtype: torch.dtype | None
    task: str
    ignore_index: int
    num_classes: int | None
    callbacks: Sequence[Callback]
    options: FitOptions


@dataclass
class _EpochTotals:
    """Running sums over one epoch's batches, for its history record."""

    loss_sum: float = 0.0
    samples: int = 0
    correct: int = 0
    seen: int = 0


def fit(model: nn.Module, train_loader: Iterable, val_loader: Iterable | None = None, epochs: int = _UNSET, *,
        options: FitOptions | None = None, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
        callbacks: Sequence[Callback] = (), device: str | torch.device = "auto", task: str = "classification",
        loss_fn: Callable | None = None, ignore_index: int = 255, aux_weight: float = 0.4,
        num_classes: int | None = None, scheduler_interval: str = _UNSET, amp: str | bool = _UNSET,
        checkpoint_dir: str | None = _UNSET, resume: bool = _UNSET, write_checkpoints: bool = _UNSET,
        grad_clip: float | None = _UNSET, max_steps: int | None = _UNSET, progress: bool = _UNSET,
        log_every: int = _UNSET, compile: bool = _UNSET, channels_last: bool = _UNSET) -> FitResult:
    """Train ``model`` for ``epochs`` epochs; validate after each when ``val_loader`` is given.

    The loop's options come either as ``options=FitOptions(...)`` or as the keywords of the same
    names (``epochs``, ``max_steps``, ``scheduler_interval``, ``grad_clip``, ``amp``,
    ``channels_last``, ``compile``, ``checkpoint_dir``, ``resume``, ``write_checkpoints``,
    ``progress``, ``log_every``; unset ones take :class:`FitOptions`' defaults), never both: a loop
    keyword given with ``options`` raises ``ValueError`` naming it. :class:`FitOptions` documents
    each one.

    ``optimizer`` defaults to :func:`default_optimizer`, ``loss_fn`` to :func:`default_loss_fn` for
    ``task`` (with ``ignore_index`` and ``aux_weight``); ``scheduler`` steps per epoch or per
    optimiser step (``scheduler_interval``). Validation uses :func:`evaluate` with ``num_classes``
    and ``ignore_index``. A NaN/inf loss stops training with :class:`NonFiniteLossError` naming the
    epoch and step.
    """
    _check_task(task)
    options = _fit_options(options, dict(
        epochs=epochs, max_steps=max_steps, scheduler_interval=scheduler_interval, grad_clip=grad_clip, amp=amp,
        channels_last=channels_last, compile=compile, checkpoint_dir=checkpoint_dir, resume=resume,
        write_checkpoints=write_checkpoints, progress=progress, log_every=log_every))
    loop = _start_loop(model, options, optimizer=optimizer, scheduler=scheduler, callbacks=callbacks, device=device,
                       task=task, loss_fn=loss_fn, ignore_index=ignore_index, aux_weight=aux_weight,
                       num_classes=num_classes)
    state = TrainState(model=model, optimizer=loop.optimizer, scheduler=scheduler, device=loop.device, task=task,
                       loss_fn=loop.loss_fn, amp_dtype=loop.amp_dtype)
    start_epoch = _resume(loop, state)
    for cb in callbacks:
        cb.on_fit_start(state)
    for epoch in range(start_epoch, options.epochs):
        record = _train_epoch(loop, state, train_loader, epoch)
        if val_loader is not None:
            record.update(_validate(loop, val_loader))
        _end_epoch(loop, state, record, epoch)
        if _should_stop(loop, state):
            break
    for cb in callbacks:
        cb.on_fit_end(state)
    return FitResult(history=state.history, step_log=state.step_log, model=model)


def _fit_options(options: FitOptions | None, keywords: dict[str, Any]) -> FitOptions:
    """``options``, or a :class:`FitOptions` of the loop keywords :func:`fit` was given; both at once are refused."""
    given = {name: value for name, value in keywords.items() if value is not _UNSET}
    if options is None:
        return FitOptions(**given)
    if not isinstance(options, FitOptions):
        raise ValueError(f"options={options!r} is not valid; allowed: a FitOptions or None")
    if given:
        names = ", ".join(given)
        first = next(iter(given))
        raise ValueError(f"fit() got options= and the loop keyword(s) {names}; give each loop option once, in "
                         f"the FitOptions (e.g. dataclasses.replace(options, {first}=...)) or as a keyword")
    return options


def _start_loop(model: nn.Module, options: FitOptions, *, optimizer: torch.optim.Optimizer | None, scheduler: Any,
                callbacks: Sequence[Callback], device: str | torch.device, task: str, loss_fn: Callable | None,
                ignore_index: int, aux_weight: float, num_classes: int | None) -> _Loop:
    """Put ``model`` on the device (in channels-last when asked), fill in the default optimiser and loss,
    and build the gradient scaler and the compiled forward."""
    device = resolve_device(device)
    amp_dtype = autocast_dtype(device, options.amp)
    model.to(device)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = optimizer or default_optimizer(model)
    loss_fn = loss_fn or default_loss_fn(task, ignore_index, aux_weight)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    net = model
    if options.compile:
        net = torch.compile(model)
        watch_hooks()
    return _Loop(model=model, net=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler, loss_fn=loss_fn,
                 device=device, amp_dtype=amp_dtype, task=task, ignore_index=ignore_index, num_classes=num_classes,
                 callbacks=callbacks, options=options)


def _resume(loop: _Loop, state: TrainState) -> int:
    """The first epoch to train: 0, or with ``resume`` and an existing checkpoint the epoch after it, its
    model, optimiser, scheduler, callbacks, history, step and RNG state restored."""
    path = loop.options.checkpoint_path
    if loop.options.resume and path is not None and path.exists():
        return _restore(state, load_checkpoint(path, map_location=loop.device), loop.callbacks)
    return 0


def _train_epoch(loop: _Loop, state: TrainState, loader: Iterable, epoch: int) -> dict:
    """One pass over ``loader`` (cut short by ``max_steps`` or a callback's ``state.stop``); returns the
    epoch's history record: mean training loss and accuracy, last learning rate, seconds taken."""
    options = loop.options
    state.epoch = epoch
    _set_epoch(loader, epoch)
    loop.model.train()
    started = time.perf_counter()
    totals = _EpochTotals()
    bar = _progress(loader, options.progress, f"epoch {epoch + 1}/{options.epochs}")
    for inputs, targets in bar:
        batch_loss = _train_step(loop, state, inputs, targets, epoch)
        batch_correct, batch_count = _batch_accuracy(state.outputs, state.targets, loop.task, loop.ignore_index)
        totals.loss_sum += batch_loss * state.targets.shape[0]
        totals.samples += state.targets.shape[0]
        totals.correct += batch_correct
        totals.seen += batch_count
        for cb in loop.callbacks:
            cb.on_step_end(state)
        if state.step % options.log_every == 0:
            _log_step(loop, state, epoch, batch_loss)
        state.step += 1
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{batch_loss:.3f}", refresh=False)
        if _should_stop(loop, state):
            break
    return {"epoch": epoch + 1, "train_loss": totals.loss_sum / max(totals.samples, 1),
            "train_acc": totals.correct / max(totals.seen, 1), "lr": loop.optimizer.param_groups[0]["lr"],
            "time": time.perf_counter() - started}


def _train_step(loop: _Loop, state: TrainState, inputs: torch.Tensor, targets: torch.Tensor, epoch: int) -> float:
    """Forward, loss, backward and optimiser step on one batch (callbacks' step-start and after-backward
    hooks, gradient clipping, a per-step scheduler); returns the batch loss."""
    state.inputs = _to_device(inputs, loop.device, loop.options.channels_last)
    state.targets = targets.to(loop.device, non_blocking=True)
    state.logs = {}
    for cb in loop.callbacks:
        cb.on_step_start(state)
    with _autocast(loop.device, loop.amp_dtype):
        state.outputs = loop.net(state.inputs)
        state.loss = loop.loss_fn(state.outputs, state.targets)
    if not torch.isfinite(state.loss):
        raise NonFiniteLossError(
            f"loss became {state.loss.item()} at epoch {epoch + 1}, step {state.step} "
            "(lower the learning rate or the noise level, or enable grad_clip)")
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scaler.scale(state.loss).backward()
    loop.scaler.unscale_(loop.optimizer)
    for cb in loop.callbacks:
        cb.on_after_backward(state)
    if loop.options.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(loop.model.parameters(), loop.options.grad_clip)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    if loop.scheduler is not None and loop.options.scheduler_interval == "step":
        loop.scheduler.step()
    return state.loss.detach().item()


def _log_step(loop: _Loop, state: TrainState, epoch: int, batch_loss: float) -> None:
    """Append this step's loss, learning rate and the callbacks' ``state.logs`` to the step log."""
    entry = {"step": state.step, "epoch": epoch, "loss": batch_loss,
             "lr": loop.optimizer.param_groups[0]["lr"]}
    entry.update(state.logs)
    state.step_log.append(entry)


def _validate(loop: _Loop, loader: Iterable) -> dict:
    """:func:`evaluate` on ``loader``, keys prefixed ``val_`` (per-class IoU left out of the history)."""
    # the bare module: evaluation is local and must not enter DDP's collective forward (it runs eagerly)
    metrics = evaluate(unwrap(loop.model), loader, loop.device, task=loop.task, num_classes=loop.num_classes,
                       ignore_index=loop.ignore_index, loss_fn=loop.loss_fn, amp=loop.options.amp,
                       channels_last=loop.options.channels_last)
    return {f"val_{k}": v for k, v in metrics.items() if k != "per_class_iou"}


def _end_epoch(loop: _Loop, state: TrainState, record: dict, epoch: int) -> None:
    """Record the epoch, step a per-epoch scheduler, call the callbacks' ``on_epoch_end``, then write the
    checkpoint (after the callbacks, so it holds their state at the end of the epoch)."""
    state.history.append(record)
    if loop.scheduler is not None and loop.options.scheduler_interval == "epoch":
        loop.scheduler.step()
    for cb in loop.callbacks:
        cb.on_epoch_end(state)
    path = loop.options.checkpoint_path
    if path is not None and loop.options.write_checkpoints:
        state.epoch = epoch + 1
        atomic_save(_checkpoint(state, loop.callbacks), path)


def _should_stop(loop: _Loop, state: TrainState) -> bool:
    """A callback set ``state.stop``, or ``max_steps`` optimiser steps have run."""
    max_steps = loop.options.max_steps
    return state.stop or (max_steps is not None and state.step >= max_steps)


def _restore(state: TrainState, ckpt: dict, callbacks: Sequence[Callback]) -> int:
    unwrap(state.model).load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.scheduler is not None and ckpt.get("scheduler") is not None:
        state.scheduler.load_state_dict(ckpt["scheduler"])
    for cb, cb_state in zip(callbacks, ckpt.get("callbacks", [])):
        cb.load_state_dict(cb_state)
    state.history = list(ckpt.get("history", []))
    state.step = int(ckpt.get("step", 0))
    if "rng" in ckpt:
        torch.set_rng_state(ckpt["rng"].cpu())
    return int(ckpt["epoch"])


def _batch_accuracy(outputs: Any, targets: torch.Tensor, task: str, ignore_index: int) -> tuple[int, int]:
    with torch.no_grad():
        preds = _match_size(main_output(outputs), targets).argmax(1)
        if task == "segmentation":
            valid = targets != ignore_index
            return int(((preds == targets) & valid).sum()), int(valid.sum())
        return int((preds == targets).sum()), int(targets.numel())


def _set_epoch(loader: Iterable, epoch: int) -> None:
    # epoch-indexed samplers (ours, DistributedSampler) make a resumed run see the same batches
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not valid; allowed: {TASKS}")


def _check_channels_last(channels_last: bool) -> None:
    if not isinstance(channels_last, bool):
        raise ValueError(f"channels_last={channels_last!r} is not valid; allowed: True, False")


def _to_device(inputs: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    if channels_last and inputs.dim() == 4:
        return inputs.to(device, non_blocking=True, memory_format=torch.channels_last)
    return inputs.to(device, non_blocking=True)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _progress(iterable: Iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)
