"""Inference cost of a model: parameters, FLOPs and latency.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (a dispatch mode, so functional
ops are seen as well as modules). Its built-in formulas count convolutions and matrix products
(2 FLOPs per multiply-accumulate). :data:`ELEMENTWISE_OPS` adds the element-wise work attention
layers do at inference, counted as follows (the convention is ours, the paper gives none):

- ``add``/``sub``/``mul``/``div``/``sigmoid``/``tanh``/``softmax``: 1 FLOP per output element
  (IEBN's and SE/DIA's gates and rescaling, residual additions, CFF sums);
- ``mean``/``sum``: 1 FLOP per input element (global average pooling inside IEBN/SE/DIA);
- batch normalisation in eval mode: 2 FLOPs per element (a per-channel scale and shift).

ReLU, pooling, interpolation and max-unpooling are not counted. ``total`` is the sum of both parts.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _numel(shape: Any) -> int:
    # ops with several outputs (batch norm) give a tuple of shapes: the first is the activation
    while isinstance(shape, (tuple, list)) and shape and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = shape[0]
    return int(math.prod(shape)) if shape is not None else 0


def _per_output(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _numel(out_shape)


def _per_input(x_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _numel(x_shape)


def _norm(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * _numel(out_shape)


def _ops(names: Sequence[str]) -> list:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


ELEMENTWISE_OPS: dict[Any, Any] = {
    **{op: _per_output for op in _ops(["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "sigmoid",
                                        "sigmoid_", "tanh", "tanh_", "_softmax", "addcmul", "addcmul_"])},
    **{op: _per_input for op in _ops(["mean", "sum"])},
    **{op: _norm for op in _ops(["native_batch_norm", "_native_batch_norm_legit_no_training",
                                 "_native_batch_norm_legit", "cudnn_batch_norm", "miopen_batch_norm"])},
}


def _as_args(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def preferred_round_to(device: str | torch.device) -> int:
    """The channel multiple a device's convolutions run best on, for ``prune(round_to=...)``.

    oneDNN (CPU) blocks channels by the SIMD width in floats: 16 with AVX-512, 8 with AVX2, and pads
    a partial block with zeros it still computes. On the 2-core AVX-512 development machine (segnet,
    width 0.5, 128x128, batch 8, 1 thread) rounding to 16 instead of 8 raised the speedup-per-FLOPs
    efficiency at prune ratio 0.5 from 0.76 to 0.98 and at 0.7 from 0.62 to 0.80, the 0.7 latency
    being equal (5.6x) with 30% more FLOPs kept. CUDA tensor cores take multiples of 8.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8
    return 8


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, inputs: Any) -> dict[str, int]:
    """FLOPs of one eval-mode forward: ``{"total", "conv_matmul", "elementwise"}``."""
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=ELEMENTWISE_OPS) as counter:
            model(*_as_args(inputs))
    finally:
        for m, mode in was_training.items():
            m.training = mode
    by_op = counter.get_flop_counts().get("Global", {})
    total = int(sum(by_op.values()))
    elementwise = int(sum(v for op, v in by_op.items() if op in ELEMENTWISE_OPS))
    conv = total - elementwise
    return {"total": total, "conv_matmul": conv, "elementwise": elementwise}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_latency(model: nn.Module, inputs: Any, runs: int = 10, warmup: int = 3) -> float:
    """Median wall time of one eval-mode forward, in milliseconds, on the device ``inputs`` live on.

    Runs under ``torch.inference_mode()``: no autograd graph, no saved activations, as at deployment.
    The training flags of every submodule are restored afterwards.
    """
    return measure_latencies([model], inputs, runs=runs, warmup=warmup)[0]


@torch.inference_mode()
def measure_latencies(models: Sequence[nn.Module], inputs: Any, runs: int = 10, warmup: int = 3) -> list[float]:
    """:func:`measure_latency` of several models on the same inputs, interleaved: each round runs every
    model once, so load from other processes (a shared machine) hits all of them alike and ratios
    between them stay meaningful. Medians in milliseconds, in the order of ``models``."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs={runs!r} must be an integer >= 1")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r} must be an integer >= 0")
    models = list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise ValueError(f"models must be a non-empty sequence of nn.Module, got {models!r:.80}")
    args = _as_args(inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise ValueError(f"inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}")
    device = args[0].device
    was_training = {m: m.training for model in models for m in model.modules()}
    for model in models:
        model.eval()
    try:
        for _ in range(warmup):
            for model in models:
                model(*args)
        _sync(device)
        times: list[list[float]] = [[] for _ in models]
        for _ in range(runs):
            for model, t in zip(models, times):
                start = time.perf_counter()
                model(*args)
                _sync(device)
                t.append((time.perf_counter() - start) * 1e3)
    finally:
        for m, mode in was_training.items():
            m.training = mode
    return [statistics.median(t) for t in times]
