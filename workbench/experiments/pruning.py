"""Notebook 04_pruning_sparsity: BN-scale sparsity during training and what pruning does to a segmentation net.

Everything the notebook shows is computed here (and, for the FLOPs-matched paired comparison of CAP
and Network Slimming, in :mod:`workbench.experiments.pruning_comparison`) and returned as plain data:

- :func:`train_seed` -- one seed's networks: a ``plain`` dense network trained once, then ``l1``
  (Network Slimming's L1 on BN scales) and ``cags`` (CAP's context-aware guided sparsification)
  sparsity training, both from a copy of that same dense network with equal lambda, steps and
  batch order; every BN's ``|gamma|`` is recorded before training and after each epoch
  (histograms, sparsity curves), and the test mIoU.
- :func:`prune_sweep` -- prune each arm's network at several channel ratios (the exploration the
  prune-ratio slider shows), report params / FLOPs / latency / mIoU, optionally fine-tune, and the
  channels kept per layer.
- :func:`sample_predictions` -- predicted masks on a few test scenes.

The pruning arms (:data:`ARMS`): ``slimming`` prunes the L1 network by ``|gamma|``; ``cap`` prunes
the CAGS network by the same ``|gamma|`` rule (CAP's context acts through the sparsity only, the
paper thresholds BN scales); ``cap_guided`` is the ablation that ranks the CAGS network's channels
by ``|gamma|`` times the layer-normalised guide, i.e. uses the guide a second time.

Design choices: the quick and standard presets train with AdamW (SGD, Network Slimming's optimiser,
barely moves the tiny nets off "all background" in the few CPU minutes they have; with AdamW
PSPNet-18 at width 0.25 reached about 0.43 mIoU in 8 epochs); the sparsity subgradient is added to
the gradient before the optimiser in the papers' form, but AdamW normalises it like the loss
gradient and shrinks every scale alike, so these presets apply the penalty as a decoupled proximal
step instead (``sparsity_mode="proximal"``, see :mod:`workbench.pruning.sparsity`). The full preset
uses SGD with momentum and the subgradient, as the papers do. BN scales start at 0.5 (Network
Slimming).
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from workbench.data import accepted_options, get_dataset, make_loader
from workbench.device import describe_device, resolve_device, seed_everything
from workbench.experiments.acceleration import resolve_params_acceleration
from workbench.experiments.attention import limit_cpu_threads
from workbench.experiments.dataset_choice import check_preset_data, dataset_param
from workbench.nn.norms import is_affine_norm, is_norm
from workbench.params import ACCELERATION, COMMON, EXECUTION, Param, resolve_execution, validate
from workbench.probes import BNScaleProbe
from workbench.pruning import (
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
SPARSE_REGIMES = ("l1", "cags")
# arm -> (the sparsity regime whose network it prunes, the channel ranking prune() uses)
ARMS = {"slimming": ("l1", "slimming"), "cap": ("cags", "slimming"), "cap_guided": ("cags", "cap")}
METHODS = tuple(ARMS)
THRESHOLDS = (1e-3, 1e-2, 1e-1)
PRESET_NAMES = ("quick", "standard", "full")

PARAMETERS = {
    **COMMON,
    **ACCELERATION,
    **EXECUTION,
    "preset": Param(str, choices=PRESET_NAMES,
                    help="quick: a smoke run (minutes, 2 seeds); standard: the evidence run (<= 30 min on 2 CPU "
                         "cores); full: paper-sized (Cityscapes, GPU)"),
    "dataset": dataset_param("segmentation", nullable=True,
                             help="None: the preset's (fashion-scenes / cityscapes); or a registered "
                                  "name or a folder"),
    "model": Param(str, choices=MODELS, nullable=True,
                   help="segmentation network to sparsify and prune; None: the preset's"),
    "norm": Param(str, choices=NORMS, help="normalisation layer (pruned through its BN scale)"),
    "ratio": Param(float, min=0.0, max=0.95, help="prune ratio shown in detail (and where the slider starts)"),
    "ratios": Param(list, item_type=float, min=0.0, max=0.95, nullable=True, help="None: the preset's"),
    "flops_targets": Param(list, item_type=float, min=0.01, max=0.99, nullable=True,
                           help="FLOPs fractions both arms are pruned to; None: the preset's"),
    "seeds": Param(int, min=2, max=100, nullable=True,
                   help="paired seeds of the comparison (seed, seed+1, ...; at least 2 for an interval)"),
    "lam": Param(float, min=0.0, max=1.0, nullable=True, help="sparsity lambda; None: the preset's"),
    "width": Param(float, min=0.03125, max=4.0, nullable=True, help="channel width multiplier; None: the preset's"),
    "epochs": Param(int, min=1, max=1000, nullable=True, help="dense training epochs; None: the preset's"),
    "sparsity_epochs": Param(int, min=1, max=1000, nullable=True,
                             help="L1 / CAGS sparsity training epochs from the dense network; None: the preset's"),
    "finetune_epochs": Param(int, min=0, max=1000, nullable=True,
                             help="fine-tuning epochs after pruning (equal for every arm); None: the preset's"),
    "batch_size": Param(int, min=2, max=1024, nullable=True, help="training batch size; None: the preset's"),
    "lr": Param(float, min=1e-6, max=10.0, nullable=True, help="learning rate; None: the preset's"),
    "optimizer": Param(str, choices=OPTIMIZERS, nullable=True, help="optimiser; None: the preset's"),
    "bn_init": Param(float, min=0.0, max=2.0, nullable=True, help="initial BN scale (Network Slimming: 0.5)"),
    "sparsity_mode": Param(str, choices=("subgradient", "proximal"), nullable=True,
                           help="how the L1 penalty is applied: subgradient or proximal step; None: the preset's"),
}

_SMALL_NET = {"dataset": "digit-scenes", "model": "pspnet_resnet18", "width": 0.25, "lam": 2e-3, "batch_size": 16,
              "lr": 3e-3, "optimizer": "adamw", "bn_init": 0.5, "sparsity_mode": "proximal", "cpu_threads": 1}
PRESETS: dict[str, dict[str, Any]] = {
    # a smoke run: the whole protocol end to end in minutes; its verdicts say so. Real items (the shipped
    # Fashion-MNIST subset): measured 2026-12-06 (2-core AMD EPYC, one thread, seed 0), dense + L1 + CAGS
    # training (4 + 2 + 2 epochs of 512 scenes) reached mIoU 0.160 / 0.281 / 0.280 on fashion-scenes in
    # 159 s and 0.108 / 0.284 / 0.284 on digit-scenes in 184 s (the machine shared, so the times are rough).
    # 256 scenes halve the training and the fine-tuning: one seed (training and the 9 pruned, fine-tuned
    # networks) took 60 s against 98 s with 512, fine-tuned mIoU 0.14-0.16 against 0.32 (2026-12-07, same
    # machine, 4 dense epochs); 2 more dense epochs cost about 5 s.
    "quick": {**_SMALL_NET, "dataset": "fashion-scenes", "epochs": 6, "sparsity_epochs": 2, "finetune_epochs": 1,
              "seeds": 2, "flops_targets": [0.7, 0.5, 0.3], "ratios": [0.3, 0.5, 0.7], "train_scenes": 256,
              "test_scenes": 128},
    # the evidence run on 2 CPU cores (docs/results/04_pruning_sparsity-standard-cpu-2core.md): 665 s on
    # fashion-scenes (2026-12-07, 2-core AMD EPYC, one thread); 3 seeds with 8 + 3 epochs took 269 s and left
    # intervals about twice as wide
    "standard": {**_SMALL_NET, "dataset": "fashion-scenes", "epochs": 12, "sparsity_epochs": 4, "finetune_epochs": 1,
                 "seeds": 6,
                 "flops_targets": [0.7, 0.5, 0.3], "ratios": [0.3, 0.5, 0.7], "train_scenes": 384,
                 "test_scenes": 256},
    "full": {"dataset": "cityscapes", "model": "pspnet_resnet50", "width": 1.0, "epochs": 60, "sparsity_epochs": 30,
             "finetune_epochs": 20, "seeds": 3, "flops_targets": [0.8, 0.65, 0.5, 0.35],
             "ratios": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7], "lam": 1e-4, "batch_size": 16, "lr": 0.01, "optimizer": "sgd",
             "bn_init": 0.5, "sparsity_mode": "subgradient", "train_scenes": None, "test_scenes": None,
             "cpu_threads": None},
}


def resolve(params: dict[str, Any]) -> dict[str, Any]:
    """Validate the notebook's parameters and fill the ones left ``None`` from the preset; a preset whose
    data is absent (Cityscapes: the expected layout) and acceleration the device cannot run are refused."""
    params = validate(params, PARAMETERS, where="04_pruning_sparsity")
    preset = PRESETS[params.get("preset", "quick")]
    for key, value in preset.items():
        if params.get(key) is None:
            params[key] = copy.deepcopy(value)
    if params.get("ratio") is not None and params["ratio"] not in params["ratios"]:
        params["ratios"] = sorted({*params["ratios"], params["ratio"]})
    params["flops_targets"] = sorted({float(t) for t in params["flops_targets"]}, reverse=True)
    if not params["flops_targets"]:
        raise ValueError("parameter flops_targets=[] is not valid; allowed: a non-empty list of fractions in (0, 1)")
    params["seed_list"] = [params.get("seed", 0) + i for i in range(params["seeds"])]
    resolve_execution(params)
    check_preset_data(params["dataset"], params["preset"])
    return resolve_params_acceleration(params)


def segmentation_split(dataset: str, split: str, scenes: int) -> Any:
    """``split`` of ``dataset``; ``scenes`` sets the length of generated sets (digit-scenes), a folder
    has the images it has."""
    if dataset == "cityscapes" and split == "test":
        split = "val"  # Cityscapes' test labels are not public: evaluate on val, as the papers do
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


def state_checksum(model: nn.Module) -> str:
    """SHA-256 of every tensor of ``model``'s ``state_dict`` (names and values): equal for equal weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_network(model: str = "pspnet_resnet18", num_classes: int = 11, *, norm: str = "bn", width: float = 0.25,
                  bn_init: float | None = 0.5, seed: int = 0) -> nn.Module:
    """``model`` built under ``seed`` with every BN scale set to ``bn_init`` (Network Slimming's 0.5)."""
    if model not in MODELS:
        raise ValueError(f"model={model!r} is not valid; allowed: {MODELS}")
    from workbench.models import build_model

    seed_everything(seed)
    net = build_model(model, num_classes=num_classes, norm=norm, width=width)
    if bn_init is not None:
        with torch.no_grad():
            for m in net.modules():
                if is_affine_norm(m):
                    m.weight.fill_(bn_init)
    return net


def _sparsity_callback(regime: str, lam: float, mode: str) -> Any:
    if regime == "l1":
        return BNScaleSparsity(lam=lam, mode=mode)
    if regime == "cags":
        return CAGSSparsity(lam=lam, mode=mode)
    return None


def _train(net: nn.Module, regime: str, *, epochs: int, lam: float, batch_size: int, lr: float, optimizer: str,
           sparsity_mode: str, dev: torch.device, seed: int, train_scenes: int | None, test_scenes: int | None,
           dataset: str, progress: bool, epoch_offset: int = 0, amp: str = "off", channels_last: bool = False,
           compile: bool = False) -> dict:
    """Train ``net`` in place under ``regime`` (loader order from ``seed``; ``amp``, ``channels_last`` and
    ``compile`` as :func:`workbench.train.fit` takes them); plain data back."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not valid; allowed: {OPTIMIZERS}")
    train_loader, test_loader, train_set = _loaders(batch_size, seed, train_scenes, test_scenes, dataset)
    num_classes = train_set.num_classes
    start_checksum = state_checksum(net)
    seed_everything(seed)
    recorder = BNScaleProbe(THRESHOLDS)
    sparsity = _sparsity_callback(regime, lam, sparsity_mode)
    callbacks: list = [recorder] if sparsity is None else [sparsity, recorder]
    opt = make_optimizer(net, optimizer, lr, weight_decay=1e-4)
    steps = max(1, epochs * len(train_loader))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    started = time.perf_counter()
    result = fit(net.to(dev), train_loader, None, epochs, optimizer=opt, scheduler=scheduler,
                 scheduler_interval="step", callbacks=callbacks, device=dev, task="segmentation",
                 ignore_index=_ignore_index(train_set), num_classes=num_classes, progress=progress, amp=amp,
                 channels_last=channels_last, compile=compile)
    metrics = _segment_metrics(net, test_loader, dev, num_classes)
    for record in recorder.records:  # epochs count from the dense network's start
        record["epoch"] += epoch_offset
    return {
        "regime": regime, "seed": seed, "lam": lam if sparsity else 0.0, "optimizer": optimizer, "epochs": epochs,
        "steps": steps, "sparsity_mode": sparsity_mode, "model": net, "history": result.history,
        "scale_records": recorder.records, "fraction_below": sparsity_fraction(bn_scales(net), THRESHOLDS),
        "guidance": {k: v.tolist() for k, v in sparsity.guidance().items()} if regime == "cags" else {},
        "start_checksum": start_checksum, **metrics, "params": sum(p.numel() for p in net.parameters()),
        "train_seconds": time.perf_counter() - started, "device": describe_device(dev),
        "classes": list(getattr(train_set, "classes", [])), "num_classes": num_classes,
    }


def train_seed(*, seed: int = 0, model: str = "pspnet_resnet18", norm: str = "bn", width: float = 0.25,
               epochs: int = 8, sparsity_epochs: int = 4, lam: float = 2e-3, batch_size: int = 16, lr: float = 3e-3,
               optimizer: str = "adamw", bn_init: float | None = 0.5, sparsity_mode: str = "proximal",
               device: Any = "auto", train_scenes: int | None = 512, test_scenes: int | None = 128,
               cpu_threads: int | None = None, progress: bool = False, dataset: str = "digit-scenes",
               amp: str = "off", channels_last: bool = False, compile: bool = False, **_: Any) -> dict[str, dict]:
    """One seed's networks: ``{"plain": dense run, "l1": ..., "cags": ...}``.

    The dense network is built and trained once (``epochs``, no sparsity); ``l1`` and ``cags`` each
    train a deep copy of it for ``sparsity_epochs`` with the same ``lam``, optimiser, schedule and
    batch order (the loader is seeded by ``seed``). Each run records ``start_checksum``, the
    checksum of the weights it started from, so the pairing can be checked.
    """
    if model not in MODELS:
        raise ValueError(f"model={model!r} is not valid; allowed: {MODELS}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not valid; allowed: {OPTIMIZERS}")
    dev = resolve_device(device)
    num_classes = segmentation_split(dataset, "train", train_scenes).num_classes
    common = dict(lam=lam, batch_size=batch_size, lr=lr, optimizer=optimizer, sparsity_mode=sparsity_mode, dev=dev,
                  seed=seed, train_scenes=train_scenes, test_scenes=test_scenes, dataset=dataset, progress=progress,
                  amp=amp, channels_last=channels_last, compile=compile)
    with limit_cpu_threads(cpu_threads, dev):
        dense = build_network(model, num_classes, norm=norm, width=width, bn_init=bn_init, seed=seed)
        runs = {"plain": _train(dense, "plain", epochs=epochs, **common)}
        for regime in SPARSE_REGIMES:
            runs[regime] = _train(copy.deepcopy(dense), regime, epochs=sparsity_epochs, epoch_offset=epochs, **common)
    runs["plain"]["dense_checksum"] = state_checksum(dense)
    for run in runs.values():
        run.update(model_name=model, norm=norm, width=width, bn_init=bn_init)
    return runs


def check_arms(arms: Sequence[str]) -> list[str]:
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise ValueError(f"arms {list(arms)!r} are not valid; allowed: a non-empty subset of {METHODS}")
    return list(arms)


def prune_arm(runs: dict[str, dict], arm: str) -> tuple[nn.Module, dict]:
    """The network ``arm`` prunes and the keyword arguments of :func:`prune` that rank it (see :data:`ARMS`)."""
    regime, method = ARMS[arm]
    source = runs[regime]
    options: dict[str, Any] = {"method": method}
    if method == "cap":
        options["guidance"] = {k: torch.tensor(v) for k, v in source["guidance"].items()}
    return source["model"], options


def finetune(net: nn.Module, train_loader: Any, epochs: int, *, lr: float, optimizer: str, seed: int,
             dev: torch.device, num_classes: int, ignore_index: int, progress: bool = False, amp: str = "off",
             channels_last: bool = False, compile: bool = False) -> None:
    """Fine-tune a pruned ``net`` in place: ``optimizer`` at ``0.3 * lr``, cosine over the steps, batch
    order from ``seed`` (the same for every arm of a seed); ``amp``, ``channels_last`` and ``compile`` as
    :func:`workbench.train.fit` takes them."""
    if epochs <= 0:
        return
    seed_everything(seed)
    opt = make_optimizer(net, optimizer, lr * 0.3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(train_loader))
    fit(net, train_loader, None, epochs, optimizer=opt, scheduler=scheduler, scheduler_interval="step", device=dev,
        task="segmentation", num_classes=num_classes, ignore_index=ignore_index, progress=progress, amp=amp,
        channels_last=channels_last, compile=compile)


def prune_sweep(runs: dict[str, dict], ratios: Sequence[float], methods: Sequence[str] = ("slimming", "cap"), *,
                finetune_epochs: int = 3, lr: float = 3e-3, optimizer: str = "adamw", batch_size: int = 16,
                device: Any = "auto", seed: int = 0, train_scenes: int | None = 512, test_scenes: int | None = 128,
                cpu_threads: int | None = None, latency_batch: int = 8, progress: bool = False,
                keep_models: bool = False, dataset: str = "digit-scenes", amp: str = "off",
                channels_last: bool = False, compile: bool = False, **_: Any) -> list[dict]:
    """Prune each arm's network (:data:`ARMS`) at every channel ratio, evaluate, optionally fine-tune.

    Returns tidy rows ``{method, source, ratio, params_*, flops_*, latency_ms_*, miou_unpruned,
    miou_pruned, miou_finetuned, channel_ratio, layers}`` (``layers``: BN name -> (before, after));
    ``miou_finetuned`` is ``None`` when ``finetune_epochs`` is 0.
    """
    methods = check_arms(methods)
    for r in ratios:
        if not 0 <= r < 1:
            raise ValueError(f"ratios contains {r!r}; allowed: numbers in [0, 1)")
    dev = resolve_device(device)
    train_loader, test_loader, train_set = _loaders(batch_size, seed, train_scenes, test_scenes, dataset)
    num_classes = train_set.num_classes
    example = next(iter(test_loader))[0][:1].to(dev)
    latency_inputs = next(iter(test_loader))[0][:latency_batch].to(dev)
    rows = []
    with limit_cpu_threads(cpu_threads, dev):
        for method in methods:
            base, options = prune_arm(runs, method)
            base = base.to(dev)
            for ratio in ratios:
                seed_everything(seed)
                pruned, report = prune(base, ratio, example, latency_inputs=latency_inputs, latency_runs=5, **options)
                before = _segment_metrics(pruned, test_loader, dev, num_classes)
                tuned = None
                if finetune_epochs > 0:
                    finetune(pruned, train_loader, finetune_epochs, lr=lr, optimizer=optimizer, seed=seed, dev=dev,
                             num_classes=num_classes, ignore_index=_ignore_index(train_set), progress=progress,
                             amp=amp, channels_last=channels_last, compile=compile)
                    tuned = _segment_metrics(pruned, test_loader, dev, num_classes)
                d = report.to_dict()
                row = {
                    "method": method, "source": ARMS[method][0], "ratio": ratio,
                    **{k: d[k] for k in ("params_before", "params_after", "params_reduction", "flops_before",
                                         "flops_after", "flops_reduction", "latency_ms_before", "latency_ms_after",
                                         "channel_ratio", "threshold")},
                    "miou_unpruned": runs[ARMS[method][0]]["miou"], "miou_pruned": before["miou"],
                    "miou_finetuned": None if tuned is None else tuned["miou"],
                    "per_class_iou_finetuned": None if tuned is None else tuned["per_class_iou"],
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
