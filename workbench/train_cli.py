"""``workbench train``: train a model from a config, in one process or data-parallel under torchrun.

Every config key is also a command-line flag (``--epochs 5``); a YAML file (``--config run.yaml``)
gives defaults the flags override. Under ``torchrun`` (or ``--nproc-per-node N``, which launches
torchrun) the BN family is converted to synchronised statistics (IEBN keeps its attention), each
rank reads its share of every global batch, and rank 0 alone logs and writes checkpoints. Across nodes,
the same command runs on each with ``--nnodes``, ``--node-rank`` and ``--rdzv-endpoint`` (torchrun's
c10d rendezvous; ``--output`` must be a folder every node sees, see :mod:`workbench.distributed`).

Three nested sections add instrumentation (all optional; on the command line each is a YAML flow
mapping, e.g. ``--noise "{kind: mean, level: 0.5}"``, merged key by key into the file's section;
``--noise off`` removes it, and ``false`` for one probe removes that probe)::

    noise:                      # batch-statistic noise attack (workbench.noise.batch_stat_noise)
      kind: mean                # constant | mean | var | both | feature
      level: 0.5                # required; >= 0
      schedule: constant        # constant | ramp (linear over ramp_steps)
      ramp_steps: 1000
      layers: null              # null (all) or names / fnmatch patterns of normalisation layers
      running_stats: clean      # clean | noisy
      seed: null                # null: the run's seed
    sparsity:                   # BN-scale sparsity (workbench.pruning.sparsity)
      method: l1                # l1 (Network Slimming) | cags (CAP's CAGM-guided L1)
      strength: null            # lambda; null: the architecture's default (1e-5 ResNets, 1e-4 VGG/SegNet)
      mode: subgradient         # subgradient | proximal
      warmup_steps: 0
      layers: null              # l1 only: the BN layers to penalise (null: all)
      sites: null               # cags only: CAGM sites (null: the model's cagm_sites(), else every BN)
      other_bns: l1             # cags only: l1 | none, the penalty on BNs without a CAGM
    probes:                     # read-only measurements, JSON logs <output>/<probe>.json (rank 0)
      gradient_noise_scale: {every: 50, method: auto, micro_batches: 4, ema: 0.9, compiled: false}
      gsnr: {every: 100, micro_batches: 8, compiled: false}
      coupling_gap: {every: 500, micro_sizes: [2, 4, 8, 16, 32], per_layer: false, compiled: false}
      bn_estimation_noise: {every: 400, batch_sizes: [2, 4, 8, 16, 32, 64, 128], n_batches: 128,
                            max_samples: 512, layers: null}
      attention: {every: 10, kinds: null, layers: null}   # IEBN / SE / DIA sites

A probe given as ``null``, ``true`` or ``{}`` runs with its defaults. ``gradient_noise_scale``'s
``method``: ``auto`` is ``micro`` in one process and ``ddp`` under DDP; ``ddp`` is McCandlish's
nearly free estimator from each rank's own gradient (batch = per-rank batch) against the
all-reduced one (batch = global batch), see :class:`workbench.probes.DDPGradientNoiseScale`;
``micro`` and ``two_batch`` are the one-process estimators. ``compiled: true`` runs a probe's
micro-batch gradients through ``torch.compile`` (compiled once per shape, then faster than eager vmap;
see :mod:`workbench.probes.microbatch`). Under DDP the other probes measure
rank 0's share of the batch, on rank 0 only (``gsnr`` and ``coupling_gap`` with every rank's batch
normalised on its own, as their micro-batches are); the statistic noise is one draw shared by the
ranks (feature noise is drawn independently per rank, the ranks holding different samples), and
CAGS's guiding vectors are averaged over the ranks every step so that every replica applies the
same penalty (the guide of the global batch). CAP designed CAGS for segmentation; its CAGM only
needs a ``C x H x W`` feature after a BN, so classification CNNs accept it too.

Every key and value is checked before anything starts (also before torchrun launches): an
unknown key, nested ones included, is refused with the allowed keys, a bad value with the
allowed values, a layer pattern that matches nothing with the model's layer names.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.callbacks import Callback
from workbench.distributed import (
    DistInfo,
    add_multinode_arguments,
    available_devices,
    check_shared_output,
    dist_info_from_env,
    launch_from_args,
    run_torchrun,
    setup_distributed,
    worker_argv,
)
from workbench.params import DEVICE_CHOICES_HELP, Param
from workbench.train import unwrap

SCHEDULES = ("onecycle", "cosine", "step", "constant")
NESTED = ("noise", "sparsity", "probes")
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


@dataclass
class TrainConfig:
    model: str = "resnet20"
    dataset: str = "digits"
    data_root: str | None = None
    norm: str = "bn"
    attention: str = "none"
    width: float = 1.0
    epochs: int = 15
    batch_size: int = 64  # global: split evenly over the ranks
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    augment: bool = True
    amp: str = "auto"  # bf16 on CUDA, off elsewhere (workbench.device.resolve_acceleration)
    channels_last: bool | None = None  # None: on with CUDA, off elsewhere
    compile: bool = False  # train through torch.compile (see workbench.train.fit)
    seed: int = 0
    device: str = "auto"
    output: str = "checkpoints/train"
    resume: bool = False
    max_steps: int | None = None
    sync_bn: bool = True
    progress: bool = True
    noise: dict | None = None
    sparsity: dict | None = None
    probes: dict = field(default_factory=dict)


CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
DEBUG_ENV_VAR = "WORKBENCH_DEBUG"  # set by `workbench --debug`: errors show their traceback
OFF = "off"  # a nested flag's value that removes the section (``--noise off``)
NESTED_HELP = {
    "noise": "batch-statistic noise attack, e.g. '{kind: mean, level: 0.5}' (kind: constant|mean|var|both|feature, "
             "level >= 0 required, schedule: constant|ramp, ramp_steps, layers, running_stats: clean|noisy, seed)",
    "sparsity": "BN-scale sparsity, e.g. '{method: cags, strength: 1.0e-5}' (method: l1|cags required, strength, "
                "mode: subgradient|proximal, warmup_steps, layers, sites, other_bns: l1|none)",
    "probes": "read-only probes, e.g. '{gsnr: {every: 100}}' (gradient_noise_scale, gsnr, coupling_gap, "
              "bn_estimation_noise, attention; false drops one)",
}


@functools.lru_cache(maxsize=1)
def config_parameters() -> dict[str, Param]:
    """The spec of every config key but the nested sections: ``_check`` validates a config with it
    and ``build_parser`` writes each flag's help (allowed values and default) from it."""
    from workbench.data import list_datasets
    from workbench.device import AMP_CHOICES
    from workbench.models import list_models
    from workbench.models.cifar_resnet import ATTENTIONS, NORMS

    return {
        "model": Param(str, choices=tuple(list_models()), help="network built by workbench.models.build_model"),
        "dataset": Param(str, help=f"training data: a registered name ({', '.join(list_datasets())}) or a "
                                   "dataset folder; the on-disk sets are read from --data-root"),
        "data_root": Param(str, nullable=True, help="folder holding the dataset (None: data/ or $WORKBENCH_DATA)"),
        "norm": Param(str, choices=NORMS, help="normalisation layer"),
        "attention": Param(str, choices=ATTENTIONS, help="channel attention in every block (CIFAR ResNets)"),
        "width": Param(float, min=0.0, min_open=True, max=64.0, help="channel width multiplier"),
        "epochs": Param(int, min=1, help="passes over the training set"),
        "batch_size": Param(int, min=1, help="global batch size, split evenly over the ranks; at most the "
                                             "training set's size"),
        "lr": Param(float, min=0.0, min_open=True, max=100.0, help="peak learning rate of the schedule"),
        "momentum": Param(float, min=0.0, max=1.0, max_open=True, help="SGD momentum"),
        "weight_decay": Param(float, min=0.0, max=1.0, help="SGD weight decay, on every parameter"),
        "schedule": Param(str, choices=SCHEDULES, help="learning-rate schedule (onecycle and cosine per step, "
                                                       "step at --milestones)"),
        "milestones": Param(list, item_type=int, min=1, help="epochs at which the 'step' schedule multiplies "
                                                             "the learning rate by --gamma"),
        "gamma": Param(float, min=0.0, min_open=True, max=1.0, help="factor of each 'step' schedule milestone"),
        "augment": Param(bool, help="random crops (and flips, where the data allows) of the training images"),
        "amp": Param(str, choices=AMP_CHOICES, help="mixed precision (autocast): auto is bf16 on CUDA and off "
                                                     "elsewhere; fp16/bf16 need CUDA"),
        "channels_last": Param(bool, nullable=True, help="channels-last memory format (None: on with CUDA, off "
                                                         "elsewhere)"),
        "compile": Param(bool, help="train the forward through torch.compile"),
        "seed": Param(int, min=0, help="seed of the weights, the batch order and the noise draws"),
        "device": Param(str, help=f"{DEVICE_CHOICES_HELP}; cuda without a CUDA device is refused"),
        "output": Param(str, help="folder of checkpoints, history.json and the probe logs"),
        "resume": Param(bool, help="continue from <output>/last.pt"),
        "max_steps": Param(int, min=1, nullable=True, help="stop after this many optimiser steps (None: all epochs)"),
        "sync_bn": Param(bool, help="under DDP, synchronise the BN family's batch statistics over the ranks"),
        "progress": Param(bool, help="progress bars"),
    }


def load_config(path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < YAML file < command-line flags; any unknown key (nested ones too) is an error
    listing the allowed, and every value is checked (see the module docstring)."""
    values: dict[str, Any] = dict(read_config_file(path)) if path else {}
    unknown = sorted(set(values) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}; allowed: {', '.join(CONFIG_KEYS)}")
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in CONFIG_KEYS:
            raise ValueError(f"unknown config key(s) {key}; allowed: {', '.join(CONFIG_KEYS)}")
        if key in NESTED:
            values[key] = None if value == OFF else _merge(values.get(key), value)
        else:
            values[key] = value
    values["noise"] = _section("noise", values.get("noise"), NOISE_DEFAULTS)
    values["sparsity"] = _section("sparsity", values.get("sparsity"), SPARSITY_DEFAULTS)
    values["probes"] = _probes(values.get("probes"))
    cfg = TrainConfig(**values)
    _check(cfg)
    return cfg


def read_config_file(path: str | os.PathLike) -> dict:
    """The mapping a YAML config file holds; a missing, unreadable, binary or malformed file is a
    ``ValueError`` naming the file (and the line, for a YAML error)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist; pass the path of a YAML file to --config")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not a text file (not UTF-8); --config takes a YAML file") from None
    except OSError as exc:
        raise ValueError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise ValueError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must be a mapping of keys to values, got {type(loaded).__name__}")
    return loaded


def _merge(base: Any, over: Any) -> Any:
    """``over`` merged key by key into ``base`` when both are mappings (recursively), else ``over``."""
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            merged[key] = _merge(base.get(key), value)
        return merged
    return over


def _section(name: str, given: Any, defaults: dict[str, Any]) -> dict | None:
    """A nested section with its defaults filled in; ``None`` when absent (or ``false``: YAML's ``off``)."""
    if given is None or given is False:
        return None
    if not isinstance(given, dict):
        raise ValueError(f"{name}={given!r} is not valid; allowed: a mapping with keys {', '.join(defaults)} "
                         f"(or {OFF!r} on the command line)")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{name}.{k}' for k in unknown)}; allowed: "
                         f"{', '.join(f'{name}.{k}' for k in defaults)}")
    return {**defaults, **given}


def _probes(given: Any) -> dict[str, dict]:
    if given is None or given is False:
        return {}
    if not isinstance(given, dict):
        raise ValueError(f"probes={given!r} is not valid; allowed: a mapping of probe names "
                         f"({', '.join(PROBE_DEFAULTS)}) to their options")
    unknown = sorted(set(given) - set(PROBE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'probes.{k}' for k in unknown)}; allowed: "
                         f"{', '.join(f'probes.{k}' for k in PROBE_DEFAULTS)}")
    out = {}
    for name, options in given.items():
        if options is False:
            continue  # switched off, e.g. by a flag over the file's probes
        if options is None or options is True:
            options = {}
        out[name] = _section(f"probes.{name}", options, PROBE_DEFAULTS[name])
    return out


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


def _check_nested(cfg: TrainConfig) -> None:
    """Values of the noise, sparsity and probe sections that need no model (see check_setup)."""
    from workbench.noise import batch_stat_noise
    from workbench.probes import CouplingGap, GradientNoiseScale, GradientSNR
    from workbench.probes.base import check_every
    from workbench.pruning.sparsity import BNScaleSparsity, CAGSSparsity

    if cfg.noise is not None:
        noise = cfg.noise
        if noise["level"] is None:
            raise ValueError("noise.level is required when noise is given; allowed: a finite number >= 0")
        noise["level"] = _number("noise.level", noise["level"])
        if noise["seed"] is None:
            noise["seed"] = cfg.seed
        _names("noise.layers", noise["layers"])
        # the handle validates kind, schedule, ramp_steps, running_stats and seed; layer names need the model
        try:
            batch_stat_noise(nn.BatchNorm2d(1), noise["level"], kind=noise["kind"], seed=noise["seed"],
                             schedule=noise["schedule"], running_stats=noise["running_stats"],
                             ramp_steps=noise["ramp_steps"]).remove()
        except ValueError as exc:
            raise _named("noise", exc) from None
    if cfg.sparsity is not None:
        sp = cfg.sparsity
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
    for name, opts in cfg.probes.items():
        key = f"probes.{name}"
        try:
            check_every(opts["every"])
            if name == "gradient_noise_scale":
                if opts["method"] not in GNS_METHODS:
                    raise ValueError(f"method={opts['method']!r} is not valid; allowed: {GNS_METHODS}")
                opts["ema"] = _number("ema", opts["ema"], 0.0, 1.0, closed_high=False)
                method = opts["method"] if opts["method"] in ("micro", "two_batch") else "micro"
                GradientNoiseScale(opts["every"], opts["micro_batches"], method, opts["ema"],
                                   compiled=opts["compiled"])
            elif name == "gsnr":
                GradientSNR(opts["every"], opts["micro_batches"], compiled=opts["compiled"])
            elif name == "coupling_gap":
                if not isinstance(opts["micro_sizes"], list):
                    raise ValueError(f"micro_sizes={opts['micro_sizes']!r} is not valid; allowed: a list of "
                                     "integers >= 1")
                if not isinstance(opts["per_layer"], bool):
                    raise ValueError(f"per_layer={opts['per_layer']!r} is not valid; allowed: true, false")
                CouplingGap(opts["every"], opts["micro_sizes"], opts["per_layer"], compiled=opts["compiled"])
            elif name == "bn_estimation_noise":
                sizes = opts["batch_sizes"]
                if not isinstance(sizes, list) or not sizes or any(
                        isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
                    raise ValueError(f"batch_sizes={sizes!r} is not valid; allowed: a list of integers >= 1")
                _integer("n_batches", opts["n_batches"], 1)
                _integer("max_samples", opts["max_samples"], 2)
                _names("layers", opts["layers"])
            elif name == "attention":
                from workbench.nn.probe import ATTENTION_KINDS

                kinds = opts["kinds"]
                kinds = [kinds] if isinstance(kinds, str) else kinds
                if kinds is not None and (not isinstance(kinds, list) or not kinds
                                          or any(k not in ATTENTION_KINDS for k in kinds)):
                    raise ValueError(f"kinds={opts['kinds']!r} is not valid; allowed: null or a subset of "
                                     f"{ATTENTION_KINDS}")
                _names("layers", opts["layers"])
        except ValueError as exc:
            raise _named(key, exc) from None


def _check(cfg: TrainConfig) -> None:
    """The dataset (a name or a folder), then every key against ``config_parameters()`` (types,
    choices, finite numbers in range), the device against this machine, then the nested sections."""
    from workbench.data import check_dataset
    from workbench.device import resolve_device

    try:  # a built-in or registered name, or a folder (scanned here, before any process starts)
        cfg.dataset = check_dataset(cfg.dataset)
    except ValueError as exc:
        raise ValueError(f"dataset: {exc}") from None
    for f in dataclasses.fields(TrainConfig):
        if f.type in ("bool", bool) and not isinstance(getattr(cfg, f.name), bool):
            raise ValueError(f"{f.name}={getattr(cfg, f.name)!r} is not valid; allowed: true, false")
    for name, param in config_parameters().items():
        value = getattr(cfg, name)
        if param.type is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        setattr(cfg, name, param.check(name, value))
    try:
        resolve_device(cfg.device)
        acceleration(cfg)  # bf16/fp16 autocast without CUDA is refused here, before anything starts
    except RuntimeError as exc:  # an accelerator that is not there
        raise ValueError(str(exc)) from None
    _check_nested(cfg)


def acceleration(cfg: TrainConfig, device: torch.device | None = None) -> Any:
    """``cfg``'s amp / channels_last / compile resolved for ``device`` (default: ``cfg.device``), as
    :func:`workbench.device.resolve_acceleration` gives them."""
    from workbench.device import resolve_acceleration

    return resolve_acceleration(cfg.device if device is None else device, cfg.amp, cfg.channels_last, cfg.compile)


def check_batch_size(cfg: TrainConfig, train_size: int) -> None:
    """A batch larger than the training set would silently train on one short batch per epoch."""
    if cfg.batch_size > train_size:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {train_size} training samples of "
                         f"{cfg.dataset!r}; allowed: 1..{train_size}")


def check_setup(cfg: TrainConfig, world_size: int) -> None:
    """The checks that need the number of processes and the model (built once on the CPU, cheap):
    batch divisibility, micro-batch sizes against the per-rank batch, estimator choice, layer names,
    CAGM sites and attention sites. Run before torchrun launches and again in every worker before
    the process group starts."""
    from workbench.models import build_model
    from workbench.noise import batch_stat_noise, select_layers
    from workbench.probes import AttentionMonitor
    from workbench.probes.microbatch import check_micro_batches
    from workbench.pruning.importance import is_norm
    from workbench.pruning.sparsity import CAGSSparsity

    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size={cfg.batch_size} (global) must be divisible by the {world_size} ranks")
    local = cfg.batch_size // world_size
    distributed = world_size > 1
    for name, opts in cfg.probes.items():
        key = f"probes.{name}"
        try:
            if name == "gradient_noise_scale":
                method = opts["method"]
                if distributed and method in ("micro", "two_batch"):
                    raise ValueError(f"method={method!r} is not valid under DDP ({world_size} ranks); allowed: "
                                     "'auto', 'ddp' (per-rank vs all-reduced gradient)")
                if not distributed and method == "ddp":
                    raise ValueError("method='ddp' is not valid in one process (it needs ranks); allowed: 'auto', "
                                     "'micro', 'two_batch'")
                if distributed and acceleration(cfg).amp == "fp16":
                    raise ValueError("the DDP estimator is not valid with amp='fp16' (loss-scaled gradients); "
                                     "allowed: amp 'off', 'bf16'")
                if not distributed:
                    check_micro_batches(local, opts["micro_batches"])
            elif name == "gsnr":
                check_micro_batches(local, opts["micro_batches"])
            elif name == "coupling_gap" and not any(b < local for b in opts["micro_sizes"]):
                raise ValueError(f"micro_sizes={opts['micro_sizes']!r} are all >= the per-rank batch of {local}; "
                                 f"allowed: sizes < {local}")
        except ValueError as exc:
            raise _named(key, exc) from None
    if cfg.noise is None and cfg.sparsity is None and not cfg.probes:
        return
    model = build_model(cfg.model, num_classes=dataset_num_classes(cfg), norm=cfg.norm,
                        attention=cfg.attention, width=cfg.width)
    if cfg.noise is not None:
        n = cfg.noise
        try:
            batch_stat_noise(model, n["level"], kind=n["kind"], layers=n["layers"], seed=n["seed"],
                             schedule=n["schedule"], running_stats=n["running_stats"],
                             ramp_steps=n["ramp_steps"]).remove()
        except ValueError as exc:
            raise _named("noise", exc) from None
    if cfg.sparsity is not None:
        sp = cfg.sparsity
        norms = [n for n, m in model.named_modules() if is_norm(m)]
        if not norms:
            raise ValueError(f"sparsity: model {cfg.model!r} with norm={cfg.norm!r} has no affine BatchNorm layer "
                             "to sparsify; allowed: norm 'bn' or 'iebn'")
        if sp["method"] == "l1" and sp["layers"] is not None:
            layers = [sp["layers"]] if isinstance(sp["layers"], str) else sp["layers"]
            unknown = [n for n in layers if n not in norms]
            if unknown:
                raise ValueError(f"sparsity.layers {unknown} are not affine BatchNorm layers of {cfg.model!r}; "
                                 f"allowed: {', '.join(norms[:12])}{', ...' if len(norms) > 12 else ''}")
        if sp["method"] == "cags":
            sites = [sp["sites"]] if isinstance(sp["sites"], str) else sp["sites"]
            try:
                CAGSSparsity(lam=0.0, sites=sites).attach(model).remove()
            except ValueError as exc:
                raise _named("sparsity", exc) from None
    for name, opts in cfg.probes.items():
        try:
            if name == "attention":
                AttentionMonitor(model, opts["every"], kinds=opts["kinds"], layers=opts["layers"]).recorder.remove()
            elif name == "bn_estimation_noise":
                select_layers(model, opts["layers"])  # the same name/pattern rules as the probe's
        except ValueError as exc:
            raise _named(f"probes.{name}", exc) from None


# ----------------------------------------------------------------------------------------------
# Training


def dataset_num_classes(cfg: TrainConfig) -> int:
    """Classes of ``cfg.dataset``: known without loading for built-in and folder datasets; a registered
    dataset's train split is built to read it."""
    from workbench.data import describe_dataset, get_dataset

    known = describe_dataset(cfg.dataset).num_classes
    return known if known is not None else get_dataset(cfg.dataset, "train", root=cfg.data_root).num_classes


def _augment_option(cfg: TrainConfig) -> dict[str, Any]:
    from workbench.data import accepted_options

    return accepted_options(cfg.dataset, augment=cfg.augment)


def _test_split(dataset: str) -> str:
    """The split evaluated during training: ``val`` where a dataset has one (Cityscapes' test labels
    are withheld), else ``test``."""
    from workbench.data import describe_dataset

    splits = describe_dataset(dataset).splits
    return "val" if "val" in splits else "test"


def build_training(cfg: TrainConfig, info: DistInfo, device: torch.device):
    """Model (converted and wrapped as the run needs), loaders, optimiser, scheduler, and the noise,
    sparsity and probe callbacks."""
    from torch.utils.data import DataLoader

    from workbench.data import get_dataset, make_loader
    from workbench.data.samplers import DistributedEpochSampler
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
    if info.enabled:
        sampler = DistributedEpochSampler(len(train_set), cfg.batch_size, info.world_size, info.rank, seed=cfg.seed)
        train_loader = DataLoader(train_set, batch_size=cfg.batch_size // info.world_size, sampler=sampler)
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    else:
        train_loader = make_loader(train_set, cfg.batch_size, train=True, seed=cfg.seed)
    test_loader = make_loader(test_set, 256, train=False)
    optimizer = default_optimizer(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * len(train_loader)
    scheduler, interval = _scheduler(cfg, optimizer, steps)
    if local_twin is not None:
        _check_shared(local_twin, unwrap(model))
    callbacks = build_callbacks(cfg, info, model, test_set, local_twin)
    return Training(model, train_loader, test_loader, optimizer, scheduler, interval, train_set.task, callbacks)


@dataclass
class Training:
    model: nn.Module
    train_loader: Any
    test_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    interval: str
    task: str
    callbacks: list[Callback]


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` holding the very same parameter and buffer tensors."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _check_shared(twin: nn.Module, model: nn.Module) -> None:
    ours = dict(model.named_parameters())
    if set(ours) != {n for n, _ in twin.named_parameters()} or any(
            p is not ours[n] for n, p in twin.named_parameters()):
        raise RuntimeError("the local twin of the model no longer shares its parameters (a conversion copied them)")


# ----------------------------------------------------------------------------------------------
# Noise, sparsity and probes as training callbacks


class _StateView:
    """The training state with another ``model`` (reads and writes go to the real state)."""

    def __init__(self, state: Any, model: nn.Module) -> None:
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "model", model)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._state, name, value)


class OnModule(Callback):
    """Runs ``callback`` as if ``model`` were the model being trained.

    Under DDP the loop trains the wrapper; the sparsity regulariser (which traces the network and
    edits ``.grad``) and the probes want the bare module, or a twin of it whose BNs normalise
    locally (the probes' functional copies run on rank 0 alone, where a synchronised BN would wait
    for the other ranks forever)."""

    def __init__(self, callback: Callback, model: nn.Module) -> None:
        self.callback, self.model = callback, model

    def __getattr__(self, name: str) -> Any:  # records, path, b_simple... of the wrapped callback
        if name in ("callback", "model"):
            raise AttributeError(name)
        return getattr(self.callback, name)

    def on_fit_start(self, state: Any) -> None:
        self.callback.on_fit_start(_StateView(state, self.model))

    def on_step_start(self, state: Any) -> None:
        self.callback.on_step_start(_StateView(state, self.model))

    def on_after_backward(self, state: Any) -> None:
        self.callback.on_after_backward(_StateView(state, self.model))

    def on_step_end(self, state: Any) -> None:
        self.callback.on_step_end(_StateView(state, self.model))

    def on_epoch_end(self, state: Any) -> None:
        self.callback.on_epoch_end(_StateView(state, self.model))

    def on_fit_end(self, state: Any) -> None:
        self.callback.on_fit_end(_StateView(state, self.model))

    def state_dict(self) -> dict:
        return self.callback.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.callback.load_state_dict(state)


class SyncedCAGS(OnModule):
    """CAGS under DDP: each rank's CAGMs see only its own samples, so their guiding vectors are
    averaged over the ranks after every forward (one all-reduce of all of them together). The
    running guide is linear in the per-batch guides, so the average equals the guide of the global
    batch, and every replica adds the same penalty to the same all-reduced gradient: the replicas
    stay identical, as DDP requires."""

    def on_after_backward(self, state: Any) -> None:
        import torch.distributed as dist

        cagms = [m for _, m in self.callback.cagms] if self.callback.cagms is not None else []
        if cagms:
            flat = torch.cat([m.guidance.reshape(-1) for m in cagms])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for m, chunk in zip(cagms, flat.split([m.guidance.numel() for m in cagms])):
                m.guidance = chunk.view_as(m.guidance).clone()
        super().on_after_backward(state)


def build_callbacks(cfg: TrainConfig, info: DistInfo, model: nn.Module, probe_set: Any,
                    local_twin: nn.Module | None = None) -> list[Callback]:
    """Noise, sparsity and probe callbacks for ``model`` (the DDP wrapper under DDP).

    Order: noise, the probes every rank runs (the DDP gradient noise scale), sparsity, then the
    rank-0 probes. Probes that read ``.grad`` come before the sparsity subgradient is added to it;
    the attention monitor removes its hooks before the BN-estimation probe's extra forward; and
    every rank's list is a prefix of rank 0's, which fit() relies on when it restores callback states
    from rank 0's checkpoint by position.
    """
    from workbench.noise import batch_stat_noise
    from workbench.probes import (
        AttentionMonitor,
        BNEstimationNoise,
        CouplingGap,
        DDPGradientNoiseScale,
        GradientNoiseScale,
        GradientSNR,
    )
    from workbench.pruning.sparsity import BNScaleSparsity, CAGSSparsity, default_lambda

    bare = unwrap(model)
    out = Path(cfg.output)

    def path(name: str) -> Path | None:
        return out / f"{name}.json" if info.is_main else None

    callbacks: list[Callback] = []
    if cfg.noise is not None:
        n = cfg.noise
        callbacks.append(batch_stat_noise(bare, n["level"], kind=n["kind"], layers=n["layers"], seed=n["seed"],
                                          schedule=n["schedule"], running_stats=n["running_stats"],
                                          ramp_steps=n["ramp_steps"]))
    gns = cfg.probes.get("gradient_noise_scale")
    if gns is not None and info.enabled:
        callbacks.append(DDPGradientNoiseScale(gns["every"], gns["ema"], path(
            "gradient_noise_scale")).attach(model))
    elif gns is not None:
        method = "micro" if gns["method"] == "auto" else gns["method"]
        callbacks.append(GradientNoiseScale(gns["every"], gns["micro_batches"], method, gns["ema"],
                                            path("gradient_noise_scale"), compiled=gns["compiled"]))
    if cfg.sparsity is not None:
        sp = cfg.sparsity
        lam = sp["strength"] if sp["strength"] is not None else default_lambda(cfg.model)
        if sp["method"] == "l1":
            layers = [sp["layers"]] if isinstance(sp["layers"], str) else sp["layers"]
            sparsity: Callback = BNScaleSparsity(lam, warmup_steps=sp["warmup_steps"], layers=layers, mode=sp["mode"])
            callbacks.append(OnModule(sparsity, bare) if info.enabled else sparsity)
        else:
            sites = [sp["sites"]] if isinstance(sp["sites"], str) else sp["sites"]
            sparsity = CAGSSparsity(lam, warmup_steps=sp["warmup_steps"], sites=sites, other_bns=sp["other_bns"],
                                    mode=sp["mode"])
            callbacks.append(SyncedCAGS(sparsity, bare) if info.enabled else sparsity)
    if not info.is_main:
        return callbacks
    probes = cfg.probes
    if "attention" in probes:
        opts = probes["attention"]
        callbacks.append(AttentionMonitor(bare, opts["every"], path("attention"), kinds=opts["kinds"],
                                          layers=opts["layers"]))
    local = local_twin if info.enabled else bare
    if "gsnr" in probes:
        gsnr = GradientSNR(probes["gsnr"]["every"], probes["gsnr"]["micro_batches"], path("gsnr"),
                           compiled=probes["gsnr"]["compiled"])
        callbacks.append(OnModule(gsnr, local) if info.enabled else gsnr)
    if "coupling_gap" in probes:
        opts = probes["coupling_gap"]
        gap = CouplingGap(opts["every"], opts["micro_sizes"], opts["per_layer"], path("coupling_gap"),
                          compiled=opts["compiled"])
        callbacks.append(OnModule(gap, local) if info.enabled else gap)
    if "bn_estimation_noise" in probes:
        opts = probes["bn_estimation_noise"]
        # a fixed probe set: the first samples of the evaluation split; eval mode, so the bare module's
        # synchronised BNs run locally and the noise hooks are idle
        est = BNEstimationNoise(probe_set, opts["every"], opts["batch_sizes"], opts["n_batches"], opts["layers"],
                                opts["max_samples"], seed=cfg.seed, path=path("bn_estimation_noise"))
        callbacks.append(OnModule(est, bare) if info.enabled else est)
    return callbacks


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps: int):
    sched = torch.optim.lr_scheduler
    if cfg.schedule == "onecycle":
        return sched.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.15), "step"
    if cfg.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=max(steps, 1)), "step"
    if cfg.schedule == "step":
        return sched.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma), "epoch"
    return None, "epoch"


def train(cfg: TrainConfig) -> dict:
    from workbench.io import write_json_atomic
    from workbench.train import fit

    info = dist_info_from_env()
    check_setup(cfg, info.world_size)  # before the process group: a bad config starts nothing
    device = setup_distributed(cfg.device, info)
    try:
        check_shared_output(cfg.output, info)  # rank 0 writes checkpoints every rank resumes from
        t = build_training(cfg, info, device)
        accel = acceleration(cfg, device)
        out = Path(cfg.output)
        # every rank resumes from the same checkpoint; only rank 0 writes
        try:
            result = fit(t.model, t.train_loader, t.test_loader if info.is_main else None, cfg.epochs,
                         optimizer=t.optimizer, scheduler=t.scheduler, scheduler_interval=t.interval, device=device,
                         checkpoint_dir=str(out), resume=cfg.resume, write_checkpoints=info.is_main,
                         task=t.task, max_steps=cfg.max_steps, progress=cfg.progress and info.is_main,
                         callbacks=t.callbacks, **accel.options())
        finally:
            for cb in t.callbacks:  # hooks and patches go, also when training raised
                for target in (cb, getattr(cb, "callback", None)):
                    target = getattr(target, "recorder", target)  # the attention monitor's hooks
                    remove = getattr(target, "remove", None)
                    if callable(remove):
                        remove()
        logs = {cb.name: str(cb.path) for cb in t.callbacks if getattr(cb, "path", None) is not None}
        summary = {"config": dataclasses.asdict(cfg), "acceleration": accel.options(),
                   "world_size": info.world_size, "history": result.history,
                   "step_log": result.step_log, "probe_logs": logs}
        if info.is_main:
            write_json_atomic(out / "history.json", summary)
            print(json.dumps({"final": result.final, "output": str(out)}), flush=True)
        return summary
    finally:
        if info.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """One flag per config key, its help (allowed values, default) written from ``config_parameters()``."""
    parser = argparse.ArgumentParser(prog="workbench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="YAML", help="YAML file of config keys; flags override its values")
    parser.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                        help="launch N data-parallel processes with torchrun (gloo on CPU, NCCL on GPU)")
    spec = config_parameters()
    defaults = TrainConfig()
    add_multinode_arguments(parser)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in NESTED:
            parser.add_argument(flag, dest=f.name, type=_flow_mapping, default=None, metavar="YAML",
                                help=f"{NESTED_HELP[f.name]}; merged into the config's {f.name} section, "
                                     f"{OFF!r} drops it (default: none)")
            continue
        param = spec[f.name]
        text = f"{param.help} (default: {getattr(defaults, f.name)})"
        if param.type is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        allowed = param.describe()
        if allowed != param.type.__name__:  # a bare "str" says nothing the help does not
            text = f"{param.help}; allowed: {allowed} (default: {getattr(defaults, f.name)})"
        if param.type is list:
            parser.add_argument(flag, dest=f.name, type=param.item_type, nargs="*", default=None, metavar="N",
                                help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=param.type, default=None, metavar=f.name.upper(),
                                help=text.replace("%", "%%"))
    return parser


def _flow_mapping(text: str) -> dict | str:
    """A nested section from the command line: ``"{kind: mean, level: 0.5}"`` or ``off``."""
    import yaml

    if text.strip().lower() in (OFF, "none", "null"):
        return OFF
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not YAML: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not valid; allowed: a YAML flow mapping such as "
                                         f"'{{key: value}}', or {OFF!r}")
    return value


def _check_nproc(nproc: int, cfg: TrainConfig) -> None:
    available = available_devices(cfg.device)
    if nproc < 1 or nproc > available:
        kind = "CUDA devices" if cfg.device.startswith("cuda") or (
            cfg.device == "auto" and torch.cuda.is_available()) else "CPU cores"
        raise ValueError(f"--nproc-per-node={nproc} is not possible here: {available} {kind} available "
                         f"(allowed: 1..{available})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in CONFIG_KEYS}
    try:
        cfg = load_config(args.config, overrides)
        launch = launch_from_args(args)
        if launch is not None and "WORLD_SIZE" not in os.environ:
            _check_nproc(launch.nproc_per_node, cfg)
            check_setup(cfg, launch.world_size)
            return run_torchrun(launch, "workbench.train_cli", worker_argv(argv))
        train(cfg)
    except ValueError as exc:
        if os.environ.get(DEBUG_ENV_VAR):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
