"""Notebook 03_dia_lstm_interrelations: how DIA-LSTM's one shared cell ties the blocks of a stage.

Three measurements, each returning plain data:

- **cross-block correlation** of the attention vectors of the blocks of a stage, for DIA (one cell
  shared by the stage, state carried from block to block) and for the independent per-block
  attention of SE and IEBN as the baseline; two readings of "correlation" (see
  :func:`cross_layer_correlation`);
- the DIA-LSTM **gates** ``i, f, o``, candidate ``g`` and **states** ``c, h`` per block
  (:class:`workbench.probes.dia.DIARecorder`), and the **ablation** shared-LSTM vs independent SE:
  accuracy, parameters, correlation structure;
- the DIANet paper's **stabilisation study**: networks without skip connections and without BN,
  each without attention, with SE and with DIA: training loss, gradient norm per stage, accuracy
  (one seed; the paired-seed trial of the claim is
  :mod:`workbench.experiments.dia_stabilisation_evidence`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from workbench.device import resolve_device
from workbench.experiments.acceleration import acceleration_options, resolve_params_acceleration
from workbench.experiments.attention import MODELS, build, eval_batch, limit_cpu_threads, train_classifier
from workbench.experiments.dataset_choice import dataset_param, fill_preset_dataset
from workbench.experiments.dia_stabilisation_evidence import PARAMETERS as EVIDENCE_PARAMETERS
from workbench.experiments.dia_stabilisation_evidence import resolve_evidence
from workbench.params import ACCELERATION, COMMON, EXECUTION, Param, resolve_execution, validate
from workbench.probes.attention import AttentionRecorder, attention_sites
from workbench.probes.grad_norms import StageGradNorms  # noqa: F401 - also importable from here

CORRELATION_MODES = ("profile", "sample")
STAB_CONDITIONS = {"no skip": {"skip": False}, "no BN": {"norm": "none"}}
STAB_ATTENTIONS = ("none", "se", "dia")

PARAMETERS = {
    **COMMON,
    **ACCELERATION,
    **EXECUTION,
    "dataset": dataset_param("classification", nullable=True,
                             help="None: the preset's (fashion-mnist / cifar100); a registered name or a folder path"),
    "model": Param(str, choices=MODELS, help="CIFAR ResNet with DIA-LSTM attention"),
    "norm": Param(str, choices=("bn", "iebn"), help="normalisation of the DIA/SE models of the ablation"),
    "layer": Param(str, nullable=True, help="stage shown in the detail views (e.g. 'layer2'); None: the middle one"),
    "num_samples": Param(int, min=8, max=100_000, help="test samples behind the correlations and gate curves"),
    "preset": Param(str, choices=("quick", "standard", "full"),
                    help="quick: smoke run (2 CPU cores); standard: the stabilisation trial's evidence run on 2 CPU "
                         "cores; full: paper-sized (CIFAR-100, GPU)"),
    **EVIDENCE_PARAMETERS,
}

PRESETS = {
    # quick: the shipped Fashion-MNIST subset (5,000 training photos) at 16x16; 2 epochs see about as many
    # images as the 5 (ablation) and 8 (one-seed study) epochs over the 1,437 digits used before
    "quick": dict(dataset="fashion-mnist", width=0.5, image_size=16, epochs=2, batch_size=64, lr=0.1, stab_epochs=2,
                  stab_lr=0.05, grad_every=2, cpu_threads=1),
    # standard: the ablation and the one-seed study as in quick; the evidence is the paired trial
    # (workbench.experiments.dia_stabilisation_evidence.PRESETS)
    "standard": dict(dataset="fashion-mnist", width=0.5, image_size=16, epochs=2, batch_size=64, lr=0.1,
                     stab_epochs=2, stab_lr=0.05, grad_every=2, cpu_threads=1),
    "full": dict(dataset="cifar100", width=1.0, image_size=32, epochs=60, batch_size=128, lr=0.1, stab_epochs=30,
                 stab_lr=0.05, grad_every=10, cpu_threads=None),
}


def resolve(params: dict[str, Any]) -> dict[str, Any]:
    """Validate the notebook's parameters, fill what the preset decides, check ``layer`` names a
    stage of the DIA model and that the stabilisation trial can give a verdict (at least 2 seeds,
    known conditions); a preset whose data is absent and acceleration the device cannot run are
    refused here, before any training."""
    params = validate(params, PARAMETERS, where="03_dia_lstm_interrelations")
    params.update({k: v for k, v in PRESETS[params["preset"]].items() if k != "dataset"})
    fill_preset_dataset(params, PRESETS)
    resolve_params_acceleration(params)
    resolve_evidence(params)
    resolve_execution(params)
    stages = list(block_groups(attention_sites(build(params["model"], "bn", "dia", params["width"]), "dia")))
    if params["layer"] is None:
        params["layer"] = stages[len(stages) // 2]
    elif params["layer"] not in stages:
        raise ValueError(f"layer={params['layer']!r} is not a stage of the DIA model; allowed: {', '.join(stages)}")
    return params


# ----------------------------------------------------------------------------------------------
# Sites -> stages and blocks

_CALL = re.compile(r"^(.*)\[(\d+)\]$")


def parse_site(name: str) -> tuple[str, int, str] | None:
    """``(stage, block, role)`` of a site name, or ``None`` when it is not inside a stage.

    ``layer2.3.bn1`` -> ("layer2", 3, "bn1"); a shared module's per-call key ``layer2.dia[3]``
    -> ("layer2", 3, "dia")."""
    m = _CALL.match(name)
    if m:
        base, block = m.group(1), int(m.group(2))
        stage, _, role = base.rpartition(".")
        return (stage, block, role) if stage else (base, block, base)
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1:]) or "block"
    return None


def block_groups(sites: dict[str, str]) -> dict[str, list[str]]:
    """Stage -> the site names of one attention per block, in block order.

    ``sites``: site -> kind (as :func:`workbench.probes.attention.attention_sites` returns). SE and
    DIA have one site per block. IEBN has one per BN; the one kept is the block's last (the gate on
    the residual branch's output, where SE and DIA act). Stages with fewer than two blocks are
    dropped (no cross-block structure to measure)."""
    by_stage: dict[str, dict[str, dict[int, str]]] = {}
    role_order: dict[str, list[str]] = {}
    for name in sites:
        parsed = parse_site(name)
        if parsed is None:
            continue
        stage, block, role = parsed
        by_stage.setdefault(stage, {}).setdefault(role, {})[block] = name
        roles = role_order.setdefault(stage, [])
        if role not in roles:
            roles.append(role)
    groups = {}
    for stage, roles in by_stage.items():
        order = role_order[stage]
        preferred = [r for r in order if any(sites[n] in ("se", "dia") for n in roles[r].values())]
        # IEBN: the role present in most blocks, the later one on a tie (bn2 of basic, bn3 of bottleneck blocks)
        role = preferred[0] if preferred else max(order, key=lambda r: (len(roles[r]), order.index(r)))
        blocks = roles[role]
        if len(blocks) >= 2:
            groups[stage] = [blocks[b] for b in sorted(blocks)]
    return groups


# ----------------------------------------------------------------------------------------------
# Correlation


def cross_layer_correlation(vectors: Sequence[Tensor], mode: str = "profile") -> Tensor:
    """``(L, L)`` correlation of the attention of ``L`` layers, each ``(N, C)`` (same N and C).

    ``profile``: per sample, the Pearson correlation over channels of the two layers' attention
    vectors (do the layers favour the same channels for this input?), averaged over samples.
    ``sample``: per channel, the Pearson correlation over samples (does channel c move up and down
    with the input in both layers?), averaged over channels. Each is a mean of correlation matrices,
    hence symmetric, positive semi-definite, with a unit diagonal; a layer whose attention is
    constant along the correlated axis contributes 0 off the diagonal."""
    if mode not in CORRELATION_MODES:
        raise ValueError(f"mode={mode!r} is not valid; allowed: {CORRELATION_MODES}")
    if len(vectors) < 1:
        raise ValueError("vectors is empty: need the (N, C) attention of at least one layer")
    shapes = {tuple(v.shape) for v in vectors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every attention must be (N, C) with one shape; got {sorted(shapes)}")
    x = torch.stack([v.detach().to(torch.float64) for v in vectors])  # (L, N, C)
    axis = -1 if mode == "profile" else 1
    x = x - x.mean(axis, keepdim=True)
    rms = x.square().mean(axis, keepdim=True).sqrt()
    # A constant vector has no direction to correlate: it contributes 0, the diagonal is set to 1.
    z = torch.where(rms > 1e-12, x / rms.clamp_min(1e-12), torch.zeros_like(x))
    n_obs = x.shape[axis]
    if mode == "profile":
        corr = torch.einsum("lnc,mnc->lm", z, z) / (n_obs * x.shape[1])
    else:
        corr = torch.einsum("lnc,mnc->lm", z, z) / (n_obs * x.shape[2])
    corr = (corr + corr.T) / 2
    corr.fill_diagonal_(1.0)
    return corr.clamp(-1.0, 1.0).float()


def correlation_summary(corr: Tensor) -> dict:
    """Mean off-diagonal correlation and the mean at each block distance 1..L-1."""
    n = corr.shape[0]
    if n < 2:
        return {"mean": float("nan"), "by_distance": []}
    off = corr[~torch.eye(n, dtype=torch.bool)]
    by_distance = [float(torch.diagonal(corr, d).mean()) for d in range(1, n)]
    return {"mean": float(off.mean()), "by_distance": by_distance}


@torch.no_grad()
def stage_correlations(net: nn.Module, inputs: Tensor, kinds: str | Sequence[str] | None = None,
                       modes: Sequence[str] = CORRELATION_MODES) -> dict:
    """Per stage and mode: the cross-block correlation matrix of the model's attention (eval
    mode), its mean off-diagonal value and the mean by block distance."""
    sites = attention_sites(net, kinds)
    was_training = net.training
    net.eval()
    try:
        attention = AttentionRecorder(net, kinds).attribute(inputs)
    finally:
        net.train(was_training)
    groups = block_groups({name: sites.get(name.split("[")[0], "") for name in attention})
    out: dict[str, Any] = {"stages": list(groups), "blocks": groups, "matrices": {}, "mean": {}, "by_distance": {}}
    for mode in modes:
        out["matrices"][mode], out["mean"][mode], out["by_distance"][mode] = {}, {}, {}
        for stage, names in groups.items():
            corr = cross_layer_correlation([attention[n] for n in names], mode)
            summary = correlation_summary(corr)
            out["matrices"][mode][stage] = corr.tolist()
            out["mean"][mode][stage] = summary["mean"]
            out["by_distance"][mode][stage] = summary["by_distance"]
        out["mean"][mode]["all"] = _nanmean(list(out["mean"][mode].values()))
    return out


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


# ----------------------------------------------------------------------------------------------
# Stabilisation study


def stabilisation_study(model: str = "resnet20", norm: str = "bn", width: float = 0.5, epochs: int = 4,
                        batch_size: int = 64, lr: float = 0.05, grad_every: int = 2, image_size: int = 32,
                        device: str = "auto", seed: int = 0, conditions: dict[str, dict] | None = None,
                        attentions: Sequence[str] = STAB_ATTENTIONS, cpu_threads: int | None = None,
                        progress: bool = True, dataset: str = "digits", amp: str = "off",
                        channels_last: bool = False, compile: bool = False) -> dict:
    """Train each condition (default: ``skip=False``; ``norm="none"``) without attention, with SE
    and with DIA, under one recipe. Returns per condition and attention: epoch history, per-step
    loss, gradient norm per stage, test accuracy, divergence message, parameters, wall time.
    ``amp``, ``channels_last`` and ``compile`` apply to every training run."""
    conditions = dict(STAB_CONDITIONS if conditions is None else conditions)
    bad = [a for a in attentions if a not in STAB_ATTENTIONS]
    if bad:
        raise ValueError(f"attentions={list(attentions)!r} is not valid; allowed: a subset of {STAB_ATTENTIONS}")
    runs: dict[str, dict[str, dict]] = {}
    with limit_cpu_threads(cpu_threads, device):
        for cond, options in conditions.items():
            runs[cond] = {}
            for attention in attentions:
                grad = StageGradNorms(every=grad_every)
                setting = {"norm": norm, "skip": True, **options}
                run = train_classifier(model, setting["norm"], attention, skip=setting["skip"], width=width,
                                       epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size,
                                       device=device, seed=seed, callbacks=[grad], progress=progress,
                                       dataset=dataset, amp=amp, channels_last=channels_last, compile=compile)
                steps, norms = grad.series()
                runs[cond][attention] = {
                    "history": run["history"], "test_acc": run["test_acc"], "diverged": run["diverged"],
                    "params": run["params"], "train_seconds": run["train_seconds"],
                    "steps": steps, "step_loss": [e["loss"] for e in grad.records], "grad_norms": norms,
                    "epoch_loss": [h["train_loss"] for h in run["history"]],
                }
    return {"conditions": list(conditions), "attentions": list(attentions), "runs": runs,
            "final_acc": {c: {a: r["test_acc"] for a, r in per.items()} for c, per in runs.items()}}


# ----------------------------------------------------------------------------------------------
# Ablation: shared DIA-LSTM vs independent attention


def ablation(model: str = "resnet20", norm: str = "bn", width: float = 0.5, epochs: int = 5, batch_size: int = 64,
             lr: float = 0.1, image_size: int = 32, device: str = "auto", seed: int = 0, num_samples: int = 256,
             cpu_threads: int | None = None, progress: bool = True, include_iebn: bool = True,
             dataset: str = "digits", amp: str = "off", channels_last: bool = False, compile: bool = False) -> dict:
    """Train DIA and SE (and, with ``include_iebn``, IEBN without extra attention) models of the same
    backbone; per variant: accuracy, parameters, cross-block correlation structure; for DIA also
    the gates and states per block. Returns plain data and the trained models under ``"models"``.
    ``amp``, ``channels_last`` and ``compile`` apply to the training (the measurements run in fp32)."""
    from workbench.probes.dia import DIARecorder, gate_summary

    dev = resolve_device(device)
    variants = {"DIA (shared LSTM)": (norm, "dia"), "SE (independent)": (norm, "se")}
    if include_iebn:
        variants["IEBN (independent)"] = ("iebn", "none")
    inputs, _ = eval_batch(num_samples, dev, image_size, dataset)
    out: dict[str, Any] = {"variants": {}, "correlations": {}, "models": {}, "timings": {}}
    with limit_cpu_threads(cpu_threads, dev):
        for label, (v_norm, v_attention) in variants.items():
            started = time.perf_counter()
            run = train_classifier(model, v_norm, v_attention, width=width, epochs=epochs, batch_size=batch_size, lr=lr,
                                   image_size=image_size, device=dev, seed=seed, progress=progress, dataset=dataset,
                                   amp=amp, channels_last=channels_last, compile=compile)
            corr = stage_correlations(run["model"], inputs)
            out["correlations"][label] = corr
            # the same measurement on the untrained network: how much of the structure is built in
            torch.manual_seed(seed)
            untrained = build(model, v_norm, v_attention, width, run["num_classes"]).to(dev)
            init_corr = stage_correlations(untrained, inputs, modes=("profile", "sample"))
            out["variants"][label] = {"norm": v_norm, "attention": v_attention, "test_acc": run["test_acc"],
                                      "params": run["params"], "history": run["history"], "diverged": run["diverged"],
                                      "mean_corr": corr["mean"]["profile"]["all"],
                                      "mean_corr_sample": corr["mean"]["sample"]["all"],
                                      "init_mean_corr": init_corr["mean"]["profile"]["all"],
                                      "init_mean_corr_sample": init_corr["mean"]["sample"]["all"]}
            out["models"][label] = run["model"]
            if v_attention == "dia":
                net = run["model"].eval()
                with DIARecorder(net) as rec, torch.no_grad():
                    net(inputs)
                states = rec.states()
                out["dia"] = gate_summary(states)
                out["dia_states"] = {stage: [{k: v.cpu() for k, v in block.items()} for block in blocks]
                                     for stage, blocks in states.items()}
            out["timings"][label] = time.perf_counter() - started
    return out


def gate_curves_for(states: dict[str, list[dict[str, Tensor]]], stage: str, sample: int, channel: int = -1) -> dict:
    """Gate and hidden-state curves over the blocks of ``stage`` for one image, for one channel
    (``channel >= 0``) or averaged over channels (``-1``): ``{"i": [...], "f": ..., "o": ..., "g": ...,
    "h": ...}``, one value per block."""
    if stage not in states:
        raise ValueError(f"stage={stage!r} is not valid; allowed: {', '.join(states)}")
    blocks = states[stage]
    n, c = blocks[0]["h"].shape
    if not 0 <= sample < n:
        raise ValueError(f"sample={sample!r} is out of range; allowed: 0..{n - 1}")
    if not -1 <= channel < c:
        raise ValueError(f"channel={channel!r} is out of range; allowed: -1 (mean) or 0..{c - 1} for {stage}")
    out = {}
    for key in ("i", "f", "o", "g", "h"):
        values = [b[key][sample] for b in blocks]
        out[key] = [float(v.mean() if channel < 0 else v[channel]) for v in values]
    return out


def run_ablation(params: dict[str, Any], progress: bool = True) -> dict:
    """:func:`ablation` with the notebook's resolved parameters."""
    keys = ("model", "norm", "width", "epochs", "batch_size", "lr", "image_size", "device", "seed", "num_samples",
            "cpu_threads")
    return ablation(**{k: params[k] for k in keys}, dataset=params.get("dataset", "digits"), progress=progress,
                    **acceleration_options(params))


def run_stabilisation(params: dict[str, Any], progress: bool = True) -> dict:
    """:func:`stabilisation_study` with the notebook's resolved parameters (its own epochs and lr)."""
    keys = ("model", "norm", "width", "batch_size", "grad_every", "image_size", "device", "seed", "cpu_threads")
    return stabilisation_study(**{k: params[k] for k in keys}, epochs=params["stab_epochs"], lr=params["stab_lr"],
                               dataset=params.get("dataset", "digits"), progress=progress,
                               **acceleration_options(params))


def summary_lines(ablation_result: dict, stabilisation_result: dict) -> list[str]:
    """What the measurements show, as sentences built from the numbers (no claim without its number)."""
    lines = []
    variants = ablation_result["variants"]
    for name, v in variants.items():
        lines.append(f"{name}: mean cross-block correlation {v['mean_corr']:+.3f} (profile; untrained "
                     f"{v['init_mean_corr']:+.3f}), {v['mean_corr_sample']:+.3f} (sample; untrained "
                     f"{v['init_mean_corr_sample']:+.3f}); test accuracy {v['test_acc']:.3f} with {v['params']:,} "
                     "parameters.")
    for cond, per in stabilisation_result["runs"].items():
        parts = []
        for attention, r in per.items():
            loss = r["epoch_loss"][-1] if r["epoch_loss"] else float("nan")
            state = "diverged" if r["diverged"] else f"final train loss {loss:.3f}"
            parts.append(f"{attention}: accuracy {r['test_acc']:.3f}, {state}")
        first_stage = {a: next(iter(r["grad_norms"].values()), [float("nan")]) for a, r in per.items()}
        grads = ", ".join(f"{a} {v[-1]:.2g}" for a, v in first_stage.items() if v)
        lines.append(f"{cond}: " + "; ".join(parts) + f". Last stem gradient norm: {grads}.")
    return lines
