"""The nested sections of a run spec: ``noise``, ``sparsity`` and ``probes``.

Each section is a mapping with defaults (:data:`NOISE_DEFAULTS`, :data:`SPARSITY_DEFAULTS`, one
mapping per probe in :data:`PROBE_DEFAULTS`). A flag's section is merged key by key over the file's
(:func:`merge_flags`), the defaults are filled in (:func:`fill_section`, :func:`fill_probes`), and the
values are checked in two steps: :func:`check_sections` needs nothing but the values, while
:func:`check_probe_batches` (the per-rank batch) and :func:`check_sections_on_model` (layer names,
CAGM and attention sites) run in :func:`workbench.recipe.spec.check_setup`. A library's own
``ValueError`` is re-raised with the key it is about (``noise.kind=...``), so every message names the
config key and the allowed values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

NESTED = ("noise", "sparsity", "probes")
OFF = "off"  # a nested flag's value that removes the section (``--noise off``)
NOISE_DEFAULTS: dict[str, Any] = {"kind": "mean", "level": None, "schedule": "constant", "ramp_steps": 1000,
                                  "layers": None, "running_stats": "clean", "seed": None}
SPARSITY_METHODS = ("l1", "cags")
SPARSITY_DEFAULTS: dict[str, Any] = {"method": None, "strength": None, "mode": "subgradient", "warmup_steps": 0,
                                     "layers": None, "sites": None, "other_bns": "l1"}
GNS_METHODS = ("auto", "micro", "two_batch", "ddp")
PROBE_DEFAULTS: dict[str, dict[str, Any]] = {
    "gradient_noise_scale": {"every": 50, "method": "auto", "micro_batches": 4, "ema": 0.9, "compiled": False},
    "gsnr": {"every": 100, "micro_batches": 8, "compiled": False},
    "coupling_gap": {"every": 500, "micro_sizes": [2, 4, 8, 16, 32], "per_layer": False, "compiled": False},
    "bn_estimation_noise": {"every": 400, "batch_sizes": [2, 4, 8, 16, 32, 64, 128], "n_batches": 128,
                            "max_samples": 512, "layers": None},
    "attention": {"every": 10, "kinds": None, "layers": None},
}
NESTED_HELP = {
    "noise": "batch-statistic noise attack, e.g. '{kind: mean, level: 0.5}' (kind: constant|mean|var|both|feature, "
             "level >= 0 required, schedule: constant|ramp, ramp_steps, layers, running_stats: clean|noisy, seed)",
    "sparsity": "BN-scale sparsity, e.g. '{method: cags, strength: 1.0e-5}' (method: l1|cags required, strength, "
                "mode: subgradient|proximal, warmup_steps, layers, sites, other_bns: l1|none)",
    "probes": "read-only probes, e.g. '{gsnr: {every: 100}}' (gradient_noise_scale, gsnr, coupling_gap, "
              "bn_estimation_noise, attention; false drops one)",
}


# ----------------------------------------------------------------------------------------------
# Parsing: flags over the file, defaults filled in


def merge_flags(base: Any, over: Any) -> Any:
    """``over`` merged key by key into ``base`` when both are mappings (recursively), else ``over``."""
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            merged[key] = merge_flags(base.get(key), value)
        return merged
    return over


def fill_section(name: str, given: Any, defaults: dict[str, Any]) -> dict | None:
    """A nested section with its defaults filled in; ``None`` when absent (or ``false``: YAML's ``off``)."""
    if given is None or given is False:
        return None
    _check_mapping(name, given, defaults, f"a mapping with keys {', '.join(defaults)} (or {OFF!r} on the command line)")
    return {**defaults, **given}


def _check_mapping(name: str, given: Any, allowed: Any, what: str) -> None:
    """``given`` is a mapping whose keys are among ``allowed``; else a ValueError naming the section."""
    if not isinstance(given, dict):
        raise ValueError(f"{name}={given!r} is not valid; allowed: {what}")
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{name}.{k}' for k in unknown)}; allowed: "
                         f"{', '.join(f'{name}.{k}' for k in allowed)}")


def fill_probes(given: Any) -> dict[str, dict]:
    """The ``probes`` section: each named probe's options with its defaults; ``false`` drops a probe."""
    if given is None or given is False:
        return {}
    _check_mapping("probes", given, PROBE_DEFAULTS,
                   f"a mapping of probe names ({', '.join(PROBE_DEFAULTS)}) to their options")
    out = {}
    for name, options in given.items():
        if options is False:
            continue  # switched off, e.g. by a flag over the file's probes
        if options is None or options is True:
            options = {}
        out[name] = fill_section(f"probes.{name}", options, PROBE_DEFAULTS[name])
    return out


# ----------------------------------------------------------------------------------------------
# Value checks


def _named(section: str, exc: ValueError) -> ValueError:
    """A library's ``ValueError`` re-raised with the config key it is about (``noise.kind=...``)
    when it names one of the section's keys, else prefixed with the section."""
    message = str(exc)
    keys = PROBE_DEFAULTS[section.split(".", 1)[1]] if section.startswith("probes.") else {
        "noise": NOISE_DEFAULTS, "sparsity": SPARSITY_DEFAULTS}.get(section, {})
    if "=" in message and message.split("=", 1)[0] in keys:
        return ValueError(f"{section}.{message}")
    return ValueError(f"{section}: {message}")


def _number(key: str, value: Any, low: float = 0.0, high: float = math.inf, closed_high: bool = True) -> float:
    """``value`` as a float in ``[low, high]``; YAML's ``1e-4`` (a string to PyYAML) is accepted."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= low \
        and (value <= high if closed_high else value < high)
    if not ok:
        bound = f"<= {high:g}" if closed_high else f"< {high:g}"
        raise ValueError(f"{key}={value!r} is not valid; allowed: a number >= {low:g}"
                         + (f" and {bound}" if math.isfinite(high) else ""))
    return float(value)


def _integer(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key}={value!r} is not valid; allowed: an integer >= {low}")
    return value


def _names(key: str, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}={value!r} is not valid; allowed: null, a name or pattern, or a list of them")


def as_list(names: str | list[str] | None) -> list[str] | None:
    """A layer or site selection as a list (one name or pattern becomes a list of one)."""
    return [names] if isinstance(names, str) else names


def check_sections(cfg: Any) -> None:
    """Values of the noise, sparsity and probe sections that need no model (see
    :func:`workbench.recipe.spec.check_setup`); fills ``noise.seed`` with the run's seed."""
    if cfg.noise is not None:
        _check_noise(cfg.noise, cfg.seed)
    if cfg.sparsity is not None:
        _check_sparsity(cfg.sparsity)
    from workbench.probes.base import check_every

    for name, opts in cfg.probes.items():
        try:
            check_every(opts["every"])
            _PROBE_CHECKS[name](opts)
        except ValueError as exc:
            raise _named(f"probes.{name}", exc) from None


def _check_noise(noise: dict, seed: int) -> None:
    from workbench.noise import batch_stat_noise

    if noise["level"] is None:
        raise ValueError("noise.level is required when noise is given; allowed: a finite number >= 0")
    noise["level"] = _number("noise.level", noise["level"])
    if noise["seed"] is None:
        noise["seed"] = seed
    _names("noise.layers", noise["layers"])
    # the handle validates kind, schedule, ramp_steps, running_stats and seed; layer names need the model
    try:
        batch_stat_noise(nn.BatchNorm2d(1), noise["level"], kind=noise["kind"], seed=noise["seed"],
                         schedule=noise["schedule"], running_stats=noise["running_stats"],
                         ramp_steps=noise["ramp_steps"]).remove()
    except ValueError as exc:
        raise _named("noise", exc) from None


def _check_sparsity(sp: dict) -> None:
    from workbench.pruning.sparsity import BNScaleSparsity, CAGSSparsity

    if sp["method"] not in SPARSITY_METHODS:
        raise ValueError(f"sparsity.method={sp['method']!r} is not valid; allowed: {SPARSITY_METHODS}")
    if sp["strength"] is not None:
        sp["strength"] = _number("sparsity.strength", sp["strength"])
    wrong = ("sites", "other_bns") if sp["method"] == "l1" else ("layers",)
    for key in wrong:
        if sp[key] != SPARSITY_DEFAULTS[key]:
            other = "cags" if sp["method"] == "l1" else "l1"
            raise ValueError(f"sparsity.{key} applies to method {other!r} only, not {sp['method']!r}")
    _names("sparsity.layers", sp["layers"])
    _names("sparsity.sites", sp["sites"])
    try:
        if sp["method"] == "l1":
            BNScaleSparsity(lam=0.0, mode=sp["mode"], warmup_steps=sp["warmup_steps"])
        else:
            CAGSSparsity(lam=0.0, mode=sp["mode"], warmup_steps=sp["warmup_steps"], other_bns=sp["other_bns"])
    except ValueError as exc:
        raise _named("sparsity", exc) from None


def _check_gradient_noise_scale(opts: dict) -> None:
    from workbench.probes import GradientNoiseScale

    if opts["method"] not in GNS_METHODS:
        raise ValueError(f"method={opts['method']!r} is not valid; allowed: {GNS_METHODS}")
    opts["ema"] = _number("ema", opts["ema"], 0.0, 1.0, closed_high=False)
    method = opts["method"] if opts["method"] in ("micro", "two_batch") else "micro"
    GradientNoiseScale(opts["every"], opts["micro_batches"], method, opts["ema"], compiled=opts["compiled"])


def _check_gsnr(opts: dict) -> None:
    from workbench.probes import GradientSNR

    GradientSNR(opts["every"], opts["micro_batches"], compiled=opts["compiled"])


def _check_coupling_gap(opts: dict) -> None:
    from workbench.probes import CouplingGap

    if not isinstance(opts["micro_sizes"], list):
        raise ValueError(f"micro_sizes={opts['micro_sizes']!r} is not valid; allowed: a list of integers >= 1")
    if not isinstance(opts["per_layer"], bool):
        raise ValueError(f"per_layer={opts['per_layer']!r} is not valid; allowed: true, false")
    CouplingGap(opts["every"], opts["micro_sizes"], opts["per_layer"], compiled=opts["compiled"])


def _check_bn_estimation_noise(opts: dict) -> None:
    sizes = opts["batch_sizes"]
    if not isinstance(sizes, list) or not sizes or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ValueError(f"batch_sizes={sizes!r} is not valid; allowed: a list of integers >= 1")
    _integer("n_batches", opts["n_batches"], 1)
    _integer("max_samples", opts["max_samples"], 2)
    _names("layers", opts["layers"])


def _check_attention(opts: dict) -> None:
    from workbench.nn.probe import ATTENTION_KINDS

    kinds = as_list(opts["kinds"])
    if kinds is not None and (not isinstance(kinds, list) or not kinds or any(k not in ATTENTION_KINDS for k in kinds)):
        raise ValueError(f"kinds={opts['kinds']!r} is not valid; allowed: null or a subset of {ATTENTION_KINDS}")
    _names("layers", opts["layers"])


_PROBE_CHECKS: dict[str, Callable[[dict], None]] = {
    "gradient_noise_scale": _check_gradient_noise_scale,
    "gsnr": _check_gsnr,
    "coupling_gap": _check_coupling_gap,
    "bn_estimation_noise": _check_bn_estimation_noise,
    "attention": _check_attention,
}


# ----------------------------------------------------------------------------------------------
# Checks against the number of ranks and the model (run by check_setup)


def check_probe_batches(probes: dict[str, dict], local_batch: int, world_size: int, fp16: bool) -> None:
    """The probes against the per-rank batch ``local_batch``: micro-batch sizes, and the gradient noise
    scale's estimator against the number of ranks (``fp16``: the run's autocast is fp16)."""
    from workbench.probes.microbatch import check_micro_batches

    distributed = world_size > 1
    for name, opts in probes.items():
        try:
            if name == "gradient_noise_scale":
                _check_gns_estimator(opts["method"], world_size, fp16)
                if not distributed:
                    check_micro_batches(local_batch, opts["micro_batches"])
            elif name == "gsnr":
                check_micro_batches(local_batch, opts["micro_batches"])
            elif name == "coupling_gap" and not any(b < local_batch for b in opts["micro_sizes"]):
                raise ValueError(f"micro_sizes={opts['micro_sizes']!r} are all >= the per-rank batch of "
                                 f"{local_batch}; allowed: sizes < {local_batch}")
        except ValueError as exc:
            raise _named(f"probes.{name}", exc) from None


def _check_gns_estimator(method: str, world_size: int, fp16: bool) -> None:
    distributed = world_size > 1
    if distributed and method in ("micro", "two_batch"):
        raise ValueError(f"method={method!r} is not valid under DDP ({world_size} ranks); allowed: "
                         "'auto', 'ddp' (per-rank vs all-reduced gradient)")
    if not distributed and method == "ddp":
        raise ValueError("method='ddp' is not valid in one process (it needs ranks); allowed: 'auto', "
                         "'micro', 'two_batch'")
    if distributed and fp16:
        raise ValueError("the DDP estimator is not valid with amp='fp16' (loss-scaled gradients); "
                         "allowed: amp 'off', 'bf16'")


def check_sections_on_model(cfg: Any, model: nn.Module) -> None:
    """Layer names and patterns, CAGM sites and attention sites of the sections against ``model``
    (built as the run will build it)."""
    if cfg.noise is not None:
        from workbench.noise import batch_stat_noise

        n = cfg.noise
        try:
            batch_stat_noise(model, n["level"], kind=n["kind"], layers=n["layers"], seed=n["seed"],
                             schedule=n["schedule"], running_stats=n["running_stats"],
                             ramp_steps=n["ramp_steps"]).remove()
        except ValueError as exc:
            raise _named("noise", exc) from None
    if cfg.sparsity is not None:
        _check_sparsity_on_model(cfg.sparsity, model, cfg.model, cfg.norm)
    for name, opts in cfg.probes.items():
        try:
            if name == "attention":
                from workbench.probes import AttentionMonitor

                AttentionMonitor(model, opts["every"], kinds=opts["kinds"], layers=opts["layers"]).recorder.remove()
            elif name == "bn_estimation_noise":
                from workbench.noise import select_layers

                select_layers(model, opts["layers"])  # the same name/pattern rules as the probe's
        except ValueError as exc:
            raise _named(f"probes.{name}", exc) from None


def _check_sparsity_on_model(sp: dict, model: nn.Module, model_name: str, norm: str) -> None:
    from workbench.pruning.importance import is_norm
    from workbench.pruning.sparsity import CAGSSparsity

    norms = [n for n, m in model.named_modules() if is_norm(m)]
    if not norms:
        raise ValueError(f"sparsity: model {model_name!r} with norm={norm!r} has no affine BatchNorm layer "
                         "to sparsify; allowed: norm 'bn' or 'iebn'")
    if sp["method"] == "l1" and sp["layers"] is not None:
        unknown = [n for n in as_list(sp["layers"]) if n not in norms]
        if unknown:
            raise ValueError(f"sparsity.layers {unknown} are not affine BatchNorm layers of {model_name!r}; "
                             f"allowed: {', '.join(norms[:12])}{', ...' if len(norms) > 12 else ''}")
    if sp["method"] == "cags":
        try:
            CAGSSparsity(lam=0.0, sites=as_list(sp["sites"])).attach(model).remove()
        except ValueError as exc:
            raise _named("sparsity", exc) from None
