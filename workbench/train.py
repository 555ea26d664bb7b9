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
    ``channels_last`` as in :func:`fit` (``channels_last`` also converts the model's parameters).
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


def fit(model: nn.Module, train_loader: Iterable, val_loader: Iterable | None = None, epochs: int = 1, *,
        optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
        scheduler_interval: str = "epoch", callbacks: Sequence[Callback] = (),
        device: str | torch.device = "auto", amp: str | bool = "off", checkpoint_dir: str | None = None,
        resume: bool = False, write_checkpoints: bool = True, task: str = "classification",
        loss_fn: Callable | None = None,
        ignore_index: int = 255, aux_weight: float = 0.4, num_classes: int | None = None,
        grad_clip: float | None = None, max_steps: int | None = None, progress: bool = True,
        log_every: int = 1, compile: bool = False, channels_last: bool = False) -> FitResult:
    """Train ``model`` for ``epochs`` epochs; validate after each when ``val_loader`` is given.

    ``scheduler`` steps once per epoch (``scheduler_interval="epoch"``) or per optimiser step
    (``"step"``). With ``checkpoint_dir`` a checkpoint (model, optimiser, scheduler, callbacks,
    history) is written atomically after every epoch as ``last.pt`` (by the process with
    ``write_checkpoints``: rank 0 under DDP); ``resume=True`` continues from it. A NaN/inf loss
    stops training with :class:`NonFiniteLossError` naming the epoch and step.

    ``compile``: train through ``torch.compile(model)`` (eager GPU steps are bound by kernel
    launches: an IEBN ResNet-164 step costs 2.3-2.8x a BN step on an H100, a compiled IEBN layer
    1.14-1.30x a compiled BN layer). Only the training forward runs compiled (the first steps
    compile); callbacks, checkpoints, validation and :class:`FitResult` see the plain ``model``, and
    hooks added or removed on it during training reach the compiled graph (dynamo's hook guards are
    turned on, :func:`workbench.nn.compiled.watch_hooks`).

    ``amp``: autocast precision (see :func:`workbench.device.autocast_dtype`; fp16 runs with a gradient
    scaler). ``channels_last``: the model's parameters and every 4-d input batch in the channels-last
    memory format (the layout of the tensor cores' convolutions); validation runs in it too.
    :func:`workbench.device.resolve_acceleration` gives the device's defaults for all three.
    """
    _check_task(task)
    if not isinstance(compile, bool):
        raise ValueError(f"compile={compile!r} is not valid; allowed: True, False")
    _check_channels_last(channels_last)
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs={epochs!r} must be a non-negative integer")
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"scheduler_interval={scheduler_interval!r}; allowed: 'epoch', 'step'")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    device = resolve_device(device)
    amp_dtype = autocast_dtype(device, amp)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = optimizer or default_optimizer(model)
    loss_fn = loss_fn or default_loss_fn(task, ignore_index, aux_weight)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    net = model
    if compile:
        net = torch.compile(model)
        watch_hooks()
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, device=device, task=task,
                       loss_fn=loss_fn, amp_dtype=amp_dtype)
    start_epoch = 0
    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        start_epoch = _restore(state, load_checkpoint(ckpt_path, map_location=device), callbacks)

    for cb in callbacks:
        cb.on_fit_start(state)
    for epoch in range(start_epoch, epochs):
        state.epoch = epoch
        _set_epoch(train_loader, epoch)
        model.train()
        started = time.perf_counter()
        loss_sum, correct, seen, samples = 0.0, 0, 0, 0
        bar = _progress(train_loader, progress, f"epoch {epoch + 1}/{epochs}")
        for inputs, targets in bar:
            state.inputs = _to_device(inputs, device, channels_last)
            state.targets = targets.to(device, non_blocking=True)
            state.logs = {}
            for cb in callbacks:
                cb.on_step_start(state)
            with _autocast(device, amp_dtype):
                state.outputs = net(state.inputs)
                state.loss = loss_fn(state.outputs, state.targets)
            if not torch.isfinite(state.loss):
                raise NonFiniteLossError(
                    f"loss became {state.loss.item()} at epoch {epoch + 1}, step {state.step} "
                    "(lower the learning rate or the noise level, or enable grad_clip)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(state.loss).backward()
            scaler.unscale_(optimizer)
            for cb in callbacks:
                cb.on_after_backward(state)
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None and scheduler_interval == "step":
                scheduler.step()
            batch_loss = state.loss.detach().item()
            batch_correct, batch_count = _batch_accuracy(state.outputs, state.targets, task, ignore_index)
            loss_sum += batch_loss * state.targets.shape[0]
            samples += state.targets.shape[0]
            correct += batch_correct
            seen += batch_count
            for cb in callbacks:
                cb.on_step_end(state)
            if state.step % log_every == 0:
                entry = {"step": state.step, "epoch": epoch, "loss": batch_loss,
                         "lr": optimizer.param_groups[0]["lr"]}
                entry.update(state.logs)
                state.step_log.append(entry)
            state.step += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{batch_loss:.3f}", refresh=False)
            if state.stop or (max_steps is not None and state.step >= max_steps):
                break
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(samples, 1),
                  "train_acc": correct / max(seen, 1), "lr": optimizer.param_groups[0]["lr"],
                  "time": time.perf_counter() - started}
        if val_loader is not None:
            # the bare module: evaluation is local and must not enter DDP's collective forward (it runs eagerly)
            metrics = evaluate(unwrap(model), val_loader, device, task=task, num_classes=num_classes,
                               ignore_index=ignore_index, loss_fn=loss_fn, amp=amp, channels_last=channels_last)
            record.update({f"val_{k}": v for k, v in metrics.items() if k != "per_class_iou"})
        state.history.append(record)
        if scheduler is not None and scheduler_interval == "epoch":
            scheduler.step()
        for cb in callbacks:
            cb.on_epoch_end(state)
        if ckpt_path is not None and write_checkpoints:
            state.epoch = epoch + 1
            atomic_save(_checkpoint(state, callbacks), ckpt_path)
        if state.stop or (max_steps is not None and state.step >= max_steps):
            break
    for cb in callbacks:
        cb.on_fit_end(state)
    return FitResult(history=state.history, step_log=state.step_log, model=model)


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
