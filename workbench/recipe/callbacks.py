"""The nested sections of a run spec as training callbacks: noise, sparsity and probes.

:func:`build_callbacks` turns a :class:`~workbench.recipe.spec.TrainConfig`'s ``noise``,
``sparsity`` and ``probes`` sections into the callbacks :func:`workbench.train.fit` runs, in one
process or under DDP. Under DDP the loop trains the wrapper, while the sparsity regulariser and the
probes want the bare module (or a twin whose BNs normalise locally): :class:`OnModule` runs a
callback as if another module were being trained, and :class:`SyncedCAGS` averages CAP's guiding
vectors over the ranks so that every replica adds the same penalty. :func:`remove_callbacks` takes
every hook and patch away again; :func:`probe_logs` names the JSON log each probe wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.callbacks import Callback
from workbench.distributed import DistInfo
from workbench.recipe.sections import as_list
from workbench.recipe.spec import TrainConfig
from workbench.train import unwrap


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
    bare = unwrap(model)
    logs = Path(cfg.output) if info.is_main else None  # rank 0 alone writes probe logs
    callbacks: list[Callback] = []
    if cfg.noise is not None:
        callbacks.append(_noise(cfg.noise, bare))
    gns = cfg.probes.get("gradient_noise_scale")
    if gns is not None:
        callbacks.append(_gradient_noise_scale(gns, info, model, logs))
    if cfg.sparsity is not None:
        callbacks.append(_sparsity(cfg.sparsity, cfg.model, info, bare))
    if info.is_main:
        callbacks += _rank_zero_probes(cfg, info, bare, local_twin if info.enabled else bare, probe_set, logs)
    return callbacks


def _log_path(logs: Path | None, name: str) -> Path | None:
    return logs / f"{name}.json" if logs is not None else None


def _noise(n: dict, bare: nn.Module) -> Callback:
    from workbench.noise import batch_stat_noise

    return batch_stat_noise(bare, n["level"], kind=n["kind"], layers=n["layers"], seed=n["seed"],
                            schedule=n["schedule"], running_stats=n["running_stats"], ramp_steps=n["ramp_steps"])


def _gradient_noise_scale(gns: dict, info: DistInfo, model: nn.Module, logs: Path | None) -> Callback:
    """Under DDP, McCandlish's estimator from each rank's gradient against the all-reduced one (every
    rank runs it); in one process, the micro-batch or two-batch estimator."""
    from workbench.probes import DDPGradientNoiseScale, GradientNoiseScale

    path = _log_path(logs, "gradient_noise_scale")
    if info.enabled:
        return DDPGradientNoiseScale(gns["every"], gns["ema"], path).attach(model)
    method = "micro" if gns["method"] == "auto" else gns["method"]
    return GradientNoiseScale(gns["every"], gns["micro_batches"], method, gns["ema"], path, compiled=gns["compiled"])


def _sparsity(sp: dict, model_name: str, info: DistInfo, bare: nn.Module) -> Callback:
    from workbench.pruning.sparsity import BNScaleSparsity, CAGSSparsity, default_lambda

    lam = sp["strength"] if sp["strength"] is not None else default_lambda(model_name)
    if sp["method"] == "l1":
        sparsity = BNScaleSparsity(lam, warmup_steps=sp["warmup_steps"], layers=as_list(sp["layers"]), mode=sp["mode"])
        return OnModule(sparsity, bare) if info.enabled else sparsity
    cags = CAGSSparsity(lam, warmup_steps=sp["warmup_steps"], sites=as_list(sp["sites"]), other_bns=sp["other_bns"],
                        mode=sp["mode"])
    return SyncedCAGS(cags, bare) if info.enabled else cags


def _rank_zero_probes(cfg: TrainConfig, info: DistInfo, bare: nn.Module, local: nn.Module, probe_set: Any,
                      logs: Path | None) -> list[Callback]:
    """The probes rank 0 alone runs, on rank 0's share of the batch; ``local`` is the module whose BNs
    normalise locally (the bare module in one process, its unsynchronised twin under DDP)."""
    from workbench.probes import AttentionMonitor, BNEstimationNoise, CouplingGap, GradientSNR

    probes, callbacks = cfg.probes, []

    def on(callback: Callback, module: nn.Module) -> Callback:
        return OnModule(callback, module) if info.enabled else callback

    if "attention" in probes:
        opts = probes["attention"]
        callbacks.append(AttentionMonitor(bare, opts["every"], _log_path(logs, "attention"), kinds=opts["kinds"],
                                          layers=opts["layers"]))
    if "gsnr" in probes:
        opts = probes["gsnr"]
        callbacks.append(on(GradientSNR(opts["every"], opts["micro_batches"], _log_path(logs, "gsnr"),
                                        compiled=opts["compiled"]), local))
    if "coupling_gap" in probes:
        opts = probes["coupling_gap"]
        callbacks.append(on(CouplingGap(opts["every"], opts["micro_sizes"], opts["per_layer"],
                                        _log_path(logs, "coupling_gap"), compiled=opts["compiled"]), local))
    if "bn_estimation_noise" in probes:
        opts = probes["bn_estimation_noise"]
        # a fixed probe set: the first samples of the evaluation split; eval mode, so the bare module's
        # synchronised BNs run locally and the noise hooks are idle
        callbacks.append(on(BNEstimationNoise(probe_set, opts["every"], opts["batch_sizes"], opts["n_batches"],
                                              opts["layers"], opts["max_samples"], seed=cfg.seed,
                                              path=_log_path(logs, "bn_estimation_noise")), bare))
    return callbacks


def remove_callbacks(callbacks: list[Callback]) -> None:
    """Take every callback's hooks and patches away (also those of a wrapped callback and of the
    attention monitor's recorder); safe to call when training raised."""
    for cb in callbacks:
        for target in (cb, getattr(cb, "callback", None)):
            target = getattr(target, "recorder", target)  # the attention monitor's hooks
            remove = getattr(target, "remove", None)
            if callable(remove):
                remove()


def probe_logs(callbacks: list[Callback]) -> dict[str, str]:
    """``{probe name: JSON log path}`` of the callbacks that write a log (on rank 0)."""
    return {cb.name: str(cb.path) for cb in callbacks if getattr(cb, "path", None) is not None}
