"""Functional core of the BN-like layers: per-(sample, channel) moments with the pooled batch
moments, the gated normalisation folded into one per-(sample, channel) scale-and-shift, running
statistic updates, and the plain IEBN formula used as the reference.

Why custom autograd functions: IEBN needs the per-sample GAP ``(N, C)`` *and* the batch mean and
variance ``(C,)``. Both come from the same per-plane sums, so one reduction pass over the
activation serves both; the gate and the normalisation then fold into one scale ``s`` and shift
``t`` per plane and the output is a single pass ``y = x * s + t``. The gradient w.r.t. ``x`` has the
form ``dy * s + B * x + A`` with per-plane ``A, B``, so backward is one reduction pass (``sum dy``,
``sum dy * x`` per plane) and one elementwise pass, the same memory traffic as
``nn.BatchNorm2d``'s backward. Autograd through the composite ops re-reads the activation several
times (1.4-1.9x BN on CPU).

Two eager paths share the same kernels and hand-derived chain rule:

- :func:`iebn_train_fused`: moments, gate and normalisation in one autograd node (the default in
  training, lowest per-call overhead). For contiguous float32/float64 CPU input its forward and
  backward are each one call into a C++ kernel (:mod:`workbench.nn.native`, same math) when that
  kernel builds; the ATen-op version below is the fallback and the reference it is tested against;
- :func:`plane_moments` then :func:`gated_batch_norm`: the moments, the statistics and the gate
  stay ordinary tensors in between, so a statistics transform, a cross-process all-reduce or a
  hook on the gate act on them with autograd flowing through. The two nodes cooperate so that the
  gradient w.r.t. ``x`` is still written once (a :class:`_Handoff` carries ``dy`` and ``s`` from the
  normalisation backward to the moments backward).

Under ``torch.compile`` and ``torch.func`` transforms the composite formula is used instead
(inductor fuses it itself; ``vmap``/``grad`` need transformable ops). Every path is tested against
:func:`iebn_reference` and with ``gradcheck``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from workbench.nn.native import iebn_cpu_available

# Above this ratio of squared batch mean to batch variance the one-pass E[x^2] - E[x]^2 keeps too
# few float32 digits (relative error ~ eps * (1 + ratio)); the variance is then recomputed with a
# centred second pass.
_CANCELLATION_RATIO = 100.0
_MARGIN_FACTOR = (1.0 + _CANCELLATION_RATIO) / _CANCELLATION_RATIO
# Bound on the autograd-graph walk that checks the statistics really depend on the moments.
_MAX_GRAPH_WALK = 512


def accumulate_dtype(x: Tensor) -> torch.dtype:
    """The dtype reductions over ``x`` use: its own for float32/float64, float32 below that."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def use_composite() -> bool:
    """Whether to use plain differentiable ops (under ``torch.compile`` or ``torch.func``)."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


@functools.lru_cache(maxsize=32)
def _unit_stats(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    with torch.inference_mode(False), torch.no_grad():
        return torch.zeros(n, dtype=dtype, device=device), torch.ones(n, dtype=dtype, device=device)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    # A Python-side check: a no-op .to() still costs a dispatch, and these layers run many tiny ops.
    return t if t.dtype == dtype else t.to(dtype)


def _flat_view(x: Tensor) -> Tensor | None:
    """``x`` (N, C, H, W) seen as (1, N*C, H, W): every (sample, channel) plane becomes one BN
    "channel", so ATen's native batch-norm kernels act per plane. ``None`` when not contiguous or
    not on the CPU: CUDA's eval-mode BN backward insists on training-mode saved statistics, and
    on GPUs the plain broadcasting ops are fast anyway."""
    if x.device.type != "cpu" or not x.is_contiguous():
        return None
    return x.view(1, x.shape[0] * x.shape[1], x.shape[2], x.shape[3])


def _plane_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale[n, c] + shift[n, c]`` for (N, C) ``scale``/``shift``: one pass over ``x``."""
    scale, shift = _cast(scale, x.dtype), _cast(shift, x.dtype)
    flat = _flat_view(x)
    if flat is None:
        return torch.addcmul(shift[..., None, None], x, scale[..., None, None])
    zeros, ones = _unit_stats(flat.shape[1], x.dtype, x.device)
    # The eval-mode BN kernel with mean 0, var 1, eps 0 computes exactly x * weight + bias, and is
    # about twice as fast as a broadcasting addcmul on CPU.
    out = torch.ops.aten._native_batch_norm_legit_no_training(
        flat, scale.reshape(-1), shift.reshape(-1), zeros, ones, 0.0, 0.0)[0]
    # Not a view in autograd's eyes: outputs of the custom functions must accept in-place ops
    # (torchvision's ReLU(inplace=True) follows every BN).
    return torch.ops.aten._unsafe_view(out, x.shape)


def _plane_sums(x: Tensor, grad_out: Tensor, scale: Tensor, want_dx: bool,
                want_sums: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``grad_out * s`` (if ``want_dx``) and per-plane ``sum(grad_out * x)``, ``sum(grad_out)``."""
    flat, flat_grad = _flat_view(x), _flat_view(grad_out)
    if flat is not None and flat_grad is not None:
        zeros, ones = _unit_stats(flat.shape[1], x.dtype, x.device)
        # Eval-mode BN backward with mean 0, var 1, eps 0: grad_input = g * s, grad_weight =
        # sum(g * x), grad_bias = sum(g), per plane, in one kernel.
        gx, sum_gx, sum_g = torch.ops.aten.native_batch_norm_backward(
            flat_grad, flat, _cast(scale, x.dtype).reshape(-1), zeros, ones, None, None, False, 0.0,
            [want_dx, want_sums, want_sums])
        gx = torch.ops.aten._unsafe_view(gx, x.shape) if want_dx else None
        if want_sums:
            sum_gx = _cast(sum_gx.view(scale.shape), scale.dtype)
            sum_g = _cast(sum_g.view(scale.shape), scale.dtype)
        return gx, sum_gx, sum_g
    gx = grad_out * _cast(scale, x.dtype)[..., None, None] if want_dx else None
    if not want_sums:
        return gx, None, None
    return gx, (grad_out * x).sum((2, 3), dtype=scale.dtype), grad_out.sum((2, 3), dtype=scale.dtype)


def _moments_forward(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-plane mean ``(N, C)``, batch mean and biased batch variance ``(C,)`` (no autograd)."""
    n, hw = x.shape[0], x.shape[2] * x.shape[3]
    acc = accumulate_dtype(x)
    if x.device.type == "cpu":
        # Two vectorised single-pass reductions; var_mean's Welford over the inner dims is several
        # times slower on CPU.
        mean = x.sum((2, 3), dtype=acc).div_(hw)
        batch_mean = mean.mean(0)
        batch_sq = torch.linalg.vector_norm(x, 2, dim=(2, 3), dtype=acc).square_().mean(0).div_(hw)
        batch_var = torch.addcmul(batch_sq, batch_mean, batch_mean, value=-1.0)
        # mean^2 > R * var  <=>  sq - (1 + R) / R * mean^2 < 0; also catches a negative rounded var.
        margin = torch.addcmul(batch_sq, batch_mean, batch_mean, value=-_MARGIN_FACTOR)
        if margin.min().item() < 0.0:
            centred = x.to(acc) - batch_mean[:, None, None]
            batch_var = torch.linalg.vector_norm(centred, 2, dim=(0, 2, 3)).square_().div_(n * hw)
        return mean, batch_mean, batch_var
    var, mean = torch.var_mean(x.to(acc), dim=(2, 3), correction=0)
    batch_mean = mean.mean(0)
    # Law of total variance: exact pooling of equal-size planes, no cancellation.
    batch_var = var.mean(0) + (mean - batch_mean).square_().mean(0)
    return mean, batch_mean, batch_var


def _moments_backward(x: Tensor, batch_mean: Tensor, g_mean: Tensor | None, g_bmean: Tensor | None,
                      g_bvar: Tensor | None, grad_out: Tensor | None, scale: Tensor | None,
                      bmean_sign: float = 1.0) -> Tensor:
    """Gradient w.r.t. ``x`` of the moments, plus ``grad_out * scale`` when given (one write).
    ``bmean_sign`` lets callers pass ``-g_bmean`` without negating it first."""
    n, hw = x.shape[0], x.shape[2] * x.shape[3]
    # Each moment is affine or quadratic in x, so dx = B * x + A, with B = 2 g_bvar / (N HW) per
    # channel and A = g_mean / HW + (g_bmean - 2 g_bvar batch_mean) / (N HW) per plane.
    coef = None if g_bvar is None else g_bvar * (2.0 / (n * hw))
    if g_bmean is None:
        const = torch.zeros_like(batch_mean) if coef is None else coef * batch_mean.neg()
    elif coef is None:
        const = g_bmean * (bmean_sign / (n * hw))
    else:
        const = torch.addcmul(g_bmean * (bmean_sign / (n * hw)), coef, batch_mean, value=-1.0)
    const = const.expand(n, -1) if g_mean is None else torch.add(const, g_mean, alpha=1.0 / hw)
    if grad_out is not None:
        grad = _plane_affine(grad_out, scale, const)
        if coef is not None:
            grad.addcmul_(x, _cast(coef, x.dtype).view(-1, 1, 1))
        return grad
    if coef is None:
        coef = torch.zeros_like(batch_mean)
    return _plane_affine(x, coef.expand(n, -1), const)


def _norm_forward(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                  gate: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``y = x * s + t`` with ``s = weight * rsqrt(var + eps) * gate`` and ``t = bias - mean * s``;
    also returns ``rstd``, ``weight * rstd`` and ``s`` for the backward."""
    rstd = (var + eps).rsqrt_()
    gamma_rstd = rstd if weight is None else rstd * weight
    scale = gamma_rstd.expand(x.shape[0], -1) if gate is None else gamma_rstd * gate
    shift = (scale * mean).neg_() if bias is None else torch.addcmul(bias, scale, mean, value=-1.0)
    return _plane_affine(x, scale, shift), rstd, gamma_rstd, scale


def _norm_backward(sum_gx: Tensor, sum_g: Tensor, mean: Tensor, rstd: Tensor, gamma_rstd: Tensor,
                   weight: Tensor | None, gate: Tensor | None, scale: Tensor,
                   need: tuple[bool, bool, bool, bool, bool]):
    """Chain rule of :func:`_norm_forward` on the ``(N, C)``/``(C,)`` tensors, from the per-plane
    sums of ``dy * x`` and ``dy``. ``need``: (mean, var, weight, bias, gate). The mean's gradient
    comes back negated (``-g_mean``): its consumers fold the sign into a scale factor."""
    need_mean, need_var, need_w, need_b, need_gate = need
    neg_g_mean = g_var = g_w = g_b = g_gate = None
    g_scale = torch.addcmul(sum_gx, sum_g, mean, value=-1.0)
    if need_b:
        g_b = sum_g.sum(0)
    if need_mean:
        neg_g_mean = torch.linalg.vecdot(sum_g, scale, dim=0)
    if need_gate:
        g_gate = g_scale * gamma_rstd
    if need_w or need_var:
        g_gamma_rstd = g_scale.sum(0) if gate is None else torch.linalg.vecdot(g_scale, gate, dim=0)
        if need_w:
            g_w = g_gamma_rstd * rstd
        if need_var:
            # d rstd / d var = -rstd^3 / 2
            g_var = g_gamma_rstd * (gamma_rstd * rstd * rstd).mul_(-0.5)
    return neg_g_mean, g_var, g_w, g_b, g_gate


def _native_ready(x: Tensor, *params: Tensor | None) -> bool:
    """Whether the C++ CPU kernel takes this call: contiguous float32/float64 CPU input, parameters
    of the same dtype (or absent)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or not x.is_contiguous():
        return False
    if any(p is not None and (p.dtype != x.dtype or p.device.type != "cpu") for p in params):
        return False
    return iebn_cpu_available()


class _FusedIEBN(torch.autograd.Function):
    """Training-mode IEBN in one node: moments, gate, normalisation; returns ``y`` and the
    (non-differentiable) batch mean and biased variance for the running statistics."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, attn_weight: Tensor,
                attn_bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        ctx.native = _native_ready(x, weight, bias, attn_weight, attn_bias)
        if ctx.native:
            ones, zeros = _unit_stats(x.shape[1], x.dtype, x.device)[::-1]
            w = ones if weight is None else weight.contiguous()
            b = zeros if bias is None else bias.contiguous()
            y, gap, mean, var, rstd, gate, scale = torch.ops.workbench_iebn.forward(
                x, w, b, attn_weight.contiguous(), attn_bias.contiguous(), eps)
            ctx.save_for_backward(x, gap, mean, rstd, w, gate, scale, attn_weight)
            ctx.mark_non_differentiable(mean, var)
            return y, mean, var
        gap, mean, var = _moments_forward(x)
        gate = torch.sigmoid(torch.addcmul(attn_bias, attn_weight, gap))
        y, rstd, gamma_rstd, scale = _norm_forward(x, mean, var, weight, bias, gate, eps)
        ctx.save_for_backward(x, gap, mean, rstd, gamma_rstd, weight, gate, scale, attn_weight)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor | None, _g_mean, _g_var):
        if grad_out is None:
            return None, None, None, None, None, None
        need_x, need_w, need_b, need_aw, need_ab = ctx.needs_input_grad[:5]
        grad_out = grad_out.contiguous()
        if ctx.native:
            x, gap, mean, rstd, weight, gate, scale, attn_weight = ctx.saved_tensors
            gx, g_w, g_b, g_aw, g_ab = torch.ops.workbench_iebn.backward(
                grad_out, x, gap, mean, rstd, weight, gate, scale, attn_weight.contiguous(), need_x)
            return (gx if need_x else None, g_w if need_w else None, g_b if need_b else None,
                    g_aw if need_aw else None, g_ab if need_ab else None, None)
        x, gap, mean, rstd, gamma_rstd, weight, gate, scale, attn_weight = ctx.saved_tensors
        _, sum_gx, sum_g = _plane_sums(x, grad_out, scale, False, True)
        neg_g_mean, g_var, g_w, g_b, g_gate = _norm_backward(
            sum_gx, sum_g, mean, rstd, gamma_rstd, weight, gate, scale, (need_x, need_x, need_w, need_b, True))
        g_z = torch.ops.aten.sigmoid_backward(g_gate, gate)
        g_aw = torch.linalg.vecdot(g_z, gap, dim=0) if need_aw else None
        g_ab = g_z.sum(0) if need_ab else None
        gx = None
        if need_x:
            gx = _moments_backward(x, mean, g_z * attn_weight, neg_g_mean, g_var, grad_out, scale, bmean_sign=-1.0)
        return gx, g_w, g_b, g_aw, g_ab, None


def iebn_train_fused(x: Tensor, weight: Tensor | None, bias: Tensor | None, attn_weight: Tensor,
                     attn_bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode IEBN with batch statistics: ``(y, batch_mean, batch_var)``, the statistics
    detached (for the running averages)."""
    if use_composite():
        gap, mean, var = _composite_moments(x)
        gate = torch.sigmoid(torch.addcmul(attn_bias, attn_weight, gap))
        y = gated_batch_norm(x, mean, var, weight, bias, eps, gate)
        return y, mean.detach(), var.detach()
    return _FusedIEBN.apply(x, weight, bias, attn_weight, attn_bias, eps)


class _Handoff:
    """Carries ``dy`` and ``s`` from the normalisation backward to the moments backward."""

    __slots__ = ("armed", "grad_out", "scale")

    def __init__(self) -> None:
        self.armed = False
        self.grad_out: Tensor | None = None
        self.scale: Tensor | None = None


class _PlaneMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, handoff: _Handoff) -> tuple[Tensor, Tensor, Tensor]:
        mean, batch_mean, batch_var = _moments_forward(x)
        ctx.save_for_backward(x, batch_mean)
        ctx.handoff = handoff
        return mean, batch_mean, batch_var

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mean: Tensor | None, g_bmean: Tensor | None, g_bvar: Tensor | None):
        x, batch_mean = ctx.saved_tensors
        handoff: _Handoff = ctx.handoff
        grad = _moments_backward(x, batch_mean, g_mean, g_bmean, g_bvar, handoff.grad_out, handoff.scale)
        handoff.grad_out = handoff.scale = None
        return grad, None


class _GatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                gate: Tensor | None, eps: float, handoff: _Handoff | None) -> Tensor:
        y, rstd, gamma_rstd, scale = _norm_forward(x, mean, var, weight, bias, gate, eps)
        ctx.save_for_backward(x, mean, rstd, gamma_rstd, weight, gate, scale)
        ctx.handoff = handoff
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, mean, rstd, gamma_rstd, weight, gate, scale = ctx.saved_tensors
        need_x, need_mean, need_var, need_w, need_b, need_gate = ctx.needs_input_grad[:6]
        handoff: _Handoff | None = ctx.handoff
        defer_x = need_x and handoff is not None and handoff.armed
        need = (need_mean, need_var, need_w, need_b, need_gate)
        grad_out = grad_out.contiguous()
        gx, sum_gx, sum_g = _plane_sums(x, grad_out, scale, need_x and not defer_x, any(need))
        g_mean = g_var = g_w = g_b = g_gate = None
        if any(need):
            g_mean, g_var, g_w, g_b, g_gate = _norm_backward(
                sum_gx, sum_g, mean, rstd, gamma_rstd, weight, gate, scale, need)
            if g_mean is not None:
                g_mean = g_mean.neg_()
        if defer_x:
            # The moments backward adds dy * s to its own gradient for x: one write instead of three.
            handoff.grad_out, handoff.scale = grad_out, scale
        return gx, g_mean, g_var, g_w, g_b, g_gate, None, None


def _composite_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable plain-op moments for ``torch.compile``/``torch.func``: inductor fuses the sum
    and the sum of squares into one pass (cheaper than a Welford ``var_mean``). The data are shifted
    by one sample value per channel (detached; the moments do not depend on it, so gradients are
    exact), which keeps E[(x-k)^2] - E[x-k]^2 well conditioned without a data-dependent branch."""
    n, hw = x.shape[0], x.shape[2] * x.shape[3]
    xs = x.to(accumulate_dtype(x))
    shift = xs[0, :, 0, 0].detach()[:, None, None]
    centred = xs - shift
    plane_sum = centred.sum((2, 3))
    mean = plane_sum / hw + shift[:, 0, 0]
    shifted_mean = plane_sum.sum(0) / (n * hw)
    batch_var = (centred.square().sum((0, 2, 3)) / (n * hw) - shifted_mean.square()).clamp_min(0.0)
    return mean, shifted_mean + shift[:, 0, 0], batch_var


class PlaneMoments(NamedTuple):
    """Moments of a (N, C, H, W) tensor: ``mean`` per plane ``(N, C)`` (the per-sample GAP) and
    ``batch_mean``/``batch_var`` over N, H, W ``(C,)``, the variance biased."""

    mean: Tensor
    batch_mean: Tensor
    batch_var: Tensor
    handoff: _Handoff | None


def plane_moments(x: Tensor) -> PlaneMoments:
    """Per-plane mean (the per-sample GAP) and batch mean/biased variance of ``x``, in one pass
    over it (differentiable). Low-precision inputs are reduced in float32; moments are float32."""
    if x.dim() != 4:
        raise ValueError(f"x.dim()={x.dim()} is not valid; allowed: 4 (N, C, H, W)")
    if use_composite():
        return PlaneMoments(*_composite_moments(x), None)
    handoff = _Handoff()
    return PlaneMoments(*_PlaneMoments.apply(x, handoff), handoff)


def _depends_on(roots: list[Tensor | None], target) -> bool:
    """Whether the autograd graph of ``roots`` reaches node ``target`` (bounded walk)."""
    stack = [t.grad_fn for t in roots if t is not None and t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        fn = stack.pop()
        if fn is target:
            return True
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        if len(seen) > _MAX_GRAPH_WALK:
            return False
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return False


def gated_batch_norm(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                     eps: float, gate: Tensor | None = None, moments: PlaneMoments | None = None) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * (weight * gate) + bias``, computed as one scale-and-shift
    pass per (sample, channel) plane. ``mean``/``var``/``weight``/``bias``: ``(C,)``; ``gate``:
    ``(N, C)`` or None (plain BN). Pass the :class:`PlaneMoments` of the same ``x`` that ``mean``/
    ``var``/``gate`` come from to have the backward write the gradient w.r.t. ``x`` only once.
    """
    if use_composite():
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight
        scale = scale.expand(x.shape[0], -1) if gate is None else scale * gate
        shift = -mean * scale if bias is None else bias - mean * scale
        return x * scale[..., None, None].to(x.dtype) + shift[..., None, None].to(x.dtype)
    handoff = None
    if moments is not None and moments.handoff is not None and x.requires_grad and torch.is_grad_enabled():
        handoff = moments.handoff
        # Deferring dx is only correct when the moments backward is sure to run after this one.
        handoff.armed = _depends_on([mean, var, gate], moments.mean.grad_fn)
    return _GatedNorm.apply(x, mean, var, weight, bias, gate, eps, handoff)


def running_average_factor(module: torch.nn.modules.batchnorm._BatchNorm) -> float | Tensor:
    """The factor ``nn.BatchNorm`` uses this step; increments ``num_batches_tracked`` like it.

    Call once per training-mode forward, only when ``module.track_running_stats``.
    """
    factor = 0.0 if module.momentum is None else module.momentum
    if module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            # A tensor, not float(): reading the counter back would break torch.compile graphs.
            dtype = module.running_mean.dtype if module.running_mean is not None else torch.float32
            factor = 1.0 / module.num_batches_tracked.to(dtype)
    return factor


def update_running_stats(module: torch.nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor,
                         count: int | Tensor, factor: float | Tensor) -> None:
    """``nn.BatchNorm``'s update: exponential (or cumulative) average of the batch mean and of the
    *unbiased* batch variance over ``count`` values per channel."""
    if isinstance(factor, Tensor):
        factor = factor.to(module.running_mean.dtype)
    with torch.no_grad():
        module.running_mean.lerp_(mean.detach().to(module.running_mean.dtype), factor)
        unbiased = var.detach().to(module.running_var.dtype) * (count / (count - 1))
        module.running_var.lerp_(unbiased, factor)


def iebn_reference(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                   attn_weight: Tensor, attn_bias: Tensor, eps: float) -> Tensor:
    """The IEBN formula transcribed literally (docs/methods.md, *IEBN*), for tests and for reading.

    ``mean``/``var`` are the statistics that normalise: biased batch statistics in training mode,
    running statistics in eval mode.
    """
    shape = (1, -1, 1, 1)
    x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    gate = torch.sigmoid(attn_weight.view(shape) * x.mean((2, 3), keepdim=True) + attn_bias.view(shape))
    w = torch.ones_like(attn_weight) if weight is None else weight
    b = torch.zeros_like(attn_weight) if bias is None else bias
    return x_hat * (w.view(shape) * gate) + b.view(shape)


def layer_sharing_state(cls, bn, **kwargs):
    """A new ``cls`` normalisation layer with ``bn``'s configuration that *shares* its affine
    parameters and running statistics (the same tensors, as ``nn.SyncBatchNorm.convert_sync_batchnorm``
    does, so an optimiser built before a conversion keeps updating them), on ``bn``'s device and dtype
    and in its training mode. ``kwargs`` go to ``cls`` (e.g. ``process_group``); parameters ``cls``
    adds of its own are new, at their init."""
    ref = bn.weight if bn.weight is not None else bn.running_mean
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **kwargs, **factory)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var = bn.running_mean, bn.running_var
    new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new
