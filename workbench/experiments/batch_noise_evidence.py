r"""Notebook 01's evidence: does IEBN lose less of its accuracy than BN under batch-statistic noise?

The protocol (:mod:`workbench.recipe`), in the order the notebook runs it:

1. **Calibration** (:func:`calibrate`): BN is trained on a *calibration seed* that is not one of
   the trial's seeds (``seed + seeds``), clean and at each candidate level of each attack
   (``calibration_levels``). :func:`pick_levels` keeps the levels at which BN retains between 50%
   and 90% of its clean accuracy (:data:`BAND`): below, both arms sit near chance and a difference
   says nothing; above, the attack barely acts. When no candidate lands in the band the nearest
   one is used and every verdict at it says so.
2. **Paired trial** (:func:`run_evidence`): arms ``"bn"`` (reference) and ``"iebn"``
   (treatment) on paired seeds: both built by :func:`workbench.recipe.paired_models` (IEBN starts
   from BN's convolutions, scales and classifier; only its gate parameters are its own), the same
   batch order (the loader seeded by the seed) and the same noise draws (the noise seeded by the
   seed). Settings: clean, and every attack at its calibrated levels.
3. **Effect**: per arm and seed the *relative drop* ``1 - acc_noisy / acc_clean`` (so an arm that
   starts lower is not rewarded for having less to lose); the effect is the paired difference
   IEBN - BN of relative drops with its 95% t-interval, in words: ``"supports"`` (IEBN drops
   less), ``"contradicts"`` (it drops more) or ``"inconclusive"``, and how many seeds a decisive
   answer would need (:func:`workbench.recipe.power_sentence`).
4. **Gate engagement**: every IEBN run carries :class:`workbench.probes.GateEngagement`; when its
   gate never became instance-specific (:func:`workbench.probes.gate_engagement_warning`), every
   IEBN verdict carries the sentence that the run cannot speak about IEBN's mechanism.

Attacks (:data:`ATTACKS`). The IEBN paper names a constant attack and random noise but publishes
neither equations nor levels: every definition here is the workbench's own (docs/methods.md,
*Batch-statistic noise attacks*). ``"constant"`` perturbs the statistics by the same shift and
scale in every layer and step and lets the running statistics absorb the *clean* statistics, so
evaluation normalises differently from training; ``"constant-noisy-stats"`` lets them absorb the
perturbed statistics, so evaluation sees what training saw.

Gamma-compensated initialisation (``iebn_init="gamma-compensated"``, opt-in; default
``"official"``): IEBN's gate starts at :math:`\sigma(-1)\approx0.27` for every sample, so an IEBN
network starts as BN with its scale multiplied by 0.27. :func:`compensate_gate_scale` divides each
IEBN layer's :math:`\gamma` by its initial gate so that the product :math:`\gamma a` starts equal to
BN's :math:`\gamma`. It changes IEBN's initialisation, not its layer; verdicts name it.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from workbench.experiments.acceleration import acceleration_options
from workbench.nn.iebn import IEBN2d
from workbench.probes.gate import GateEngagement, gate_engagement_warning
from workbench.recipe import Trial, Verdict, paired_models, run_trial, verdicts_from_rows

# attack name -> (noise kind, running statistics, what it is)
ATTACKS: dict[str, tuple[str, str, str]] = {
    "mean": ("mean", "clean", "random: Gaussian noise on the batch mean (the workbench's definition)"),
    "var": ("var", "clean", "random: log-normal noise on the batch variance (the workbench's definition)"),
    "both": ("both", "clean", "random: noise on the batch mean and variance (the workbench's definition)"),
    "feature": ("feature", "clean", "random: noise on the normalised features (the workbench's definition)"),
    "constant": ("constant", "clean",
                 "constant attack, clean running statistics (the workbench's definition of the paper's attack)"),
    "constant-noisy-stats": ("constant", "noisy",
                             "constant attack, running statistics absorb the perturbed statistics "
                             "(the workbench's definition)"),
}
BAND = (0.5, 0.9)
IEBN_INITS = ("official", "gamma-compensated")
ARMS = ("bn", "iebn")
CLEAN = {"attack": "clean", "level": 0.0}
DROP_CLAIM = "IEBN loses a smaller fraction of its clean accuracy than BN under batch-statistic noise"
CLEAN_CLAIM = "IEBN's clean accuracy is higher than BN's"
SMOKE = "quick preset: a smoke run of the protocol, not evidence."


@torch.no_grad()
def compensate_gate_scale(model: nn.Module) -> int:
    """Divide every IEBN layer's ``weight`` (gamma) by its initial gate ``sigmoid(attn_bias)``, so that
    ``gamma * a`` starts equal to the uncompensated ``gamma``; returns the number of layers changed.

    Only valid at initialisation (``attn_weight == 0``, where the gate is ``sigmoid(attn_bias)`` for
    every sample); a trained layer is refused."""
    layers = [m for m in model.modules() if isinstance(m, IEBN2d)]
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no IEBN2d layer; allowed: a model built with norm='iebn'")
    if any(bool(m.attn_weight.ne(0).any()) for m in layers):
        raise ValueError("compensate_gate_scale needs IEBN layers at initialisation (attn_weight == 0); "
                         "this model's gates already depend on the input")
    for m in layers:
        m.weight.div_(torch.sigmoid(m.attn_bias))
    return len(layers)


def pick_levels(clean_acc: float, accs: Mapping[float, float], band: tuple[float, float] = BAND,
                count: int = 1) -> dict[str, Any]:
    """The calibrated levels: those where BN keeps ``band[0] <= acc / clean_acc <= band[1]``, at most
    ``count``, the ones nearest the band's middle first (returned in increasing order). When none is
    in the band, the level nearest to it, with ``in_band`` False and a note saying so.

    Returns ``{"levels", "retained": {level: fraction}, "in_band", "note"}``."""
    if not accs or not clean_acc > 0:
        raise ValueError(f"calibration needs candidate levels and a clean accuracy > 0 (got {clean_acc!r}, "
                         f"{dict(accs)!r})")
    low, high = band
    retained = {float(level): float(acc) / clean_acc for level, acc in sorted(accs.items())}
    inside = [lv for lv, r in retained.items() if low <= r <= high]
    if inside:
        middle = (low + high) / 2
        chosen = sorted(sorted(inside, key=lambda lv: abs(retained[lv] - middle))[:count])
        return {"levels": chosen, "retained": retained, "in_band": True, "note": ""}
    nearest = min(retained, key=lambda lv: max(low - retained[lv], retained[lv] - high))
    note = (f"no candidate level kept BN within {low:.0%}-{high:.0%} of its clean accuracy "
            f"(retained: {', '.join(f'{lv:g}: {r:.0%}' for lv, r in retained.items())}); the nearest, level "
            f"{nearest:g}, is used and is outside the calibration band.")
    return {"levels": [nearest], "retained": retained, "in_band": False, "note": note}


def calibration_seed(params: Mapping[str, Any]) -> int:
    """A seed outside the trial's ``seed .. seed + seeds - 1``: the levels are not tuned on the seeds
    that judge them."""
    return params["seed"] + params["seeds"]


def _train(params: Mapping[str, Any], data: tuple[Any, Any], arm: str, seed: int, attack: str, level: float,
           net: nn.Module | None = None, callbacks: Sequence[Any] = ()) -> dict:
    from workbench.experiments.batch_noise import train_one

    kind, running_stats, _ = ATTACKS.get(attack, ("mean", "clean", ""))
    return train_one(arm, level, params["batch_size"], seed, kind=kind, running_stats=running_stats,
                     model=params["model"], width=params["width"], epochs=params["evidence_epochs"],
                     lr=params["lr"], device=params["device"], train_set=data[0], test_set=data[1], net=net,
                     callbacks=callbacks, **acceleration_options(params))


def calibrate(params: Mapping[str, Any], data: tuple[Any, Any], progress: bool = True) -> dict[str, Any]:
    """BN on :func:`calibration_seed`, clean and at every ``calibration_levels`` of every attack;
    per attack :func:`pick_levels` (``levels_per_attack`` levels). ``{"seed", "clean_acc",
    "attacks": {attack: {..., "accs": {level: acc}}}}``."""
    from workbench.experiments.batch_noise import _bar

    seed = calibration_seed(params)
    points = [("clean", 0.0)] + [(a, float(lv)) for a in params["attacks"] for lv in params["calibration_levels"]]
    accs: dict[str, dict[float, float]] = {}
    for attack, level in _bar(points, progress, "calibration (BN)"):
        accs.setdefault(attack, {})[level] = _train(params, data, "bn", seed, attack, level)["test_acc"]
    clean = accs.pop("clean")[0.0]
    out = {"seed": seed, "clean_acc": clean, "band": list(BAND), "attacks": {}}
    for attack, by_level in accs.items():
        picked = pick_levels(clean, by_level, BAND, params["levels_per_attack"])
        out["attacks"][attack] = {**picked, "accs": by_level, "what": ATTACKS[attack][2]}
    return out


def trial_settings(calibration: Mapping[str, Any]) -> list[dict]:
    """Clean, then every attack at its calibrated levels."""
    return [dict(CLEAN)] + [{"attack": attack, "level": float(level)}
                            for attack, c in calibration["attacks"].items() for level in c["levels"]]


def _setting_key(seed: int, setting: Mapping[str, Any]) -> str:
    return f"{setting['attack']}@{setting['level']:g}/seed{seed}"


def make_run_point(params: Mapping[str, Any], data: tuple[Any, Any]) -> Callable[[str, int, dict], dict]:
    """The trial's per-point function, picklable (it may run in another process, or on a Ray node):
    IEBN runs return their gate-engagement log under ``"gate_log"``, which :func:`run_evidence`
    takes out of the rows."""
    probe_inputs = torch.stack([data[1][i][0] for i in range(min(len(data[1]), params["gate_samples"]))])
    return functools.partial(evidence_point, dict(params), data, probe_inputs)


def evidence_point(params: Mapping[str, Any], data: tuple[Any, Any], probe_inputs: torch.Tensor, arm: str,
                   seed: int, setting: dict) -> dict:
    """One (arm, seed, setting) of the trial: both arms built paired, ``arm``'s trained under the
    setting's attack; accuracy, divergence, seconds, and for IEBN the gate log and its final spread."""
    from workbench.experiments.batch_noise import build

    num_classes = data[0].num_classes
    nets = paired_models(functools.partial(build, params["model"], num_classes=num_classes, width=params["width"]),
                         ARMS, seed)
    net = nets[arm]
    callbacks = []
    if arm == "iebn":
        if params["iebn_init"] == "gamma-compensated":
            compensate_gate_scale(net)
        callbacks = [GateEngagement(probe_inputs, every=params["gate_every"])]
    run = _train(params, data, arm, seed, setting["attack"], setting["level"], net=net, callbacks=callbacks)
    out = {"acc": run["test_acc"], "diverged": run["diverged"], "seconds": run["seconds"]}
    if callbacks and callbacks[0].records:
        out["gate_log"] = callbacks[0].log().to_dict()
        out["gate_max_relative_spread"] = callbacks[0].records[-1]["max_relative_spread"]
    return out


def take_gate_logs(rows: list[dict]) -> dict[str, dict]:
    """Remove each row's ``"gate_log"`` (rows stay tidy) and return them keyed
    ``"<attack>@<level>/seed<seed>"``."""
    return {_setting_key(row["seed"], row): log for row in rows if (log := row.pop("gate_log", None)) is not None}


def relative_drop_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Every noisy row with ``clean_acc`` (its arm and seed, clean) and ``relative_drop = 1 - acc /
    clean_acc``."""
    clean = {(r["arm"], r["seed"]): r["acc"] for r in rows if r["attack"] == "clean"}
    out = []
    for r in rows:
        if r["attack"] == "clean":
            continue
        base = clean[(r["arm"], r["seed"])]
        out.append({**r, "clean_acc": base, "relative_drop": 1.0 - r["acc"] / base if base > 0 else math.nan})
    return out


def final_gate_layers(gate_logs: Mapping[str, Mapping], setting: Mapping[str, Any]) -> dict[str, dict] | None:
    """Per IEBN layer, the mean over the setting's seeds of the last gate-engagement record."""
    prefix = f"{setting['attack']}@{setting['level']:g}/"
    finals = [log["records"][-1]["layers"] for key, log in gate_logs.items() if key.startswith(prefix)
              and log.get("records")]
    if not finals:
        return None
    return {name: {k: statistics.fmean(f[name][k] for f in finals) for k in finals[0][name]} for name in finals[0]}


def gate_caveat(gate_logs: Mapping[str, Mapping], setting: Mapping[str, Any]) -> str | None:
    """:func:`workbench.probes.gate_engagement_warning` on the setting's IEBN runs (``None`` when
    the gate is engaged or was not measured)."""
    layers = final_gate_layers(gate_logs, setting)
    return gate_engagement_warning(layers) if layers else None


def _caveats(params: Mapping[str, Any], calibration: Mapping, gate_logs: Mapping, setting: Mapping) -> list[str]:
    caveats = [gate_caveat(gate_logs, setting)]
    attack = calibration["attacks"].get(setting["attack"])
    if attack and not attack["in_band"]:
        caveats.append(attack["note"])
    if params["iebn_init"] != "official":
        caveats.append(f"IEBN initialised {params['iebn_init']} (not the official initialisation).")
    if params.get("preset") == "quick":
        caveats.append(SMOKE)
    return caveats


def evidence_verdicts(params: Mapping[str, Any], calibration: Mapping, rows: Sequence[Mapping],
                      gate_logs: Mapping) -> dict[str, list[Verdict]]:
    """``{"clean": [verdict], "drop": [verdict per noisy setting]}`` with their caveats."""
    seeds = tuple(range(params["seed"], params["seed"] + params["seeds"]))
    noisy = [s for s in trial_settings(calibration) if s["attack"] != "clean"]
    clean_trial = Trial(CLEAN_CLAIM, ARMS, "acc", "greater", seeds, (dict(CLEAN),))
    out = {"clean": [v.with_caveats(*_caveats(params, calibration, gate_logs, v.setting))
                     for v in verdicts_from_rows(clean_trial, rows)], "drop": []}
    if noisy:
        drop_trial = Trial(DROP_CLAIM, ARMS, "relative_drop", "less", seeds, tuple(noisy))
        out["drop"] = [v.with_caveats(*_caveats(params, calibration, gate_logs, v.setting))
                       for v in verdicts_from_rows(drop_trial, relative_drop_rows(rows))]
    return out


def check_evidence_params(params: Mapping[str, Any]) -> Trial:
    """Refuse what cannot give a verdict before any training (fewer than 2 seeds, an unknown attack or
    init); returns the trial's skeleton."""
    bad = [a for a in params["attacks"] if a not in ATTACKS]
    if bad or not params["attacks"]:
        raise ValueError(f"parameter attacks={params['attacks']!r} is not valid; allowed: a non-empty list of "
                         f"{tuple(ATTACKS)}")
    if params["iebn_init"] not in IEBN_INITS:
        raise ValueError(f"parameter iebn_init={params['iebn_init']!r} is not valid; allowed: {IEBN_INITS}")
    seeds = list(range(params["seed"], params["seed"] + params["seeds"]))
    try:
        return Trial(DROP_CLAIM, ARMS, "relative_drop", "less", seeds)
    except ValueError as exc:
        raise ValueError(f"parameter seeds={params['seeds']} cannot give a verdict: {exc}") from None


def run_evidence(params: Mapping[str, Any], data: tuple[Any, Any], progress: bool = True,
                 executor: Any = None) -> dict[str, Any]:
    """Calibration, the paired trial and its verdicts (module docstring); the trial's points through
    ``executor`` (:func:`workbench.sweep.trial_executor`; ``None``: in this process). Returns ``{"calibration",
    "trial", "rows", "drop_rows", "verdicts": {"clean", "drop"}, "gate": {key: log}, "seconds"}``."""
    check_evidence_params(params)
    started = time.perf_counter()
    calibration = calibrate(params, data, progress)
    seeds = tuple(range(params["seed"], params["seed"] + params["seeds"]))
    trial = Trial("accuracy of BN and IEBN, clean and under each calibrated attack", ARMS, "acc", "greater",
                  seeds, tuple(trial_settings(calibration)))
    result = run_trial(trial, make_run_point(params, data), executor=executor, progress=progress)
    gate_logs = take_gate_logs(result.rows)
    return {"calibration": calibration, "trial": trial.to_dict(), "rows": result.rows,
            "drop_rows": relative_drop_rows(result.rows),
            "verdicts": evidence_verdicts(params, calibration, result.rows, gate_logs), "gate": gate_logs,
            "seconds": time.perf_counter() - started}


def evidence_record(evidence: Mapping[str, Any]) -> dict[str, Any]:
    """What results.json keeps: calibration, tidy rows (with relative drops) and the verdicts."""
    return {"calibration": evidence["calibration"], "rows": evidence["drop_rows"] + [
        r for r in evidence["rows"] if r["attack"] == "clean"],
        "verdicts": [v.to_dict() for kind in ("clean", "drop") for v in evidence["verdicts"][kind]],
        "seconds": evidence["seconds"]}
