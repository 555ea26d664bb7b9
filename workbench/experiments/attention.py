"""Notebook 02_attention_weights: what the channel attention of IEBN, SE and DIA does.

Trains one small CIFAR-style ResNet (the quick preset: on the shipped Fashion-MNIST subset), then measures
on the test split: the per-sample attention of every site (statistics per layer, channel and class), how the attention
shifts when batch-statistic noise is injected into the normalisation layers, and how well the
attention ranks channels the way captum's attributions do (LayerGradCam per channel and
LayerConductance, Spearman rank correlation per layer). Everything returns plain data.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from workbench.data import accepted_options, get_dataset, make_loader
from workbench.device import describe_device, resolve_device, seed_everything
from workbench.experiments.acceleration import resolve_params_acceleration
from workbench.experiments.dataset_choice import dataset_param, fill_preset_dataset
from workbench.params import ACCELERATION, COMMON, Param, validate
from workbench.probes.attention import AttentionRecorder, AttentionStats, collect_attention, resolve_sites
from workbench.train import Callback, NonFiniteLossError, default_optimizer, evaluate, fit

MODELS = ("resnet20", "resnet32", "resnet56", "resnet110", "resnet164", "preresnet164")
NORMS = ("bn", "iebn", "none")
ATTENTIONS = ("none", "se", "dia")
ATTRIBUTION_METHODS = ("gradcam", "conductance")

PARAMETERS = {
    **COMMON,
    **ACCELERATION,
    "dataset": dataset_param("classification", nullable=True,
                             help="None: the preset's (fashion-mnist / cifar100); a registered name or a folder path"),
    "model": Param(str, choices=MODELS, help="CIFAR ResNet compared across the attention variants"),
    "norm": Param(str, choices=NORMS, help="normalisation of every variant"),
    "attention": Param(str, choices=ATTENTIONS, help="attention variant shown in the detail views"),
    "layer": Param(str, nullable=True, help="attention site shown in detail; None: a site in the middle"),
    "num_samples": Param(int, min=8, max=100_000, help="test samples behind the attention statistics"),
}

PRESETS = {
    # quick: the shipped Fashion-MNIST subset (5,000 training photos) at 16x16; 2 epochs see about as many
    # images as the 8 epochs over the 1,437 digits this preset used before
    "quick": dict(dataset="fashion-mnist", width=0.5, image_size=16, epochs=2, batch_size=64, lr=0.1, cpu_threads=1,
                  noise_levels=[0.0, 0.25, 0.5, 1.0, 2.0], noise_samples=128, captum_samples=48, conductance_steps=8),
    "full": dict(dataset="cifar100", width=1.0, image_size=32, epochs=60, batch_size=128, lr=0.1, cpu_threads=None,
                 noise_levels=[0.0, 0.1, 0.25, 0.5, 1.0, 2.0], noise_samples=512, captum_samples=256,
                 conductance_steps=32),
}


def build(model: str, norm: str, attention: str, width: float, num_classes: int = 10, skip: bool = True) -> nn.Module:
    from workbench.models import build_model

    return build_model(model, num_classes=num_classes, norm=norm, attention=attention, width=width, skip=skip)


def default_layer(sites: Sequence[str]) -> str:
    """The site shown when the notebook names none: the one in the middle of the network."""
    return list(sites)[len(sites) // 2]


def resolve(params: dict[str, Any]) -> dict[str, Any]:
    """Validate the notebook's parameters, check the model has attention sites and that ``layer``
    is one of them, and fill what the preset and the device decide (a preset whose data is absent and
    acceleration the device cannot run are refused here, before any training)."""
    params = validate(params, PARAMETERS, where="02_attention_weights")
    if params["norm"] != "iebn" and params["attention"] == "none":
        raise ValueError(f"norm={params['norm']!r} with attention='none' has no attention sites; allowed: "
                         "norm='iebn' and/or attention='se' or 'dia'")
    params.update({k: v for k, v in PRESETS[params["preset"]].items() if k != "dataset"})
    fill_preset_dataset(params, PRESETS)
    resolve_params_acceleration(params)
    probe_model = build(params["model"], params["norm"], params["attention"], params["width"])
    sites = list(resolve_sites(probe_model))
    if params["layer"] is None:
        params["layer"] = default_layer(sites)
    else:
        resolve_sites(probe_model, layers=[params["layer"]])  # lists the available sites when absent
    return params


# ----------------------------------------------------------------------------------------------
# Training


@contextlib.contextmanager
def limit_cpu_threads(threads: int | None, device: str | torch.device = "auto") -> Iterator[None]:
    """Limit torch's intra-op threads on the CPU for the duration (restored afterwards).

    Why: the quick preset's networks are tiny; on a 2-core machine shared with other work, two
    intra-op threads made an epoch 5-15x slower than one (OpenMP threads waiting on each other
    while the other core is busy), and one thread loses little when the machine is idle.
    ``None`` or a non-CPU device leaves the setting alone."""
    if threads is None or resolve_device(device).type != "cpu":
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r} is not valid; allowed: None or an int >= 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def dataset_split(dataset: str, split: str, image_size: int | None, augment: bool = False) -> Any:
    """``split`` of ``dataset`` at ``image_size`` where the dataset resizes (digits, fashion-mnist, folders)."""
    return get_dataset(dataset, split, **accepted_options(dataset, size=image_size, augment=augment or None))


def train_classifier(model: str = "resnet20", norm: str = "bn", attention: str = "none", *, skip: bool = True,
                     width: float = 0.5, epochs: int = 6, batch_size: int = 64, lr: float = 0.1,
                     image_size: int = 32, device: str | torch.device = "auto", seed: int = 0,
                     callbacks: Sequence[Callback] = (), progress: bool = True, dataset: str = "digits",
                     amp: str = "off", channels_last: bool = False, compile: bool = False, **_: Any) -> dict:
    """Train a classifier on ``dataset`` (digits by default; SGD, one-cycle schedule); a run whose loss
    turns NaN/inf stops there and is reported as diverged (its accuracy is still evaluated) instead of
    raising. ``amp``, ``channels_last`` and ``compile`` go to :func:`workbench.train.fit`."""
    dev = resolve_device(device)
    seed_everything(seed)
    train_set = dataset_split(dataset, "train", image_size, augment=True)
    test_set = dataset_split(dataset, "test", image_size)
    train_loader = make_loader(train_set, batch_size, train=True, seed=seed)
    test_loader = make_loader(test_set, 256, train=False)
    net = build(model, norm, attention, width, train_set.num_classes, skip=skip)
    optimizer = default_optimizer(net, lr=lr, weight_decay=5e-4)
    steps = epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    started = time.perf_counter()
    history, step_log, diverged = [], [], None
    try:
        result = fit(net, train_loader, test_loader, epochs, optimizer=optimizer, scheduler=scheduler,
                     scheduler_interval="step", device=dev, callbacks=callbacks, progress=progress, amp=amp,
                     channels_last=channels_last, compile=compile)
        history, step_log = result.history, result.step_log
    except NonFiniteLossError as exc:
        diverged = str(exc)
    wall = time.perf_counter() - started
    test = evaluate(net, test_loader, dev, amp=amp, channels_last=channels_last)
    return {"model": net, "history": history, "step_log": step_log, "test_acc": test["acc"],
            "test_loss": test["loss"], "diverged": diverged, "params": sum(p.numel() for p in net.parameters()),
            "train_seconds": wall, "device": describe_device(dev), "classes": list(train_set.classes),
            "num_classes": train_set.num_classes}


def eval_batch(num_samples: int, device: str | torch.device, image_size: int = 32,
               dataset: str = "digits") -> tuple[Tensor, Tensor]:
    """The first ``num_samples`` test images and labels (the split's fixed order), on ``device``."""
    test_set = dataset_split(dataset, "test", image_size)
    loader = make_loader(test_set, min(num_samples, len(test_set)), train=False)
    inputs, targets = next(iter(loader))
    dev = resolve_device(device)
    return inputs.to(dev), targets.to(dev)


# ----------------------------------------------------------------------------------------------
# Attention statistics


def attention_statistics(net: nn.Module, device: str | torch.device, num_samples: int, num_classes: int = 10,
                         batch_size: int = 128, image_size: int = 32, dataset: str = "digits") -> AttentionStats:
    """Per-site attention statistics over the first ``num_samples`` test images (eval mode)."""
    loader = make_loader(dataset_split(dataset, "test", image_size), batch_size, train=False)
    return collect_attention(net, loader, resolve_device(device), num_classes=num_classes,
                             max_samples=num_samples, keep=num_samples)


def stats_views(stats: AttentionStats, classes: Sequence[str]) -> dict:
    """Plain data for the figures: mean per layer and channel, per-sample values, spread across
    samples (mean over channels of the per-channel std) and across channels (std of the channel means)."""
    return {
        "means": {name: stats.mean[name].tolist() for name in stats.layers},
        "channel_spread": {name: float(stats.mean[name].std(correction=0)) for name in stats.layers},
        "samples": {name: stats.samples[name].tolist() for name in stats.layers},
        "spread": stats.spread(),
        "kinds": dict(stats.kinds),
        "classes": list(classes),
    }


def channel_values_by_class(stats: AttentionStats, layer: str, channel: int, classes: Sequence[str]) -> dict:
    """Retained per-sample attention of one channel, split by class (for the channel view)."""
    if layer not in stats.samples:
        raise ValueError(f"layer={layer!r} is not valid; allowed: {', '.join(stats.layers)}")
    values = stats.samples[layer]
    if not 0 <= channel < values.shape[1]:
        raise ValueError(f"channel={channel!r} is out of range; allowed: 0..{values.shape[1] - 1} for {layer}")
    if stats.sample_targets is None:
        return {"all": values[:, channel].tolist()}
    return {str(classes[k]): values[stats.sample_targets == k, channel].tolist()
            for k in range(len(classes)) if bool((stats.sample_targets == k).any())}


# ----------------------------------------------------------------------------------------------
# Shift under batch noise


@torch.no_grad()
def attention_noise_shift(net: nn.Module, inputs: Tensor, levels: Sequence[float], kind: str = "mean",
                          seed: int = 0) -> dict:
    """Mean absolute change of every site's attention when batch-statistic noise of each level is
    injected, against the clean forward. Both forwards run in training mode (the noise acts only
    there) on a deep copy, so the trained model's running statistics are untouched. Also returns
    the mean attention per level and site."""
    from workbench.noise.batch_stat import batch_stat_noise

    levels = [float(v) for v in levels]
    if not levels or any(not math.isfinite(v) or v < 0 for v in levels):
        raise ValueError(f"levels={levels!r} is not valid; allowed: a non-empty list of finite values >= 0")
    model = copy.deepcopy(net).train()
    recorder = AttentionRecorder(model)
    clean = recorder.attribute(inputs)
    shift: dict[str, list[float]] = {name: [] for name in clean}
    mean: dict[str, list[float]] = {name: [] for name in clean}
    for level in levels:
        with batch_stat_noise(model, level, kind=kind, seed=seed):
            noisy = recorder.attribute(inputs)
        for name, a in noisy.items():
            shift[name].append(float((a - clean[name]).abs().mean()))
            mean[name].append(float(a.mean()))
    return {"levels": levels, "kind": kind, "shift": shift, "mean": mean}


# ----------------------------------------------------------------------------------------------
# captum attributions vs attention


def site_module(model: nn.Module, site: str) -> nn.Module:
    """The module whose output is the feature map the attention of ``site`` scales, for captum.

    IEBN and SE: the module owning the probe (the IEBN layer's output and the SE-scaled branch,
    i.e. after the attention). DIA: the stage multiplies the branch by the cell's ``h`` outside any
    module, so the layer is the block's last residual-branch layer (``last_branch_layer()``: the
    branch just *before* the attention). For a channel-wise scale ``y = h * x`` the GradCAM
    product (spatial-mean gradient x activation) is the same on either side, up to the gradient
    that flows back through the cell's input."""
    probe = resolve_sites(model, layers=[site])[site]
    for _name, module in model.named_modules():
        if any(child is probe for child in module.children()):
            if probe.kind == "dia":
                if not hasattr(module, "last_branch_layer"):
                    raise ValueError(f"site {site!r}: DIA block {type(module).__name__} has no last_branch_layer(); "
                                     "captum needs the module whose output the attention scales")
                return module.last_branch_layer()
            return module
    raise ValueError(f"site {site!r} has no owning module in {type(model).__name__}")


def spearman(a: Sequence[float] | Tensor, b: Sequence[float] | Tensor) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy.stats import spearmanr

    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(f"spearman needs two equally long vectors of >= 2 values, got {a.numel()} and {b.numel()}")
    if bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return float("nan")
    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def channel_attributions(net: nn.Module, inputs: Tensor, targets: Tensor, site: str,
                         methods: Sequence[str] = ATTRIBUTION_METHODS, n_steps: int = 8,
                         internal_batch_size: int | None = None) -> dict[str, Tensor]:
    """Per-sample, per-channel attribution ``(N, C)`` at the feature map ``site`` scales.

    ``gradcam``: LayerGradCam with ``attr_dim_summation=False`` (spatially averaged gradient times
    activation, per channel), averaged over H, W. ``conductance``: LayerConductance from a zero
    input, summed over H, W. Both towards the true class. The model must be in eval mode.
    """
    from captum.attr import LayerConductance, LayerGradCam

    bad = [m for m in methods if m not in ATTRIBUTION_METHODS]
    if bad or not methods:
        raise ValueError(f"methods={list(methods)!r} is not valid; allowed: a subset of {ATTRIBUTION_METHODS}")
    layer = site_module(net, site)
    out: dict[str, Tensor] = {}
    for method in methods:
        if method == "gradcam":
            attr = LayerGradCam(net, layer).attribute(inputs, target=targets, attr_dim_summation=False)
            out[method] = attr.mean((2, 3)).detach()
        else:
            attr = LayerConductance(net, layer).attribute(inputs, baselines=torch.zeros_like(inputs), target=targets,
                                                          n_steps=n_steps, internal_batch_size=internal_batch_size)
            out[method] = attr.sum((2, 3)).detach()
        if out[method].dim() != 2:
            raise ValueError(f"site {site!r}: {method} gave shape {tuple(attr.shape)}, expected (N, C, H, W)")
    return out


def attribution_agreement(net: nn.Module, inputs: Tensor, targets: Tensor, sites: Sequence[str] | None = None,
                          methods: Sequence[str] = ATTRIBUTION_METHODS, n_steps: int = 8,
                          progress: bool = False) -> dict:
    """Per site: the mean attention per channel, each method's channel importance (mean over
    samples of the absolute per-sample channel attribution) and their Spearman rank correlation.

    Runs in eval mode (restored afterwards), on the inputs' device."""
    was_training = net.training
    net.eval()
    try:
        recorder = AttentionRecorder(net, layers=sites)
        attention = recorder.attribute(inputs)
        names = [n for n in attention if "[" not in n]  # a shared probe's per-call keys have no own module
        iterator = names
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(names, desc="captum", leave=False)
        importance: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
        rho: dict[str, dict[str, float]] = {m: {} for m in methods}
        att_mean: dict[str, list[float]] = {}
        for site in iterator:
            att = attention[site].float().mean(0).cpu()
            att_mean[site] = att.tolist()
            attrs = channel_attributions(net, inputs, targets, site, methods, n_steps=n_steps)
            for method, attr in attrs.items():
                imp = attr.abs().mean(0).cpu()
                if imp.numel() != att.numel():
                    raise ValueError(f"site {site!r}: {method} gave {imp.numel()} channels, attention has "
                                     f"{att.numel()}")
                importance[method][site] = imp.tolist()
                rho[method][site] = spearman(att, imp)
    finally:
        net.train(was_training)
    return {"sites": names, "attention": att_mean, "importance": importance, "rho": rho,
            "mean_rho": {m: _nanmean(list(rho[m].values())) for m in methods}}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


# ----------------------------------------------------------------------------------------------
# The whole notebook


def run_attention_study(model: str = "resnet20", norm: str = "iebn", attention: str = "dia", width: float = 0.5,
                        epochs: int = 6, batch_size: int = 64, lr: float = 0.1, image_size: int = 32,
                        device: str = "auto", seed: int = 0, num_samples: int = 256,
                        noise_levels: Sequence[float] = (0.0, 0.5, 1.0), noise_samples: int = 128,
                        captum_samples: int = 48, conductance_steps: int = 8, cpu_threads: int | None = None,
                        progress: bool = True, dataset: str = "digits", callbacks: Sequence[Callback] = (),
                        amp: str = "off", channels_last: bool = False, compile: bool = False, **_: Any) -> dict:
    """Train, then measure attention statistics, the shift under batch noise and the agreement with
    captum attributions. Returns plain data plus the trained model (``"model"``). ``cpu_threads``
    limits torch's CPU threads meanwhile (see :func:`limit_cpu_threads`); ``callbacks`` (e.g. the
    gate-engagement probe) go to the training loop; ``amp``, ``channels_last`` and ``compile`` apply to
    the training (the measurements run in fp32, eagerly)."""
    timings: dict[str, float] = {}
    with limit_cpu_threads(cpu_threads, device):
        started = time.perf_counter()
        run = train_classifier(model, norm, attention, width=width, epochs=epochs, batch_size=batch_size, lr=lr,
                               image_size=image_size, device=device, seed=seed, progress=progress, dataset=dataset,
                               callbacks=callbacks, amp=amp, channels_last=channels_last, compile=compile)
        timings["train"] = time.perf_counter() - started
        net, dev = run["model"], resolve_device(device)

        t = time.perf_counter()
        stats = attention_statistics(net, dev, num_samples, run["num_classes"], image_size=image_size,
                                     dataset=dataset)
        timings["statistics"] = time.perf_counter() - t

        t = time.perf_counter()
        noise_inputs, _ = eval_batch(noise_samples, dev, image_size, dataset)
        noise = attention_noise_shift(net, noise_inputs, noise_levels, kind="mean", seed=seed)
        timings["noise"] = time.perf_counter() - t

        t = time.perf_counter()
        inputs, targets = eval_batch(min(captum_samples, num_samples), dev, image_size, dataset)
        agreement = attribution_agreement(net, inputs, targets, n_steps=conductance_steps, progress=progress)
        timings["captum"] = time.perf_counter() - t

    return {"train": {k: v for k, v in run.items() if k != "model"}, "model": net, "stats": stats,
            "views": stats_views(stats, run["classes"]), "noise": noise, "agreement": agreement,
            "timings": timings}


# ----------------------------------------------------------------------------------------------
# Cost of recording


@torch.no_grad()
def recording_overhead(model: str = "resnet20", norm: str = "iebn", attention: str = "dia", width: float = 1.0,
                       batch_size: int = 64, image_size: int = 32, device: str | torch.device = "auto",
                       repeats: int = 20, warmup: int = 3, seed: int = 0) -> dict:
    """Eval-mode forward time without and with recorders, interleaved in one run (medians, ms).

    ``attention``: every site recorded by an :class:`AttentionRecorder`; ``attention+dia``: also
    the :class:`~workbench.probes.dia.DIARecorder` (DIA models). Ratios are against the plain forward.
    """
    import statistics

    from workbench.probes.dia import DIARecorder

    dev = resolve_device(device)
    seed_everything(seed)
    net = build(model, norm, attention, width).to(dev).eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev)

    def timed(fn) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return (time.perf_counter() - start) * 1e3

    recorder = AttentionRecorder(net)
    dia = DIARecorder(net) if attention == "dia" else None

    def with_attention() -> None:
        with recorder:
            net(x)
        recorder.clear()

    def with_both() -> None:
        with recorder, dia:
            net(x)
        recorder.clear()
        dia.clear()

    variants = {"plain": lambda: net(x), "attention": with_attention}
    if dia is not None:
        variants["attention+dia"] = with_both
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + repeats):
        for name, fn in variants.items():
            t = timed(fn)
            if i >= warmup:
                times[name].append(t)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"model": model, "norm": norm, "attention": attention, "width": width, "batch_size": batch_size,
            "image_size": image_size, "device": describe_device(dev), "threads": torch.get_num_threads(),
            "sites": len(recorder.probes), "ms": medians,
            "ratio": {k: v / medians["plain"] for k, v in medians.items() if k != "plain"}}
