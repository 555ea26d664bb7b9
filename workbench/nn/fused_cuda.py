"""Fused training-mode IEBN on CUDA: Triton kernels behind one ``torch.library`` operator.

Design (the CPU kernel's, ``csrc/iebn_cpu.cpp``, moved to the GPU). IEBN needs, per (sample,
channel) plane, the plane's mean (the GAP that drives the gate) and, per channel, the batch mean
and variance. Both come from the same per-plane reduction, so the forward is two sweeps over the
activation with a tiny per-channel kernel in between:

1. sweep 1 reads ``x`` once: mean and centred sum of squares of every plane (chunked planes are
   merged with Chan's update, so no ``E[x^2] - E[x]^2`` cancellation);
2. per channel: batch mean and biased variance (law of total variance over the planes), the gate
   ``a = sigmoid(attn_weight * GAP + attn_bias)``, folded with ``weight * rstd`` into one scale
   ``s[n, c]`` and shift ``t[n, c] = bias - mean * s``, and the unbiased variance that the running
   statistics average (updated afterwards as ``nn.BatchNorm2d`` does: one fused ``lerp`` of
   both buffers);
3. sweep 2 reads ``x`` and writes ``y = x * s + t``.

The backward has the same shape: sweep 1 reads ``dy`` and ``x`` for ``sum dy`` and
``sum dy * (x - mean)`` per plane; the per-channel kernel turns them into the four parameter
gradients and per-plane coefficients; sweep 2 writes ``dx = dy * s + (x - mean) * B[c] + A[n, c]``.

What is fused: the GAP, the batch statistics, the gate, the normalisation and the affine
transform, in three kernel launches forward and three backward (the unfused CUDA path, cuDNN's
batch norm plus the gate as separate ops, takes ~20). The operator is functional (autograd
formulas can only be registered on functional operators), so the layer updates the running
statistics itself.

Why about 1.0x ``nn.BatchNorm2d`` is the limit: the forward reads ``x`` twice and writes ``y``
once, the backward reads ``dy`` and ``x`` twice and writes ``dx`` once, which is exactly what BN's
own two-pass training kernels move; the gate's sums are a by-product of BN's reduction and its
per-plane arithmetic is ``O(N * C)``, so IEBN can match BN's memory traffic but not undercut it.
At small activations both are bound by launch and dispatch overhead instead, where the three
launches per direction set the floor; eager calls therefore run the kernels from one
``torch.autograd.Function`` (the operator's dispatch through ``torch.library`` costs about twice
as much Python per call), and only compiled graphs call the operator. There it is one opaque
node: inductor cannot fuse a following ReLU into it as it does for BN.

Inputs: float32, bfloat16 or float16 (accumulated in float32; ``y``/``dx`` in the input's dtype,
parameter gradients in the parameters' dtype), contiguous or channels_last (the kernels address
``(N, C, H*W)`` through strides; other layouts are made contiguous first). float64 inputs take the
PyTorch path. Under ``torch.compile`` the operator stays one opaque node (its fake implementation
gives inductor the shapes); ``torch.func`` transforms (vmap, grad) use the composite PyTorch ops.

``WORKBENCH_FUSED`` switches it: ``1`` (default) eager and compiled, ``eager`` only outside
``torch.compile`` (compiled graphs then use inductor's own fusion of the composite formula), ``0``
never (the PyTorch ops of :mod:`workbench.nn.iebn` run instead).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_ENV = "WORKBENCH_FUSED"
_MODES = {"1": "on", "true": "on", "yes": "on", "on": "on", "": "on", "eager": "eager",
          "0": "off", "false": "off", "no": "off", "off": "off"}
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.compiler.assume_constant_result
def fused_mode() -> str:
    """``"on"``, ``"eager"`` or ``"off"`` from ``WORKBENCH_FUSED`` (read when called; a constant
    inside a compiled graph)."""
    value = os.environ.get(_ENV, "1").strip().lower()
    if value not in _MODES:
        raise ValueError(f"{_ENV}={value!r} is not valid; allowed: 1/on, eager, 0/off")
    return _MODES[value]


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Whether Triton is installed (CUDA builds of torch ship it)."""
    return _triton_installed()


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _fusable(x: Tensor) -> bool:
    return x.device.type == "cuda" and x.dtype in FUSED_DTYPES


def use_fused_cuda(x: Tensor) -> bool:
    """Whether a training-mode IEBN forward on ``x`` takes the fused operator: a CUDA tensor of a
    supported dtype, Triton installed, the switch on, no ``torch.func`` transform active."""
    if not _fusable(x) or torch._C._are_functorch_transforms_active():
        return False
    mode = fused_mode()
    if mode == "off" or (mode == "eager" and torch.compiler.is_compiling()):
        return False
    return triton_available()


def _kernels() -> ModuleType:
    """The Triton kernels (imported on first use: importing Triton takes about a second)."""
    from workbench.nn import triton_iebn

    return triton_iebn


@torch.library.custom_op("workbench::iebn_fused_forward", mutates_args=())
def iebn_fused_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, attn_weight: Tensor,
                       attn_bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, channel_stats (4, C): mean, biased var, rstd, unbiased var, plane_stats (4, N, C): gap,
    gate, s, t)``, the statistics in float32."""
    return _kernels().forward(x, weight, bias, attn_weight, attn_bias, eps)


@iebn_fused_forward.register_fake
def _(x, weight, bias, attn_weight, attn_bias, eps):
    n, c = x.shape[:2]
    return (torch.empty_like(x), x.new_empty((4, c), dtype=torch.float32),
            x.new_empty((4, n, c), dtype=torch.float32))


@torch.library.custom_op("workbench::iebn_fused_backward", mutates_args=())
def iebn_fused_backward(grad_out: Tensor, x: Tensor, weight: Tensor | None, attn_weight: Tensor,
                        channel_stats: Tensor, plane_stats: Tensor, need_input: bool) -> tuple[Tensor, Tensor]:
    """``(dx, parameter gradients (4, C) in float32: weight, bias, attn_weight, attn_bias)``; ``dx``
    is empty unless ``need_input``."""
    dx, grads = _kernels().backward(grad_out, x, weight, attn_weight, channel_stats, plane_stats, need_input)
    return (x.new_empty(0) if dx is None else dx), grads


@iebn_fused_backward.register_fake
def _(grad_out, x, weight, attn_weight, channel_stats, plane_stats, need_input):
    dx = torch.empty_like(x) if need_input else x.new_empty(0)
    return dx, x.new_empty((4, x.shape[1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, attn_weight = inputs[:4]
    _, channel_stats, plane_stats = output
    # weight, bias, attn_weight, attn_bias: whether present, and the dtype their gradients take.
    ctx.param_dtypes = tuple(None if p is None else p.dtype for p in inputs[1:5])
    ctx.save_for_backward(x, weight, attn_weight, channel_stats, plane_stats)
    ctx.mark_non_differentiable(channel_stats, plane_stats)


def _backward(ctx, grad_y, _grad_channel, _grad_plane):
    x, weight, attn_weight, channel_stats, plane_stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, grads = iebn_fused_backward(_like_layout(grad_y, x), x, weight, attn_weight, channel_stats, plane_stats,
                                    need[0])
    return _input_grads(ctx, dx, grads)


def _input_grads(ctx, dx: Tensor | None, grads: Tensor) -> tuple[Tensor | None, ...]:
    """The gradients autograd expects, one per forward input (``None`` where none is needed)."""
    need = ctx.needs_input_grad
    out = [dx if need[0] else None]
    for i, dtype in enumerate(ctx.param_dtypes):
        out.append(None if dtype is None or not need[i + 1] else _cast(grads[i], dtype))
    return (*out, None)


iebn_fused_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerFusedIEBN(torch.autograd.Function):
    """The operator's forward and backward as one autograd node without the dispatcher: outside
    ``torch.compile`` the same kernels run with less per-call overhead (launch-bound shapes pay it
    on every layer). Compiled graphs call :func:`iebn_fused_forward`."""

    @staticmethod
    def forward(ctx, x, weight, bias, attn_weight, attn_bias, eps):
        output = _kernels().forward(x, weight, bias, attn_weight, attn_bias, eps)
        _setup_context(ctx, (x, weight, bias, attn_weight, attn_bias, eps), output)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_channel, _grad_plane):
        x, weight, attn_weight, channel_stats, plane_stats = ctx.saved_tensors
        dx, grads = _kernels().backward(_like_layout(grad_y, x), x, weight, attn_weight, channel_stats, plane_stats,
                                        ctx.needs_input_grad[0])
        return _input_grads(ctx, dx, grads)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _like_layout(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` contiguous or channels_last (matching ``ref`` when it must be copied)."""
    if _dense(t):
        return t
    channels_last = ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous()
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def iebn_train_cuda(x: Tensor, weight: Tensor | None, bias: Tensor | None, attn_weight: Tensor,
                    attn_bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode IEBN through the fused operator: ``(y, batch_mean, unbiased_batch_var)``, the
    statistics detached float32 ``(C,)``, ready for the running averages."""
    if not _dense(x):
        x = x.contiguous()
    fused = iebn_fused_forward if torch.compiler.is_compiling() else _EagerFusedIEBN.apply
    y, channel_stats, _ = fused(x, weight, bias, attn_weight, attn_bias, float(eps))
    return y, channel_stats[0], channel_stats[3]
