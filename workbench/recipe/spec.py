"""The run spec of ``workbench train``: what one training run is, checked before anything starts.

:class:`TrainConfig` holds every key; :func:`config_parameters` declares the allowed values of the
flat keys (the command line writes each flag's help from it), :mod:`workbench.recipe.sections` those
of the nested ``noise`` / ``sparsity`` / ``probes`` sections. :func:`load_config` reads a YAML file
and the flags over it and checks every value (unknown keys, nested ones included, are refused with
the allowed keys; bad values with the allowed values). :func:`check_setup` adds the checks that need
the number of ranks and the model (built once on the CPU): it runs before torchrun launches and again
in every worker before the process group starts, so a bad run spec starts nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.params import DEVICE_CHOICES_HELP, Param
from workbench.recipe.sections import (
    NESTED,
    NOISE_DEFAULTS,
    OFF,
    SPARSITY_DEFAULTS,
    check_probe_batches,
    check_sections,
    check_sections_on_model,
    fill_probes,
    fill_section,
    merge_flags,
)

SCHEDULES = ("onecycle", "cosine", "step", "constant")


@dataclass
class TrainConfig:
    """One training run: model, data, optimiser and schedule, device and acceleration, output, and the
    optional ``noise``, ``sparsity`` and ``probes`` sections (see :mod:`workbench.recipe.sections`)."""

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


@functools.lru_cache(maxsize=1)
def config_parameters() -> dict[str, Param]:
    """The spec of every config key but the nested sections: ``load_config`` validates a config with
    it and ``workbench train --help`` writes each flag's help (allowed values and default) from it."""
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


# ----------------------------------------------------------------------------------------------
# Reading and checking


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
            values[key] = None if value == OFF else merge_flags(values.get(key), value)
        else:
            values[key] = value
    values["noise"] = fill_section("noise", values.get("noise"), NOISE_DEFAULTS)
    values["sparsity"] = fill_section("sparsity", values.get("sparsity"), SPARSITY_DEFAULTS)
    values["probes"] = fill_probes(values.get("probes"))
    cfg = TrainConfig(**values)
    _check_values(cfg)
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


def _check_values(cfg: TrainConfig) -> None:
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
    check_sections(cfg)


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
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size={cfg.batch_size} (global) must be divisible by the {world_size} ranks")
    fp16 = world_size > 1 and "gradient_noise_scale" in cfg.probes and acceleration(cfg).amp == "fp16"
    check_probe_batches(cfg.probes, cfg.batch_size // world_size, world_size, fp16)
    if cfg.noise is None and cfg.sparsity is None and not cfg.probes:
        return
    from workbench.models import build_model

    model = build_model(cfg.model, num_classes=dataset_num_classes(cfg), norm=cfg.norm,
                        attention=cfg.attention, width=cfg.width)
    check_sections_on_model(cfg, model)


def dataset_num_classes(cfg: TrainConfig) -> int:
    """Classes of ``cfg.dataset``: known without loading for built-in and folder datasets; a registered
    dataset's train split is built to read it."""
    from workbench.data import describe_dataset, get_dataset

    known = describe_dataset(cfg.dataset).num_classes
    return known if known is not None else get_dataset(cfg.dataset, "train", root=cfg.data_root).num_classes
