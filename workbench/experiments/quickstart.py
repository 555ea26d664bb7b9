"""Notebook 00_quickstart: train a small CIFAR-style ResNet on the embedded digits and evaluate it."""

from __future__ import annotations

import time
from typing import Any

import torch

from workbench.data import get_dataset, make_loader
from workbench.device import describe_device, resolve_device, seed_everything
from workbench.params import COMMON, Param, validate
from workbench.train import default_optimizer, evaluate, fit

NORMS = ("bn", "iebn", "none")
ATTENTIONS = ("none", "se", "dia")

PARAMETERS = {
    **COMMON,
    "model": Param(str, choices=("resnet20", "resnet32", "resnet56", "resnet110")),
    "norm": Param(str, choices=NORMS),
    "attention": Param(str, choices=ATTENTIONS),
    "epochs": Param(int, min=1, nullable=True, help="None: the preset's default"),
    "batch_size": Param(int, min=2, max=4096),
    "lr": Param(float, min=1e-6, max=10.0, nullable=True, help="None: 0.1 with normalisation, 0.02 without"),
    "width": Param(float, min=0.0625, max=8.0),
}

PRESET_EPOCHS = {"quick": 15, "full": 60}


def default_lr(norm: str) -> float:
    """Without normalisation the SGD recipe of the BN networks (lr 0.1) does not train ResNet-20 on
    digits (10% test accuracy measured); a five times smaller rate is the default there."""
    return 0.02 if norm == "none" else 0.1


def resolve(params: dict[str, Any]) -> dict[str, Any]:
    """Validate the notebook's parameters and fill what the preset decides."""
    params = validate(params, PARAMETERS, where="00_quickstart")
    if params.get("epochs") is None:
        params["epochs"] = PRESET_EPOCHS[params["preset"]]
    if params.get("lr") is None:
        params["lr"] = default_lr(params.get("norm", "bn"))
    return params


def run_quickstart(model: str = "resnet20", norm: str = "bn", attention: str = "none", width: float = 1.0,
                   epochs: int = 15, batch_size: int = 64, lr: float | None = None, device: str = "auto",
                   seed: int = 0, progress: bool = True, **_: Any) -> dict:
    """Train ``model`` on digits with SGD + one-cycle schedule; return history, test metrics, confusion.
    Without normalisation (``norm="none"``) the default learning rate is lower (:func:`default_lr`)."""
    lr = default_lr(norm) if lr is None else lr
    from workbench.models import build_model

    dev = resolve_device(device)
    seed_everything(seed)
    train_set, test_set = get_dataset("digits", "train", augment=True), get_dataset("digits", "test")
    train_loader = make_loader(train_set, batch_size, train=True, seed=seed)
    test_loader = make_loader(test_set, 256, train=False)
    net = build_model(model, num_classes=train_set.num_classes, norm=norm, attention=attention, width=width)
    optimizer = default_optimizer(net, lr=lr, weight_decay=5e-4)
    steps = epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    started = time.perf_counter()
    result = fit(net, train_loader, test_loader, epochs, optimizer=optimizer, scheduler=scheduler,
                 scheduler_interval="step", device=dev, progress=progress)
    wall = time.perf_counter() - started
    test = evaluate(net, test_loader, dev, return_confusion=True)
    return {
        "history": result.history,
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "confusion": test["confusion"],
        "classes": list(train_set.classes),
        "params": sum(p.numel() for p in net.parameters()),
        "train_seconds": wall,
        "device": describe_device(dev),
        "model": net,
    }
