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
import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path

import torch

from workbench.distributed import (
    add_multinode_arguments,
    available_devices,
    check_shared_output,
    dist_info_from_env,
    launch_from_args,
    run_torchrun,
    setup_distributed,
    teardown_distributed,
    worker_argv,
)
from workbench.recipe.sections import NESTED, NESTED_HELP, OFF
from workbench.recipe.spec import CONFIG_KEYS, TrainConfig, acceleration, check_setup, config_parameters, load_config

__all__ = ["TrainConfig", "build_parser", "load_config", "main", "train"]

DEBUG_ENV_VAR = "WORKBENCH_DEBUG"  # set by `workbench --debug`: errors show their traceback


def train(cfg: TrainConfig) -> dict:
    """Train the run ``cfg`` describes in this process (one rank of it under torchrun): checks, process
    group, the shared-output check, the build, :func:`workbench.train.fit`, then ``history.json``
    (rank 0). Returns the summary ``history.json`` holds."""
    from workbench.io import write_json_atomic
    from workbench.recipe.build import build_training
    from workbench.recipe.callbacks import probe_logs, remove_callbacks
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
            remove_callbacks(t.callbacks)  # hooks and patches go, also when training raised
        summary = {"config": dataclasses.asdict(cfg), "acceleration": accel.options(),
                   "world_size": info.world_size, "history": result.history,
                   "step_log": result.step_log, "probe_logs": probe_logs(t.callbacks)}
        if info.is_main:
            write_json_atomic(out / "history.json", summary)
            print(json.dumps({"final": result.final, "output": str(out)}), flush=True)
        return summary
    finally:
        teardown_distributed(info)


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
    """``workbench train ARGS``: 0 on success, 2 (with a one-line ``error: ...``) for a refused run spec."""
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
