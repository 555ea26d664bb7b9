"""``workbench train``: train a model from a config, in one process or data-parallel under torchrun.

Every config key is also a command-line flag (``--epochs 5``); a YAML file (``--config run.yaml``)
gives defaults the flags override. Under ``torchrun`` (or ``--nproc-per-node N``, which launches
torchrun) the BN family is converted to synchronised statistics (IEBN keeps its attention), each
rank reads its share of every global batch, and rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SCHEDULES = ("onecycle", "cosine", "step", "constant")


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
    amp: str = "off"
    channels_last: bool = False
    seed: int = 0
    device: str = "auto"
    output: str = "checkpoints/train"
    resume: bool = False
    max_steps: int | None = None
    sync_bn: bool = True
    progress: bool = True


CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def load_config(path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < YAML file < command-line flags; any unknown key is an error listing the allowed."""
    values: dict[str, Any] = {}
    if path:
        import yaml

        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config {path} must be a mapping of keys to values")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}; allowed: {', '.join(CONFIG_KEYS)}")
    cfg = TrainConfig(**values)
    _check(cfg)
    return cfg


def _check(cfg: TrainConfig) -> None:
    from workbench.data import list_datasets
    from workbench.device import AMP_CHOICES

    if cfg.dataset not in list_datasets():
        raise ValueError(f"dataset={cfg.dataset!r}; allowed: {list_datasets()}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule={cfg.schedule!r}; allowed: {SCHEDULES}")
    if cfg.amp not in AMP_CHOICES:
        raise ValueError(f"amp={cfg.amp!r}; allowed: {AMP_CHOICES}")
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)!r} must be >= 1")
    if cfg.lr <= 0:
        raise ValueError(f"lr={cfg.lr!r} must be > 0")


# ----------------------------------------------------------------------------------------------
# Distributed set-up


@dataclass
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    return DistInfo(int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def available_devices(device: str) -> int:
    """How many processes a node can give one device each: GPUs for CUDA, cores for CPU."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.device_count()
    return os.cpu_count() or 1


def setup_distributed(cfg: TrainConfig, info: DistInfo) -> torch.device:
    from workbench.device import resolve_device

    base = resolve_device(cfg.device)
    if not info.enabled:
        return base
    import torch.distributed as dist

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    if base.type == "cuda":
        if local_world > torch.cuda.device_count():
            raise ValueError(f"nproc_per_node={local_world} exceeds the {torch.cuda.device_count()} CUDA "
                             "device(s) of this node")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return device


# ----------------------------------------------------------------------------------------------
# Training


def build_training(cfg: TrainConfig, info: DistInfo, device: torch.device):
    """Model (converted and wrapped as the run needs), loaders, optimiser and scheduler."""
    from torch.utils.data import DataLoader

    from workbench.data import get_dataset, make_loader
    from workbench.data.samplers import DistributedEpochSampler
    from workbench.device import seed_everything
    from workbench.models import build_model
    from workbench.train import default_optimizer

    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} (global) must be divisible by the {info.world_size} ranks")
    seed_everything(cfg.seed)
    options = {"augment": cfg.augment} if cfg.dataset in ("digits", "cifar10", "cifar100") else {}
    train_set = get_dataset(cfg.dataset, "train", root=cfg.data_root, **options)
    test_split = "val" if cfg.dataset == "cityscapes" else "test"
    test_set = get_dataset(cfg.dataset, test_split, root=cfg.data_root)
    model = build_model(cfg.model, num_classes=train_set.num_classes, norm=cfg.norm, attention=cfg.attention,
                        width=cfg.width)
    model.to(device)  # before the sync conversion, which picks the synced layer by device
    if info.enabled and cfg.sync_bn:
        from workbench.nn import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    if cfg.channels_last:
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
    task = train_set.task
    return model, train_loader, test_loader, optimizer, scheduler, interval, task


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
    device = setup_distributed(cfg, info)
    try:
        model, train_loader, test_loader, optimizer, scheduler, interval, task = build_training(cfg, info, device)
        out = Path(cfg.output)
        # every rank resumes from the same checkpoint; only rank 0 writes
        result = fit(model, train_loader, test_loader if info.is_main else None, cfg.epochs, optimizer=optimizer,
                     scheduler=scheduler, scheduler_interval=interval, device=device, amp=cfg.amp,
                     checkpoint_dir=str(out), resume=cfg.resume, write_checkpoints=info.is_main, task=task,
                     max_steps=cfg.max_steps, progress=cfg.progress and info.is_main)
        summary = {"config": dataclasses.asdict(cfg), "world_size": info.world_size, "history": result.history,
                   "step_log": result.step_log}
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
    parser = argparse.ArgumentParser(prog="workbench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of config keys")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="launch N data-parallel processes with torchrun (gloo on CPU, NCCL on GPU)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif "list" in str(f.type):
            parser.add_argument(flag, dest=f.name, type=int, nargs="*", default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), None)
            kind = int if str(f.type).startswith("int") else kind
            parser.add_argument(flag, dest=f.name, type=kind or str, default=None)
    return parser


def _launch_torchrun(nproc: int, cfg: TrainConfig, argv: list[str]) -> int:
    available = available_devices(cfg.device)
    if nproc < 1 or nproc > available:
        kind = "CUDA devices" if cfg.device.startswith("cuda") or (
            cfg.device == "auto" and torch.cuda.is_available()) else "CPU cores"
        raise ValueError(f"--nproc-per-node={nproc} is not possible here: {available} {kind} available "
                         f"(allowed: 1..{available})")
    rest = []
    skip = False
    for arg in argv:  # the launcher's own flag must not reach the workers
        if skip:
            skip = False
            continue
        if arg == "--nproc-per-node":
            skip = True
            continue
        if arg.startswith("--nproc-per-node="):
            continue
        rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "workbench.train_cli", *rest]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in CONFIG_KEYS}
    try:
        cfg = load_config(args.config, overrides)
        if args.nproc_per_node is not None and "WORLD_SIZE" not in os.environ:
            return _launch_torchrun(args.nproc_per_node, cfg, argv)
        train(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
