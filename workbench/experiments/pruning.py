"""Notebook 04_pruning_sparsity: BN-scale sparsity during training and what pruning does to a segmentation net.

Everything the notebook shows is computed here and returned as plain data:

- :func:`train_run` / :func:`run_sparsity` -- train the same segmentation net on ``digit-scenes``
  three ways: ``plain`` (no sparsity), ``l1`` (Network Slimming's L1 on BN scales) and ``cags``
  (CAP's context-aware guided sparsification); record every BN's ``|gamma|`` before training and
  after each epoch (histograms, sparsity curves) and the test mIoU.
- :func:`prune_sweep` -- prune at several ratios (``slimming`` on the L1 run, ``cap`` on the CAGS
  run, by default), report params / FLOPs / latency / mIoU before and after fine-tuning with
  ``fit``, and the channels kept per layer.
- :func:`sample_predictions` -- predicted masks on a few test scenes.
- :func:`key_numbers` -- what ``results.json`` records, including whether CAP keeps more mIoU than
  slimming at the same ratio (the paper's claim), measured, not assumed.

Design choices: the quick preset trains with AdamW (SGD, Network Slimming's optimiser, barely moves
the tiny nets off "all background" in the few CPU minutes it has; with AdamW PSPNet-18 at width 0.25
reached about 0.43 mIoU in 8 epochs); the sparsity subgradient is added to the gradient before the
optimiser in the papers' form, but AdamW normalises it like the loss gradient and shrinks every
scale alike, so the quick preset applies the penalty as a decoupled proximal step instead
(``sparsity_mode="proximal"``, see :mod:`workbench.pruning.sparsity`). The full preset uses SGD with
momentum and the subgradient, as the papers do. BN scales start at 0.5 (Network Slimming).

Both methods prune at the same *channel* ratio (the paper's "CAP-60%" labels are read as channel
percentiles, docs/methods.md *CAP: CAGM and CAGS*), so their params/FLOPs reductions are reported
side by side rather than matched; fine-tuning uses the same epochs and learning rate for both.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from workbench.data import accepted_options, get_dataset, make_loader
from workbench.device import describe_device, resolve_device, seed_everything
from workbench.experiments.attention import limit_cpu_threads
from workbench.experiments.dataset_choice import dataset_param
from workbench.nn.norms import is_affine_norm, is_norm
from workbench.params import COMMON, Param, validate
from workbench.pruning import (
    BNScaleRecorder,
    BNScaleSparsity,
    CAGSSparsity,
    bn_scales,
    prune,
    sparsity_fraction,
)
from workbench.train import OPTIMIZERS, evaluate, fit, make_optimizer

MODELS = ("segnet", "pspnet_resnet18", "pspnet_resnet50", "pspnet_resnet101", "icnet")
NORMS = ("bn", "iebn")
REGIMES = ("plain", "l1", "cags")
METHODS = ("slimming", "cap")
SOURCE_OF = {"slimming": "l1", "cap": "cags"}  # which training regime each pruning method starts from
THRESHOLDS = (1e-3, 1e-2, 1e-1)

PARAMETERS = {
    **COMMON,
    "dataset": dataset_param("segmentation"),
    "model": Param(str, choices=MODELS, help="segmentation network to sparsify and prune"),
    "norm": Param(str, choices=NORMS, help="normalisation layer (pruned through its BN scale)"),
    "ratio": Param(float, min=0.0, max=0.95, help="prune ratio shown in detail (and where the slider starts)"),
    "ratios": Param(list, item_type=float, min=0.0, max=0.95, nullable=True, help="None: the preset's"),
    "lam": Param(float, min=0.0, max=1.0, nullable=True, help="sparsity lambda; None: the preset's"),
    "width": Param(float, min=0.03125, max=4.0, nullable=True, help="channel width multiplier; None: the preset's"),
    "epochs": Param(int, min=1, max=1000, nullable=True, help="sparsity-training epochs; None: the preset's"),
    "finetune_epochs": Param(int, min=0, max=1000, nullable=True,
                             help="fine-tuning epochs after pruning; None: the preset's"),
    "batch_size": Param(int, min=2, max=1024, nullable=True, help="training batch size; None: the preset's"),
    "lr": Param(float, min=1e-6, max=10.0, nullable=True, help="learning rate; None: the preset's"),
    "optimizer": Param(str, choices=OPTIMIZERS, nullable=True, help="optimiser; None: the preset's"),
    "bn_init": Param(float, min=0.0, max=2.0, nullable=True, help="initial BN scale (Network Slimming: 0.5)"),
    "sparsity_mode": Param(str, choices=("subgradient", "proximal"), nullable=True,
                           help="how the L1 penalty is applied: subgradient or proximal step; None: the preset's"),
}

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"width": 0.25, "epochs": 8, "finetune_epochs": 3, "ratios": [0.3, 0.5, 0.7], "lam": 2e-3,
              "batch_size": 16, "lr": 3e-3, "optimizer": "adamw", "bn_init": 0.5,
              "sparsity_mode": "proximal", "train_scenes": 512, "test_scenes": 128, "cpu_threads": 1},
    "full": {"width": 1.0, "epochs": 60, "finetune_epochs": 20, "ratios": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
             "lam": 1e-4, "batch_size": 16, "lr": 0.01, "optimizer": "sgd", "bn_init": 0.5,
             "sparsity_mode": "subgradient", "train_scenes": 4096,
             "test_scenes": 512, "cpu_threads": None},
}


def resolve(params: dict[str, Any]) -> dict[str, Any]:
    """Validate the notebook's parameters and fill the ones left ``None`` from the preset."""
    params = validate(params, PARAMETERS, where="04_pruning_sparsity")
    preset = PRESETS[params.get("preset", "quick")]
    for key, value in preset.items():
        if params.get(key) is None:
            params[key] = value
    if params.get("ratio") is not None and params["ratio"] not in params["ratios"]:
        params["ratios"] = sorted({*params["ratios"], params["ratio"]})
    return params


def segmentation_split(dataset: str, split: str, scenes: int) -> Any:
    """``split`` of ``dataset``; ``scenes`` sets the length of generated sets (digit-scenes), a folder
    has the images it has."""
    return get_dataset(dataset, split, **accepted_options(dataset, length=scenes))


def _loaders(batch_size: int, seed: int, train_scenes: int, test_scenes: int, dataset: str = "digit-scenes"):
    train_set = segmentation_split(dataset, "train", train_scenes)
    test_set = segmentation_split(dataset, "test", test_scenes)
    return (make_loader(train_set, batch_size, train=True, seed=seed), make_loader(test_set, 64, train=False),
            train_set)


def _ignore_index(dataset: Any) -> int:
    """The label the losses and metrics skip: the dataset's (a folder's dataset.yaml), else 255."""
    ignore = getattr(dataset, "ignore_index", None)
    return 255 if ignore is None else int(ignore)


def _segment_metrics(model: nn.Module, loader: Any, device: torch.device, num_classes: int) -> dict:
    m = evaluate(model, loader, device, task="segmentation", num_classes=num_classes,
                 ignore_index=_ignore_index(loader.dataset))
    return {"miou": m["miou"], "pixel_acc": m["pixel_acc"], "per_class_iou": m["per_class_iou"]}


def train_run(regime: str, *, model: str = "pspnet_resnet18", norm: str = "bn", width: float = 0.25,
              epochs: int = 8, lam: float = 2e-3, batch_size: int = 16, lr: float = 3e-3, optimizer: str = "adamw",
              bn_init: float | None = 0.5, sparsity_mode: str = "proximal", device: Any = "auto", seed: int = 0,
              train_scenes: int = 512, test_scenes: int = 128, cpu_threads: int | None = None,
              progress: bool = False, dataset: str = "digit-scenes", **_: Any) -> dict:
    """Train ``model`` on ``dataset`` (digit-scenes by default; any segmentation dataset value) with
    ``regime`` in ``plain | l1 | cags``; return plain data + the net."""
    if regime not in REGIMES:
        raise ValueError(f"regime={regime!r} is not valid; allowed: {REGIMES}")
    if model not in MODELS:
        raise ValueError(f"model={model!r} is not valid; allowed: {MODELS}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not valid; allowed: {OPTIMIZERS}")
    from workbench.models import build_model

    dev = resolve_device(device)
    seed_everything(seed)
    train_loader, test_loader, train_set = _loaders(batch_size, seed, train_scenes, test_scenes, dataset)
    num_classes = train_set.num_classes
    net = build_model(model, num_classes=num_classes, norm=norm, width=width)
    if bn_init is not None:
        with torch.no_grad():
            for m in net.modules():
                if is_affine_norm(m):
                    m.weight.fill_(bn_init)
    recorder = BNScaleRecorder(THRESHOLDS)
    callbacks: list = [recorder]
    sparsity = None
    if regime == "l1":
        sparsity = BNScaleSparsity(lam=lam, mode=sparsity_mode)
    elif regime == "cags":
        sparsity = CAGSSparsity(lam=lam, mode=sparsity_mode)
    if sparsity is not None:
        callbacks.insert(0, sparsity)
    opt = make_optimizer(net, optimizer, lr, weight_decay=1e-4)
    steps = max(1, epochs * len(train_loader))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    started = time.perf_counter()
    with limit_cpu_threads(cpu_threads, dev):
        result = fit(net, train_loader, test_loader, epochs, optimizer=opt, scheduler=scheduler,
                     scheduler_interval="step", callbacks=callbacks, device=dev, task="segmentation",
                     ignore_index=_ignore_index(train_set),
                     num_classes=num_classes, progress=progress)
        metrics = _segment_metrics(net, test_loader, dev, num_classes)
    scales = bn_scales(net)
    return {
        "regime": regime, "model_name": model, "norm": norm, "width": width, "lam": lam if sparsity else 0.0,
        "optimizer": optimizer, "bn_init": bn_init, "sparsity_mode": sparsity_mode,
        "model": net, "history": result.history, "scale_records": recorder.records,
        "fraction_below": sparsity_fraction(scales, THRESHOLDS),
        "guidance": {k: v.tolist() for k, v in sparsity.guidance().items()} if regime == "cags" else {},
        **metrics, "params": sum(p.numel() for p in net.parameters()),
        "train_seconds": time.perf_counter() - started, "device": describe_device(dev),
        "classes": list(getattr(train_set, "classes", [])), "num_classes": num_classes,
    }


def run_sparsity(regimes: Sequence[str] = REGIMES, **options: Any) -> dict[str, dict]:
    """:func:`train_run` for each regime with the same seed, data and schedule."""
    bad = [r for r in regimes if r not in REGIMES]
    if bad:
        raise ValueError(f"regimes {bad} are not valid; allowed: {REGIMES}")
    return {regime: train_run(regime, **options) for regime in regimes}


def prune_sweep(runs: dict[str, dict], ratios: Sequence[float], methods: Sequence[str] = METHODS, *,
                finetune_epochs: int = 3, lr: float = 3e-3, optimizer: str = "adamw", batch_size: int = 16,
                device: Any = "auto",
                seed: int = 0, train_scenes: int = 512, test_scenes: int = 128, cpu_threads: int | None = None,
                latency_batch: int = 8, progress: bool = False, keep_models: bool = False,
                dataset: str = "digit-scenes", **_: Any) -> list[dict]:
    """Prune each method's source run at every ratio, evaluate, fine-tune, evaluate again.

    Returns tidy rows ``{method, source, ratio, params_*, flops_*, latency_ms_*, miou_unpruned,
    miou_pruned, miou_finetuned, channel_ratio, layers}`` (``layers``: BN name -> (before, after)).
    """
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods {bad} are not valid; allowed: {METHODS}")
    for r in ratios:
        if not 0 <= r < 1:
            raise ValueError(f"ratios contains {r!r}; allowed: numbers in [0, 1)")
    dev = resolve_device(device)
    train_loader, test_loader, train_set = _loaders(batch_size, seed, train_scenes, test_scenes, dataset)
    num_classes = train_set.num_classes
    example = next(iter(test_loader))[0][:1].to(dev)
    latency_inputs = next(iter(test_loader))[0][:latency_batch].to(dev)
    attention_batches = [x for x, _ in list(test_loader)[:2]]
    rows = []
    with limit_cpu_threads(cpu_threads, dev):
        for method in methods:
            source = runs[SOURCE_OF[method]]
            base = source["model"].to(dev)
            guidance = {k: torch.tensor(v) for k, v in source.get("guidance", {}).items()} or None
            for ratio in ratios:
                seed_everything(seed)
                pruned, report = prune(base, ratio, example, method=method, guidance=guidance,
                                       attention=attention_batches, latency_inputs=latency_inputs,
                                       latency_runs=5)
                before = _segment_metrics(pruned, test_loader, dev, num_classes)
                tuned = before
                if finetune_epochs > 0 and ratio > 0:
                    opt = make_optimizer(pruned, optimizer, lr * 0.3, weight_decay=1e-4)
                    steps = finetune_epochs * len(train_loader)
                    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
                    fit(pruned, train_loader, None, finetune_epochs, optimizer=opt, scheduler=scheduler,
                        scheduler_interval="step", device=dev, task="segmentation", num_classes=num_classes,
                        ignore_index=_ignore_index(train_set),
                        progress=progress)
                    tuned = _segment_metrics(pruned, test_loader, dev, num_classes)
                d = report.to_dict()
                row = {
                    "method": method, "source": SOURCE_OF[method], "ratio": ratio,
                    "params_before": d["params_before"], "params_after": d["params_after"],
                    "params_reduction": d["params_reduction"], "flops_before": d["flops_before"],
                    "flops_after": d["flops_after"], "flops_reduction": d["flops_reduction"],
                    "latency_ms_before": d["latency_ms_before"], "latency_ms_after": d["latency_ms_after"],
                    "channel_ratio": d["channel_ratio"], "threshold": d["threshold"],
                    "miou_unpruned": source["miou"], "miou_pruned": before["miou"],
                    "miou_finetuned": tuned["miou"], "per_class_iou_finetuned": tuned["per_class_iou"],
                    "layers": {k: list(v) for k, v in d["layers"].items() if _is_norm_name(base, k)},
                }
                if keep_models:
                    row["model"] = pruned
                rows.append(row)
    return rows


def _is_norm_name(model: nn.Module, name: str) -> bool:
    return is_norm(dict(model.named_modules()).get(name))


@torch.no_grad()
def sample_predictions(models: dict[str, nn.Module], num_samples: int = 4, device: Any = "auto",
                       test_scenes: int = 128, dataset: str = "digit-scenes") -> dict:
    """Images, true masks and each model's predicted masks on the first ``num_samples`` test scenes."""
    dev = resolve_device(device)
    test_set = segmentation_split(dataset, "test", test_scenes)
    images, targets = next(iter(make_loader(test_set, num_samples, train=False)))
    out = {"images": _display(images, test_set).tolist(), "targets": targets.tolist(), "predictions": {}}
    for name, model in models.items():
        was = model.training
        model.eval()
        logits = model(images.to(dev))
        logits = logits["out"] if isinstance(logits, dict) else logits
        out["predictions"][name] = logits.argmax(1).cpu().tolist()
        model.train(was)
    out["classes"] = list(getattr(test_set, "classes", []))
    return out


def _display(images: torch.Tensor, dataset: Any) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] for display: undo the dataset's normalisation when it exposes one."""
    mean = getattr(dataset, "mean", None)
    std = getattr(dataset, "std", None)
    x = images.float()
    if mean is not None and std is not None:
        x = x * torch.as_tensor(std).view(1, -1, 1, 1) + torch.as_tensor(mean).view(1, -1, 1, 1)
    else:
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-6)
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def sparsity_curves(runs: dict[str, dict]) -> dict[str, list[dict]]:
    """``{regime: [{"epoch", "fraction_below": {threshold: fraction}}]}`` from the recorded scales."""
    return {regime: [{"epoch": r["epoch"], "fraction_below": r["fraction_below"]} for r in run["scale_records"]]
            for regime, run in runs.items()}


def key_numbers(runs: dict[str, dict], rows: Sequence[dict], ratio: float) -> dict:
    """Flat numbers for ``results.json`` at the chosen ``ratio``."""
    out: dict[str, Any] = {}
    for regime, run in runs.items():
        out[f"fraction_below_1e-2_{regime}"] = run["fraction_below"][1e-2]
        out[f"miou_{regime}"] = run["miou"]
    at = {r["method"]: r for r in rows if abs(r["ratio"] - ratio) < 1e-9}
    for method, r in at.items():
        out[f"miou_pruned_{method}"] = r["miou_pruned"]
        out[f"miou_finetuned_{method}"] = r["miou_finetuned"]
        out[f"params_reduction_{method}"] = r["params_reduction"]
        out[f"flops_reduction_{method}"] = r["flops_reduction"]
        out[f"miou_drop_{method}"] = r["miou_unpruned"] - r["miou_finetuned"]
    if {"slimming", "cap"} <= set(at):
        out["ratio"] = ratio
        out["cap_keeps_more_miou"] = bool(at["cap"]["miou_finetuned"] > at["slimming"]["miou_finetuned"])
    return out
