"""Notebook 04's evidence: CAP against Network Slimming as a paired comparison at equal FLOPs.

Protocol, per seed (:func:`run_seed_comparison`):

1. one dense network, trained once (:func:`workbench.experiments.pruning.train_seed`);
2. L1 and CAGS sparsity training, each from a copy of that dense network, with equal lambda,
   steps, schedule and batch order;
3. for every FLOPs target, each arm (:data:`workbench.experiments.pruning.ARMS`) pruned with
   :func:`workbench.pruning.prune_to_flops` to that fraction of the dense FLOPs (within 2%), not to a
   channel ratio: ``slimming`` (L1 network, ``|gamma|`` ranking), ``cap`` (CAGS network, the same
   ``|gamma|`` ranking: the guide acts once, in the sparsity) and the ablation ``cap_guided`` (CAGS
   network ranked by ``|gamma|`` times the layer-normalised guide, the guide used a second time);
4. equal fine-tuning (epochs, learning rate, batch order) and the test mIoU before and after it.

The rows (arm x seed x target) go through :func:`workbench.recipe.verdicts_from_rows`: per target
the paired difference ``cap - slimming`` of the fine-tuned mIoU with its 95% interval, the verdict
in words and the seeds a decisive answer would need; the ablation's ``cap_guided - cap`` likewise.
Bad input (fewer than 2 seeds, a FLOPs target out of reach, missing data) is refused by
:func:`check_comparison` before any training.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from workbench.device import resolve_device, seed_everything
from workbench.experiments.attention import limit_cpu_threads
from workbench.experiments.pruning import (
    ARMS,
    _ignore_index,
    _is_norm_name,
    _loaders,
    _segment_metrics,
    build_network,
    check_arms,
    finetune,
    prune_arm,
    segmentation_split,
    train_seed,
)
from workbench.params import EXECUTION
from workbench.pruning import check_flops_target, prune_to_flops
from workbench.recipe import Trial, Verdict, call_each, interval_from_differences, verdicts_from_rows

METRIC = "miou_finetuned"
CLAIM = "CAP keeps more fine-tuned mIoU than Network Slimming at equal FLOPs"
ABLATION_CLAIM = "ranking the CAGS network by |gamma| x guide keeps more fine-tuned mIoU than by |gamma| alone"
TRIAL_ARMS = {"cap_vs_slimming": ("slimming", "cap"), "guided_ranking": ("cap", "cap_guided")}
SMOKE_NOTE = ("Smoke run (quick preset): the protocol runs end to end, but too few seeds and steps for evidence; "
              "preset='standard' is the evidence run.")
ROW_KEYS = ("arm", "seed", "flops_target", "flops_fraction", "ratio", "channel_ratio", "params_reduction",
            "miou_dense", "miou_sparse", "miou_pruned", "miou_finetuned")


def comparison_trials(seeds: Sequence[int], flops_targets: Sequence[float],
                      arms: Sequence[str] = tuple(ARMS)) -> dict[str, Trial]:
    """The trials the arms allow: ``cap_vs_slimming`` (the paper's claim) and ``guided_ranking`` (the
    ablation); :class:`~workbench.recipe.Trial` refuses fewer than 2 seeds."""
    settings = [{"flops_target": float(t)} for t in flops_targets]
    claims = {"cap_vs_slimming": CLAIM, "guided_ranking": ABLATION_CLAIM}
    return {name: Trial(claims[name], pair, METRIC, "greater", list(seeds), settings)
            for name, pair in TRIAL_ARMS.items() if set(pair) <= set(arms)}


def check_comparison(*, seed_list: Sequence[int], flops_targets: Sequence[float], model: str, norm: str = "bn",
                     width: float, dataset: str, test_scenes: int | None = None, arms: Sequence[str] = tuple(ARMS),
                     **_: Any) -> float:
    """Refuse, before any training, what the comparison cannot run: fewer than 2 seeds, an unknown arm,
    missing data (the dataset's own message, e.g. Cityscapes' expected layout), a FLOPs target outside
    the reachable ``[floor, 1)``. Returns the floor (the smallest reachable FLOPs fraction)."""
    check_arms(arms)
    if not comparison_trials(seed_list, flops_targets, arms):
        raise ValueError(f"arms {list(arms)!r} form no comparison; allowed: arms holding one of "
                         f"{list(TRIAL_ARMS.values())}")
    test_set = segmentation_split(dataset, "test", test_scenes)
    example = test_set[0][0].unsqueeze(0)
    net = build_network(model, test_set.num_classes, norm=norm, width=width, seed=0)
    # the per-layer limit is a channel count, independent of the scores: the untrained net's floor holds
    return check_flops_target(net, min(flops_targets), example, "slimming")


def _row(arm: str, seed: int, target: float, runs: dict, report: Any, pruned: dict, tuned: dict) -> dict:
    source = runs[ARMS[arm][0]]
    return {"arm": arm, "seed": seed, "flops_target": target,
            "flops_fraction": report.flops_after / report.flops_before,
            "ratio": report.ratio, "channel_ratio": report.channel_ratio, "params_reduction": report.params_reduction,
            "miou_dense": runs["plain"]["miou"], "miou_sparse": source["miou"],
            "miou_pruned": pruned["miou"], "miou_finetuned": tuned["miou"],
            "layers": {k: list(v) for k, v in report.layers.items() if _is_norm_name(source["model"], k)}}


def run_seed_comparison(seed: int, flops_targets: Sequence[float], arms: Sequence[str] = tuple(ARMS), *,
                        runs: dict | None = None, finetune_epochs: int = 1, lr: float = 3e-3,
                        optimizer: str = "adamw", batch_size: int = 16, device: Any = "auto",
                        train_scenes: int | None = 512, test_scenes: int | None = 128,
                        cpu_threads: int | None = None, dataset: str = "digit-scenes", keep_models: bool = False,
                        progress: bool = False, amp: str = "off", channels_last: bool = False,
                        compile: bool = False, **train_options: Any) -> tuple[dict, list[dict]]:
    """One seed of the protocol (module docstring): ``(runs, rows)``, one row per (target, arm).

    ``runs`` (from :func:`~workbench.experiments.pruning.train_seed` with this ``seed`` and the same
    options) skips the training; ``keep_models`` keeps each pruned, fine-tuned net under ``"model"``.
    ``amp``, ``channels_last`` and ``compile`` apply to the training and the fine-tuning.
    """
    acceleration = {"amp": amp, "channels_last": channels_last, "compile": compile}
    dev = resolve_device(device)
    data = dict(batch_size=batch_size, train_scenes=train_scenes, test_scenes=test_scenes, dataset=dataset)
    if runs is None:
        runs = train_seed(seed=seed, lr=lr, optimizer=optimizer, device=dev, cpu_threads=cpu_threads,
                          progress=progress, **data, **acceleration, **train_options)
    train_loader, test_loader, train_set = _loaders(batch_size, seed, train_scenes, test_scenes, dataset)
    example = next(iter(test_loader))[0][:1].to(dev)
    rows = []
    with limit_cpu_threads(cpu_threads, dev):
        for target in flops_targets:
            for arm in arms:
                base, options = prune_arm(runs, arm)
                seed_everything(seed)
                net, report = prune_to_flops(base.to(dev), target, example, latency=False, **options)
                pruned = _segment_metrics(net, test_loader, dev, train_set.num_classes)
                finetune(net, train_loader, finetune_epochs, lr=lr, optimizer=optimizer, seed=seed, dev=dev,
                         num_classes=train_set.num_classes, ignore_index=_ignore_index(train_set), progress=progress,
                         **acceleration)
                row = _row(arm, seed, float(target), runs, report, pruned,
                           _segment_metrics(net, test_loader, dev, train_set.num_classes))
                if keep_models:
                    row["model"] = net
                rows.append(row)
    return runs, rows


def compare_at_flops(params: dict[str, Any], *, arms: Sequence[str] = tuple(ARMS), first_runs: dict | None = None,
                     progress: bool = True, executor: Any = None) -> dict[str, Any]:
    """The whole comparison over ``params["seed_list"]`` (resolved notebook parameters).

    Returns ``{"rows", "verdicts": {trial: [Verdict]}, "trials", "first_runs", "floor"}``; the rows of
    the first seed keep their fine-tuned models (``"model"``). ``first_runs``: the first seed's
    :func:`~workbench.experiments.pruning.train_seed` result when already trained. ``executor``
    (:func:`workbench.sweep.trial_executor`; ``None``: in this process) runs the seeds, each one
    point: its dense network feeds every arm and target, so a seed is the unit that can move.
    """
    options = {k: v for k, v in params.items() if k not in ("seed", "seed_list", "flops_targets", "ratio", "ratios",
                                                             "seeds", "preset", *EXECUTION)}
    floor = check_comparison(**params, arms=arms)
    seeds, targets = params["seed_list"], params["flops_targets"]
    trials = comparison_trials(seeds, targets, arms)
    one_seed = functools.partial(run_seed_comparison, flops_targets=targets, arms=arms, progress=False, **options)
    # the first seed: its runs may be trained already, and its pruned models are kept for the figures
    first = call_each(functools.partial(one_seed, runs=first_runs, keep_models=True), [(seeds[0],)], executor)
    outcomes = itertools.chain(first, call_each(one_seed, [(seed,) for seed in seeds[1:]], executor))
    rows, kept = [], None
    for i, (runs, seed_rows) in enumerate(tqdm(outcomes, total=len(seeds), desc="paired seeds", disable=not progress)):
        kept = runs if i == 0 else kept
        rows.extend(seed_rows)
    caveats = (SMOKE_NOTE,) if params.get("preset") == "quick" else ()
    verdicts = {name: [v.with_caveats(*caveats) for v in verdicts_from_rows(trial, rows)]
                for name, trial in trials.items()}
    return {"rows": rows, "verdicts": verdicts, "trials": trials, "first_runs": kept, "floor": floor}


def tidy_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows as ``results.json`` records them (no models, no per-layer channels)."""
    return [{k: r[k] for k in ROW_KEYS} for r in rows]


def curve_points(rows: Sequence[dict], metric: str = METRIC) -> list[dict]:
    """Per (arm, target): mean achieved FLOPs fraction and mean ``metric`` over seeds with its 95%
    t-interval (``low``/``high`` equal the mean when there is one seed)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["flops_target"]), []).append(r)
    out = []
    for (arm, target), rs in groups.items():
        values = [float(r[metric]) for r in rs]
        mean = sum(values) / len(values)
        low = high = mean
        if len(values) >= 2:
            iv = interval_from_differences(values)
            low, high = iv.low, iv.high
        out.append({"arm": arm, "flops_target": target, "n": len(values), "mean": mean, "low": low, "high": high,
                    "flops_fraction": sum(r["flops_fraction"] for r in rs) / len(rs), "values": values})
    return sorted(out, key=lambda p: (list(ARMS).index(p["arm"]), -p["flops_target"]))


def key_numbers(result: dict[str, Any]) -> dict[str, Any]:
    """Flat numbers for ``results.json``: per trial and target the paired effect, interval, verdict
    word and seeds needed; per arm and target the mean fine-tuned mIoU."""
    out: dict[str, Any] = {"floor": result["floor"]}
    for name, verdicts in result["verdicts"].items():
        for v in verdicts:
            t = f"{v.setting['flops_target']:g}"
            iv = v.interval
            out.update({f"{name}_effect_{t}": iv.mean, f"{name}_low_{t}": iv.low, f"{name}_high_{t}": iv.high,
                        f"{name}_verdict_{t}": v.verdict, f"{name}_seeds_needed_{t}": v.seeds_needed})
    for p in curve_points(result["rows"]):
        out[f"miou_finetuned_{p['arm']}_{p['flops_target']:g}"] = p["mean"]
    return out


def verdict_dicts(result: dict[str, Any]) -> dict[str, list[dict]]:
    """``{trial: [Verdict.to_dict()]}`` (JSON-ready)."""
    return {name: [v.to_dict() for v in verdicts] for name, verdicts in result["verdicts"].items()}


def verdict_lines(verdicts: dict[str, list[Verdict]]) -> list[str]:
    """One sentence per trial and target (verdict, effect, interval, power, caveats)."""
    return [f"[{name}] {v.sentence()}" for name, vs in verdicts.items() for v in vs]


__all__ = ["ABLATION_CLAIM", "CLAIM", "METRIC", "SMOKE_NOTE", "check_comparison", "compare_at_flops",
           "comparison_trials", "curve_points", "key_numbers", "run_seed_comparison", "tidy_rows", "verdict_dicts",
           "verdict_lines"]
