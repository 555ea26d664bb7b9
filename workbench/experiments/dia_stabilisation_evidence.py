r"""Notebook 03's evidence: does DIA-LSTM keep networks without skip connections / without BN trainable?

The DIANet paper reports that DIA-LSTM stabilises the training of residual networks whose skip
connections, or all of whose BN layers, are removed. The workbench checks it with the paired-seed
protocol of :mod:`workbench.recipe`:

- **Conditions** (:data:`CONDITIONS`, the settings of the trial): ``"no skip"`` (BN kept, every
  residual block without its identity path) and ``"no BN"`` (skip connections kept, no
  normalisation anywhere).
- **Arms**: ``"none"`` (no attention, the reference) and ``"dia"`` (DIA-LSTM, the treatment); with
  ``compare_se`` also ``"se"`` (SE attention) against ``"dia"``, the DIA runs shared by both
  comparisons. All three networks of a seed come from :func:`workbench.recipe.paired_models` with
  ``"none"`` as the reference: SE and DIA start from its convolutions, BN scales and classifier,
  only their attention modules have their own (seeded) initialisation. Every arm of a seed sees
  the same batches in the same order (:func:`workbench.recipe.paired_loader`) and the same
  augmentation draws.
- **Data**: Fashion-MNIST (the shipped stratified subset, or the full set where the preset asks
  for it and it is on disk); each preset takes the first ``n`` images per class.
- **Recipe**: SGD (momentum 0.9, weight decay 5e-4), one-cycle learning rate, the same for every
  arm and condition (the recipe of the one-seed stabilisation study).
- **Metric**: final test accuracy, direction ``"greater"`` (the claim: DIA's accuracy is higher).
  Every run also records its final training loss, whether it diverged and its raw accuracy.
- **Diverged runs**: a run whose training loss turns NaN/inf stops there. Its network holds
  non-finite weights and its predictions mean nothing, so its accuracy **counts as chance level**
  (``1 / classes``, 0.1 for Fashion-MNIST): a network that cannot be trained is as good as a guess.
  ``diverged`` is True in its row, ``raw_acc`` keeps what the evaluation returned (or ``None``
  when it was not finite) and ``final_train_loss`` is ``None``.

The verdict per condition is the paired difference DIA - none (and DIA - SE) of final accuracies
with its 95% t-interval, in words (supports / contradicts / inconclusive) and the seeds a decisive
answer would need. The quick preset is a smoke run (2 seeds, 10 steps per run): it cannot decide
anything, and its verdicts say so.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from workbench.data import get_dataset, make_loader
from workbench.data.fashion import locate_full_set
from workbench.data.paths import resolve_root
from workbench.experiments.acceleration import acceleration_options
from workbench.experiments.attention import build, limit_cpu_threads
from workbench.params import Param
from workbench.recipe import Trial, Verdict, paired_loader, paired_models, run_points, verdicts_from_rows
from workbench.train import NonFiniteLossError, default_optimizer, evaluate, fit

# condition -> how the network differs from the standard residual BN network
CONDITIONS: dict[str, dict[str, Any]] = {"no skip": {"norm": "bn", "skip": False},
                                         "no BN": {"norm": "none", "skip": True}}
ARMS = ("none", "se", "dia")  # build order of a seed: "none" first, the others start from its tensors
MAIN_ARMS = ("none", "dia")
SE_ARMS = ("se", "dia")
METRIC = "acc"
DATASET = "fashion-mnist"
CLAIM = ("DIA-LSTM keeps networks without skip connections / without BN trainable: higher final accuracy "
         "than no attention")
SE_CLAIM = "DIA-LSTM gives a higher final accuracy than SE attention without skip connections / without BN"
SMOKE = "quick preset: a smoke run of the protocol (2 seeds, a tiny training budget); it cannot decide anything."
DIVERGED_RULE = "a diverged run (NaN/inf training loss) counts as chance-level accuracy (1 / classes)"

PARAMETERS = {
    "seeds": Param(int, min=1, max=1000, nullable=True,
                   help="paired seeds of the stabilisation trial (seed .. seed + seeds - 1, at least 2); "
                        "None: the preset's"),
    "conditions": Param(list, item_type=str, nullable=True,
                        help=f"conditions of the stabilisation trial, a subset of {tuple(CONDITIONS)}; None: both"),
    "compare_se": Param(bool, nullable=True, help="also compare DIA with SE attention; None: the preset's"),
    "evidence_epochs": Param(int, min=1, max=1000, nullable=True,
                             help="epochs of every stabilisation-trial run; None: the preset's"),
}

# Per preset: the trial's data, network and budget. Costs measured on the 2-core AMD EPYC development
# machine (2026-12-06, one thread, shared with other jobs).
PRESETS: dict[str, dict[str, Any]] = {
    # quick: a smoke run of the wiring for `make run` (seconds), not evidence
    "quick": {"seeds": 2, "compare_se": True, "evidence_epochs": 2, "evidence_subset": "quick",
              "evidence_image_size": 16, "evidence_train_per_class": 16, "evidence_test_per_class": 10,
              "evidence_batch_size": 32, "evidence_lr": 0.05, "evidence_width": 0.25},
    # standard: the evidence run on 2 CPU cores, one thread (the notebook's cpu_threads): 30 runs of 156
    # steps; one run of 93 steps took 10-18 s on the loaded machine, so about 15 min for the trial
    "standard": {"seeds": 5, "compare_se": True, "evidence_epochs": 4, "evidence_subset": "quick",
                 "evidence_image_size": 16, "evidence_train_per_class": 250, "evidence_test_per_class": 100,
                 "evidence_batch_size": 64, "evidence_lr": 0.05, "evidence_width": 0.5},
    # full: GPU-sized (the full Fashion-MNIST when on disk, else the shipped subset)
    "full": {"seeds": 10, "compare_se": True, "evidence_epochs": 30, "evidence_subset": "full",
             "evidence_image_size": 32, "evidence_train_per_class": None, "evidence_test_per_class": None,
             "evidence_batch_size": 128, "evidence_lr": 0.05, "evidence_width": 1.0},
}


def fashion_subset(preferred: str) -> str:
    """``"full"`` when the preset asks for it and the four files are found, else the shipped ``"quick"``."""
    if preferred != "full":
        return "quick"
    try:
        locate_full_set(resolve_root(None))
    except FileNotFoundError:
        return "quick"
    return "full"


def evidence_seeds(params: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(range(params["seed"], params["seed"] + params["seeds"]))


def evidence_trials(seeds: Sequence[int], conditions: Sequence[str] | None = None,
                    compare_se: bool = False) -> dict[str, Trial]:
    """``{"dia_vs_none": Trial, ["dia_vs_se": Trial]}``, one setting per condition. Fewer than 2 seeds
    or an unknown condition is refused here, before any training."""
    conditions = list(CONDITIONS) if conditions is None else list(conditions)
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or not conditions or len(set(conditions)) != len(conditions):
        raise ValueError(f"parameter conditions={conditions!r} is not valid; allowed: a non-empty list of distinct "
                         f"values of {tuple(CONDITIONS)}")
    settings = tuple({"condition": c} for c in conditions)
    try:
        trials = {"dia_vs_none": Trial(CLAIM, MAIN_ARMS, METRIC, "greater", tuple(seeds), settings)}
    except ValueError as exc:
        raise ValueError(f"parameter seeds cannot give a verdict: {exc}") from None
    if compare_se:
        trials["dia_vs_se"] = Trial(SE_CLAIM, SE_ARMS, METRIC, "greater", tuple(seeds), settings)
    return trials


def resolve_evidence(params: dict[str, Any]) -> dict[str, Any]:
    """Fill the trial's parameters the notebook left ``None`` from the preset and check them (before
    any training); ``params["evidence_subset"]`` becomes the Fashion-MNIST subset actually used."""
    params.setdefault("seed", 0)
    for name, value in PRESETS[params.get("preset", "quick")].items():
        if params.get(name) is None:
            params[name] = value
    params["conditions"] = list(CONDITIONS) if params.get("conditions") is None else list(params["conditions"])
    params["evidence_subset"] = fashion_subset(params["evidence_subset"])
    evidence_trials(evidence_seeds(params), params["conditions"], params["compare_se"])
    return params


def load_data(params: Mapping[str, Any]) -> tuple[Any, Any]:
    """Fashion-MNIST train (augmented: random shift and flip) and test splits of the preset's size."""
    options = {"subset": params["evidence_subset"], "size": params["evidence_image_size"]}
    train = get_dataset(DATASET, "train", augment=True, per_class=params["evidence_train_per_class"], **options)
    test = get_dataset(DATASET, "test", per_class=params["evidence_test_per_class"], **options)
    return train, test


def build_arm(params: Mapping[str, Any], condition: str, arm: str, num_classes: int) -> nn.Module:
    """The network of ``arm`` (attention ``none``/``se``/``dia``) under ``condition``."""
    setting = CONDITIONS[condition]
    return build(params["model"], setting["norm"], arm, params["evidence_width"], num_classes, skip=setting["skip"])


def train_paired(params: Mapping[str, Any], data: tuple[Any, Any], net: nn.Module, seed: int) -> dict[str, Any]:
    """Train ``net`` on the seed's batch order with the trial's recipe; returns accuracy (chance level
    when diverged, see the module docstring), raw accuracy, final training loss, divergence, seconds."""
    train_set, test_set = data
    loader = paired_loader(train_set, params["evidence_batch_size"], seed)
    epochs, lr = params["evidence_epochs"], params["evidence_lr"]
    optimizer = default_optimizer(net, lr=lr, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loader),
                                                    pct_start=0.15)
    acceleration = acceleration_options(params)
    started = time.perf_counter()
    history, diverged = [], None
    try:
        history = fit(net, loader, None, epochs, optimizer=optimizer, scheduler=scheduler, scheduler_interval="step",
                      device=params["device"], progress=False, **acceleration).history
    except NonFiniteLossError as exc:
        diverged = str(exc)
    seconds = time.perf_counter() - started
    raw = evaluate(net, make_loader(test_set, 256, train=False), params["device"], amp=acceleration["amp"],
                   channels_last=acceleration["channels_last"])["acc"]
    raw = float(raw) if math.isfinite(raw) else None
    chance = 1.0 / train_set.num_classes
    loss = history[-1].get("train_loss") if history and not diverged else None
    return {"acc": chance if diverged else raw, "raw_acc": raw, "diverged": diverged is not None,
            "diverged_at": diverged, "final_train_loss": loss, "seconds": seconds}


def make_run_point(params: Mapping[str, Any], data: tuple[Any, Any]) -> Callable[[str, int, dict], dict]:
    """The trial's per-point function ``(arm, seed, {"condition": ...}) -> row metrics``, picklable
    (it may run in another process, or on a Ray node)."""
    return functools.partial(evidence_point, dict(params), data)


def evidence_point(params: Mapping[str, Any], data: tuple[Any, Any], arm: str, seed: int, setting: dict) -> dict:
    """One (arm, seed, condition): the three networks of the seed built paired (:data:`ARMS`,
    ``"none"`` the reference), ``arm``'s trained (:func:`train_paired`)."""
    build_one = functools.partial(build_arm, params, setting["condition"], num_classes=data[0].num_classes)
    nets = paired_models(lambda a: build_one(arm=a), ARMS, seed)
    return train_paired(params, data, nets[arm], seed)


def _caveats(params: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], verdict: Verdict) -> list[str]:
    mine = [r for r in rows if r["condition"] == verdict.setting["condition"]
            and r["arm"] in (verdict.reference, verdict.treatment)]
    diverged = sorted({(r["arm"], r["seed"]) for r in mine if r["diverged"]})
    caveats = []
    if diverged:
        caveats.append(f"{len(diverged)} run(s) diverged ({', '.join(f'{a} seed {s}' for a, s in diverged)}): "
                       f"{DIVERGED_RULE}.")
    if params.get("preset") == "quick":
        caveats.append(SMOKE)
    return caveats


def run_evidence(params: Mapping[str, Any], data: tuple[Any, Any] | None = None,
                 progress: bool = True, executor: Any = None) -> dict[str, Any]:
    """The paired trial(s) on ``params`` as :func:`resolve_evidence` leaves them; the points through
    ``executor`` (:func:`workbench.sweep.trial_executor`; ``None``: in this process). Returns ``{"trials",
    "rows" (tidy: arm x seed x condition), "verdicts": {name: [Verdict per condition]}, "chance", "dataset",
    "seconds"}``."""
    trials = evidence_trials(evidence_seeds(params), params["conditions"], params["compare_se"])
    started = time.perf_counter()
    data = load_data(params) if data is None else data
    run_point = make_run_point(params, data)
    with limit_cpu_threads(params.get("cpu_threads"), params["device"]):
        main = trials["dia_vs_none"]
        points = main.points()
        if "dia_vs_se" in trials:  # the DIA runs are shared: only the SE arm trains for the second trial
            points += trials["dia_vs_se"].points(arms=("se",))
        rows = run_points(main, points, run_point, executor=executor, progress=progress)
    verdicts = {name: [v.with_caveats(*_caveats(params, rows, v)) for v in verdicts_from_rows(trial, rows)]
                for name, trial in trials.items()}
    return {"trials": {name: t.to_dict() for name, t in trials.items()}, "rows": rows, "verdicts": verdicts,
            "chance": 1.0 / data[0].num_classes,
            "dataset": f"{DATASET} (subset {params['evidence_subset']!r}, {len(data[0])} train / {len(data[1])} "
                       f"test images at {params['evidence_image_size']}x{params['evidence_image_size']})",
            "seconds": time.perf_counter() - started}


def per_seed_table(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """One row per (condition, seed): every arm's accuracy (``*`` marks a diverged run)."""
    table: dict[tuple[str, int], dict] = {}
    for r in rows:
        entry = table.setdefault((r["condition"], r["seed"]), {"condition": r["condition"], "seed": r["seed"]})
        entry[r["arm"]] = f"{r['acc']:.4f}{'*' if r['diverged'] else ''}"
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    return [table[k] for k in sorted(table, key=lambda k: (conditions.index(k[0]), k[1]))]


def evidence_record(evidence: Mapping[str, Any]) -> dict[str, Any]:
    """What results.json keeps: the trials, tidy rows, verdicts (sentence, interval, seeds needed)."""
    return {"trials": evidence["trials"], "dataset": evidence["dataset"], "diverged_rule": DIVERGED_RULE,
            "chance": evidence["chance"],
            "rows": [dict(r) for r in evidence["rows"]],
            "verdicts": {name: [v.to_dict() for v in vs] for name, vs in evidence["verdicts"].items()},
            "seconds": evidence["seconds"]}
