"""The builder of a run: from a checked :class:`~workbench.recipe.spec.TrainConfig` to everything
:func:`workbench.train.fit` needs.

:func:`build_training` builds the data, the model (moved to the device, its BN family synchronised and
the model wrapped in ``DistributedDataParallel`` under DDP, channels-last where the run asks for it),
the loaders (each rank reads its share of every global batch), the SGD optimiser, the learning-rate
schedule and the noise, sparsity and probe callbacks (:mod:`workbench.recipe.callbacks`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workbench.callbacks import Callback
from workbench.distributed import DistInfo
from workbench.recipe.callbacks import build_callbacks
from workbench.recipe.spec import TrainConfig, acceleration, check_batch_size
from workbench.train import unwrap


@dataclass
class Training:
    """What :func:`build_training` built: the arguments of :func:`workbench.train.fit`."""

    model: nn.Module
    train_loader: Any
    test_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    interval: str
    task: str
    callbacks: list[Callback]


def build_training(cfg: TrainConfig, info: DistInfo, device: torch.device) -> Training:
    """Model (converted and wrapped as the run needs), loaders, optimiser, scheduler, and the noise,
    sparsity and probe callbacks."""
    from workbench.data import get_dataset, make_loader
    from workbench.device import seed_everything
    from workbench.models import build_model
    from workbench.train import default_optimizer

    seed_everything(cfg.seed)
    train_set = get_dataset(cfg.dataset, "train", root=cfg.data_root, **_augment_option(cfg))
    check_batch_size(cfg, len(train_set))
    test_set = get_dataset(cfg.dataset, _test_split(cfg.dataset), root=cfg.data_root)
    model = build_model(cfg.model, num_classes=train_set.num_classes, norm=cfg.norm, attention=cfg.attention,
                        width=cfg.width)
    model.to(device)  # before the sync conversion, which picks the synced layer by device
    local_twin = None
    if info.enabled and any(name in cfg.probes for name in ("gsnr", "coupling_gap")):
        local_twin = shared_copy(model)  # taken before the conversion: its BNs stay local
    if info.enabled and cfg.sync_bn:
        from workbench.nn import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    if acceleration(cfg, device).channels_last:
        model.to(memory_format=torch.channels_last)
    model, train_loader = _distribute(cfg, info, device, model, train_set)
    test_loader = make_loader(test_set, 256, train=False)
    optimizer = default_optimizer(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler, interval = _scheduler(cfg, optimizer, cfg.epochs * len(train_loader))
    if local_twin is not None:
        _check_shared(local_twin, unwrap(model))
    callbacks = build_callbacks(cfg, info, model, test_set, local_twin)
    return Training(model, train_loader, test_loader, optimizer, scheduler, interval, train_set.task, callbacks)


def _distribute(cfg: TrainConfig, info: DistInfo, device: torch.device, model: nn.Module,
                train_set: Any) -> tuple[nn.Module, Any]:
    """The model and the training loader: under DDP, the wrapper and this rank's share of every global
    batch; in one process, the model itself and a loader seeded by the run's seed."""
    from workbench.data import make_loader

    if not info.enabled:
        return model, make_loader(train_set, cfg.batch_size, train=True, seed=cfg.seed)
    from torch.utils.data import DataLoader

    from workbench.data.samplers import DistributedEpochSampler

    sampler = DistributedEpochSampler(len(train_set), cfg.batch_size, info.world_size, info.rank, seed=cfg.seed)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size // info.world_size, sampler=sampler)
    ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
    return torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs), train_loader


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps: int):
    sched = torch.optim.lr_scheduler
    if cfg.schedule == "onecycle":
        return sched.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.15), "step"
    if cfg.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=max(steps, 1)), "step"
    if cfg.schedule == "step":
        return sched.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma), "epoch"
    return None, "epoch"


def _augment_option(cfg: TrainConfig) -> dict[str, Any]:
    from workbench.data import accepted_options

    return accepted_options(cfg.dataset, augment=cfg.augment)


def _test_split(dataset: str) -> str:
    """The split evaluated during training: ``val`` where a dataset has one (Cityscapes' test labels
    are withheld), else ``test``."""
    from workbench.data import describe_dataset

    splits = describe_dataset(dataset).splits
    return "val" if "val" in splits else "test"


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` holding the very same parameter and buffer tensors."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _check_shared(twin: nn.Module, model: nn.Module) -> None:
    ours = dict(model.named_parameters())
    if set(ours) != {n for n, _ in twin.named_parameters()} or any(
            p is not ours[n] for n, p in twin.named_parameters()):
        raise RuntimeError("the local twin of the model no longer shares its parameters (a conversion copied them)")
