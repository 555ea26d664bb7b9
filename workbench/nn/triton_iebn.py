"""Triton kernels of fused training-mode IEBN, and the host code that launches them.

Imported only when a CUDA tensor takes the fused path (importing Triton costs about a second), by
:mod:`workbench.nn.fused_cuda`, which registers them as one ``torch.library`` operator.

Layout: the activation is addressed as ``(N, C, HW)`` with arbitrary strides, so one kernel serves
contiguous NCHW (``HW`` stride 1) and channels_last (``C`` stride 1). Triton specialises the
stride equal to 1 at compile time, so either layout gets coalesced loads. Each program owns a tile
``BLOCK_C x BLOCK_HW`` of one sample and walks a chunk of the spatial extent; a plane with too few
samples and channels to fill the GPU is split into ``split`` chunks whose partial moments the
per-channel kernel merges (Chan's parallel variance update). Everything is accumulated in float32.

Forward (three launches): ``_plane_moments`` (sweep 1: mean and centred sum of squares per
(sample, channel, chunk)), ``_forward_stats`` (per channel: batch mean and biased variance by the
law of total variance, the unbiased variance for the running statistics, the per-sample GAP, gate,
scale ``s`` and shift ``t``), ``_plane_affine`` (sweep 2: ``y = x * s + t``). Backward (three
launches): ``_grad_sums`` (sweep 1: ``sum dy`` and ``sum dy * (x - mean)`` per plane chunk),
``_backward_stats`` (per channel: the parameter gradients and the per-plane coefficients),
``_grad_input`` (sweep 2: ``dx = dy * s + (x - mean) * B[c] + A[n, c]``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

# Elements per program tile of the sweeps, and per program of the per-channel kernels.
_TILE = 2048
_STATS_TILE = 2048
# Integer sizes a kernel receives: never specialised (a size of 1 would become a compile-time
# constant and change the arithmetic's types), unlike the strides, whose 1 is the layout.
_SIZES = ["N", "C", "HW", "chunk", "num_cb", "split"]


@triton.jit
def _merge(mean, m2, count, part_mean, part_m2, part_count):
    """Chan et al.'s pairwise update of (mean, centred sum of squares) with a disjoint part."""
    total = count + part_count
    delta = part_mean - mean
    mean = mean + delta * (part_count / total)
    m2 = m2 + part_m2 + delta * delta * (count * part_count / total)
    return mean, m2, total


@triton.jit
def _plane_tile(part, N, C, HW, chunk, num_cb, BLOCK_C: tl.constexpr):
    """The tile of every plane kernel: program (pid, part) covers sample ``n``, the channel block
    ``c`` (``c_mask`` inside C) and the chunk ``[lo, hi)`` of the plane."""
    pid = tl.program_id(0)
    n = pid // num_cb
    c = (pid % num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    lo = part * chunk
    return n, c, c < C, lo, tl.minimum(lo + chunk, HW)


@triton.jit(do_not_specialize=_SIZES)
def _plane_moments(x_ptr, part_ptr, N, C, HW, chunk, num_cb, stride_n, stride_c, stride_hw,
                   BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # part_ptr: (2, split, N, C) float32, the chunks' means then their centred sums of squares.
    part = tl.program_id(1)
    n, c, c_mask, lo, hi = _plane_tile(part, N, C, HW, chunk, num_cb, BLOCK_C)
    base = x_ptr + n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < hi)[None, :]
        v = tl.load(base + hw[None, :].to(tl.int64) * stride_hw, mask=mask, other=0.0).to(tl.float32)
        k = tl.minimum(hi - start, BLOCK_HW).to(tl.float32)
        tile_mean = tl.sum(v, axis=1) / k
        centred = tl.where(mask, v - tile_mean[:, None], 0.0)
        seen = (start - lo).to(tl.float32)
        mean, m2, _ = _merge(mean, m2, seen, tile_mean, tl.sum(centred * centred, axis=1), k)
    offs = (part * N + n) * C + c
    tl.store(part_ptr + offs, mean, mask=c_mask)
    tl.store(part_ptr + tl.num_programs(1) * N * C + offs, m2, mask=c_mask)


@triton.jit
def _plane_stats(pmean_ptr, pm2_ptr, offs, mask, NC, HW, chunk, split):
    """Mean and centred sum of squares of whole planes ``(BLOCK_N, BLOCK_C)`` from their chunks."""
    mean = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
    m2 = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
    count = tl.minimum(chunk, HW).to(tl.float32)
    for part in range(1, split):
        k = tl.minimum(chunk, HW - part * chunk).to(tl.float32)
        part_mean = tl.load(pmean_ptr + part * NC + offs, mask=mask, other=0.0)
        part_m2 = tl.load(pm2_ptr + part * NC + offs, mask=mask, other=0.0)
        mean, m2, count = _merge(mean, m2, count, part_mean, part_m2, k)
    return mean, m2


@triton.jit(do_not_specialize=_SIZES)
def _forward_stats(part_ptr, weight_ptr, bias_ptr, aw_ptr, ab_ptr, channel_ptr, plane_ptr, N, C, HW, chunk, split,
                   eps, inv_count, unbias,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # channel_ptr: (4, C) mean, biased var, rstd, unbiased var; plane_ptr: (4, N, C) gap, gate, s, t.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    NC = N * C
    pmean_ptr = part_ptr
    pm2_ptr = part_ptr + split * NC
    # Pass 1: the batch mean (planes have equal sizes: the mean of the plane means).
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = (n < N)[:, None] & c_mask[None, :]
        plane_mean, _ = _plane_stats(pmean_ptr, pm2_ptr, n[:, None] * C + c[None, :], mask, NC, HW, chunk, split)
        total += tl.sum(plane_mean, axis=0)
    mean = total / N
    # Pass 2: biased variance by the law of total variance (no E[x^2] - E[x]^2 cancellation).
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = (n < N)[:, None] & c_mask[None, :]
        plane_mean, plane_m2 = _plane_stats(pmean_ptr, pm2_ptr, n[:, None] * C + c[None, :], mask, NC, HW,
                                            chunk, split)
        d = tl.where(mask, plane_mean - mean[None, :], 0.0)
        m2 += tl.sum(plane_m2 + d * d * HW, axis=0)
    var = m2 * inv_count
    rstd = 1.0 / tl.sqrt(var + eps)
    gamma_rstd = rstd
    if HAS_WEIGHT:
        gamma_rstd = rstd * tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
    beta = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        beta = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    attn_w = tl.load(aw_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    attn_b = tl.load(ab_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    # Pass 3: the gate on each plane's mean (the GAP), folded into one scale and shift per plane.
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = (n < N)[:, None] & c_mask[None, :]
        offs = n[:, None] * C + c[None, :]
        gap, _ = _plane_stats(pmean_ptr, pm2_ptr, offs, mask, NC, HW, chunk, split)
        gate = tl.sigmoid(attn_w[None, :] * gap + attn_b[None, :])
        scale = gamma_rstd[None, :] * gate
        tl.store(plane_ptr + offs, gap, mask=mask)
        tl.store(plane_ptr + NC + offs, gate, mask=mask)
        tl.store(plane_ptr + 2 * NC + offs, scale, mask=mask)
        tl.store(plane_ptr + 3 * NC + offs, beta[None, :] - mean[None, :] * scale, mask=mask)
    tl.store(channel_ptr + c, mean, mask=c_mask)
    tl.store(channel_ptr + C + c, var, mask=c_mask)
    tl.store(channel_ptr + 2 * C + c, rstd, mask=c_mask)
    # What nn.BatchNorm2d's running variance averages.
    tl.store(channel_ptr + 3 * C + c, var * unbias, mask=c_mask)


@triton.jit(do_not_specialize=_SIZES)
def _plane_affine(x_ptr, y_ptr, plane_ptr, N, C, HW, chunk, num_cb, stride_n, stride_c, stride_hw,
                  BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n, c, c_mask, lo, hi = _plane_tile(tl.program_id(1), N, C, HW, chunk, num_cb, BLOCK_C)
    scale = tl.load(plane_ptr + (2 * N + n) * C + c, mask=c_mask, other=0.0)[:, None]
    shift = tl.load(plane_ptr + (3 * N + n) * C + c, mask=c_mask, other=0.0)[:, None]
    row = n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c
    for start in range(lo, hi, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < hi)[None, :]
        offs = row + hw[None, :].to(tl.int64) * stride_hw
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (v * scale + shift).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_SIZES)
def _grad_sums(dy_ptr, x_ptr, mean_ptr, part_ptr, N, C, HW, chunk, num_cb,
               stride_n, stride_c, stride_hw, gstride_n, gstride_c, gstride_hw,
               BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    part = tl.program_id(1)
    n, c, c_mask, lo, hi = _plane_tile(part, N, C, HW, chunk, num_cb, BLOCK_C)
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)[:, None]
    x_row = n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c
    g_row = n.to(tl.int64) * gstride_n + c[:, None].to(tl.int64) * gstride_c
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)[None, :].to(tl.int64)
        mask = c_mask[:, None] & (hw < hi)
        g = tl.load(dy_ptr + g_row + hw * gstride_hw, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + x_row + hw * stride_hw, mask=mask, other=0.0).to(tl.float32)
        sum_g += tl.sum(g, axis=1)
        # Centred on the batch mean: no cancellation against sum(dy) * mean.
        sum_gx += tl.sum(g * (v - mean), axis=1)
    offs = (part * N + n) * C + c
    tl.store(part_ptr + offs, sum_g, mask=c_mask)
    tl.store(part_ptr + tl.num_programs(1) * N * C + offs, sum_gx, mask=c_mask)


@triton.jit
def _summed_parts(ptr, offs, mask, NC, split):
    total = tl.load(ptr + offs, mask=mask, other=0.0)
    for part in range(1, split):
        total += tl.load(ptr + part * NC + offs, mask=mask, other=0.0)
    return total


@triton.jit(do_not_specialize=_SIZES)
def _backward_stats(part_ptr, channel_ptr, plane_ptr, weight_ptr, aw_ptr, grads_ptr, coef_ptr, N, C, split,
                    inv_hw, inv_count, HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # grads_ptr: (4, C) d weight, d bias, d attn_weight, d attn_bias; coef_ptr: B (C,) then A (N, C).
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    NC = N * C
    psum_ptr = part_ptr
    psumx_ptr = part_ptr + split * NC
    gap_ptr = plane_ptr
    gate_ptr = plane_ptr + NC
    scale_ptr = plane_ptr + 2 * NC
    rstd = tl.load(channel_ptr + 2 * C + c, mask=c_mask, other=0.0)
    gamma_rstd = rstd
    if HAS_WEIGHT:
        gamma_rstd = rstd * tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
    attn_w = tl.load(aw_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    g_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    g_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    g_gamma_rstd = tl.zeros([BLOCK_C], dtype=tl.float32)
    g_aw = tl.zeros([BLOCK_C], dtype=tl.float32)
    g_ab = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = (n < N)[:, None] & c_mask[None, :]
        offs = n[:, None] * C + c[None, :]
        sum_g = _summed_parts(psum_ptr, offs, mask, NC, split)
        sum_gx = _summed_parts(psumx_ptr, offs, mask, NC, split)
        gate = tl.load(gate_ptr + offs, mask=mask, other=0.0)
        # y = (x - mean) * s + beta with s = gamma * rstd * gate: the chain rule per plane.
        g_b += tl.sum(sum_g, axis=0)
        g_mean -= tl.sum(sum_g * tl.load(scale_ptr + offs, mask=mask, other=0.0), axis=0)
        g_gamma_rstd += tl.sum(sum_gx * gate, axis=0)
        g_z = sum_gx * gamma_rstd[None, :] * gate * (1.0 - gate)
        g_aw += tl.sum(g_z * tl.load(gap_ptr + offs, mask=mask, other=0.0), axis=0)
        g_ab += tl.sum(g_z, axis=0)
    g_var = g_gamma_rstd * gamma_rstd * rstd * rstd * -0.5  # d rstd / d var = -rstd^3 / 2
    tl.store(grads_ptr + c, g_gamma_rstd * rstd, mask=c_mask)
    tl.store(grads_ptr + C + c, g_b, mask=c_mask)
    tl.store(grads_ptr + 2 * C + c, g_aw, mask=c_mask)
    tl.store(grads_ptr + 3 * C + c, g_ab, mask=c_mask)
    # d var / dx = 2 (x - mean) / count; d mean / dx = 1 / count; d gap / dx = 1 / HW.
    tl.store(coef_ptr + c, 2.0 * g_var * inv_count, mask=c_mask)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = (n < N)[:, None] & c_mask[None, :]
        offs = n[:, None] * C + c[None, :]
        sum_gx = _summed_parts(psumx_ptr, offs, mask, NC, split)
        gate = tl.load(gate_ptr + offs, mask=mask, other=0.0)
        g_gap = sum_gx * gamma_rstd[None, :] * gate * (1.0 - gate) * attn_w[None, :]
        tl.store(coef_ptr + C + offs, g_gap * inv_hw + g_mean[None, :] * inv_count, mask=mask)


@triton.jit(do_not_specialize=_SIZES)
def _grad_input(dy_ptr, x_ptr, dx_ptr, mean_ptr, plane_ptr, coef_ptr, N, C, HW, chunk, num_cb,
                stride_n, stride_c, stride_hw, gstride_n, gstride_c, gstride_hw,
                BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n, c, c_mask, lo, hi = _plane_tile(tl.program_id(1), N, C, HW, chunk, num_cb, BLOCK_C)
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)[:, None]
    coef_x = tl.load(coef_ptr + c, mask=c_mask, other=0.0)[:, None]
    scale = tl.load(plane_ptr + (2 * N + n) * C + c, mask=c_mask, other=0.0)[:, None]
    coef_c = tl.load(coef_ptr + C + n * C + c, mask=c_mask, other=0.0)[:, None]
    x_row = n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c
    g_row = n.to(tl.int64) * gstride_n + c[:, None].to(tl.int64) * gstride_c
    for start in range(lo, hi, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)[None, :].to(tl.int64)
        mask = c_mask[:, None] & (hw < hi)
        g = tl.load(dy_ptr + g_row + hw * gstride_hw, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + x_row + hw * stride_hw, mask=mask, other=0.0).to(tl.float32)
        dx = g * scale + (v - mean) * coef_x + coef_c
        tl.store(dx_ptr + x_row + hw * stride_hw, dx.to(dx_ptr.dtype.element_ty), mask=mask)


class SweepPlan(NamedTuple):
    """How a sweep covers an ``(N, C, HW)`` activation: tile, chunks per plane, launch grid."""

    block_c: int
    block_hw: int
    chunk: int
    split: int
    num_cb: int
    num_warps: int

    def grid(self, n: int) -> tuple[int, int]:
        return (n * self.num_cb, self.split)


@functools.lru_cache(maxsize=256)
def sweep_plan(n: int, c: int, hw: int, channels_last: bool, programs: int) -> SweepPlan:
    """Tile shape (the contiguous dimension long) and the number of chunks each plane is split
    into so that about ``programs`` programs run: big enough tiles to stream memory, enough
    programs to occupy every multiprocessor even at batch 1."""
    if channels_last:
        block_c = min(triton.next_power_of_2(c), 64)
        block_hw = min(triton.next_power_of_2(hw), max(1, _TILE // block_c))
    else:
        block_hw = min(triton.next_power_of_2(hw), 1024)
        block_c = min(triton.next_power_of_2(c), max(1, _TILE // block_hw))
        while block_c > 1 and n * math.ceil(c / block_c) < programs:
            block_c //= 2
    num_cb = math.ceil(c / block_c)
    split = max(1, min(math.ceil(programs / (n * num_cb)), math.ceil(hw / block_hw)))
    chunk = math.ceil(math.ceil(hw / split) / block_hw) * block_hw
    split = math.ceil(hw / chunk)
    num_warps = max(1, min(8, block_c * block_hw // 512))
    return SweepPlan(block_c, block_hw, chunk, split, num_cb, num_warps)


def _stats_blocks(n: int, c: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(c), 64)
    return min(triton.next_power_of_2(n), max(1, _STATS_TILE // block_c)), block_c


def _strides(t: Tensor) -> tuple[int, int, int]:
    """``(N, C, HW)`` strides of an NCHW-shaped tensor whose H and W collapse into one dimension
    (contiguous or channels_last)."""
    return t.stride(0), t.stride(1), t.stride(3)


def _channels_last(x: Tensor) -> bool:
    return x.stride(1) == 1 and x.shape[1] > 1


def target_programs(device: torch.device) -> int:
    """About four programs per multiprocessor; a few on a CPU (Triton's interpreter)."""
    if device.type != "cuda":
        return 4
    return _cuda_programs(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _cuda_programs(index: int) -> int:
    return 4 * torch.cuda.get_device_properties(index).multi_processor_count


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, attn_weight: Tensor, attn_bias: Tensor,
            eps: float, programs: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``y``, the float32 channel statistics ``(4, C)``: batch mean, biased variance, ``rstd``,
    unbiased variance, and the float32 plane statistics ``(4, N, C)``: GAP, gate, scale ``s``,
    shift ``t``. (Kernels get whole buffers and find the rows themselves: fewer arguments and no
    Python-side views keep the per-call host cost low.)"""
    n, c, h, w = x.shape
    hw = h * w
    f32 = {"dtype": torch.float32, "device": x.device}
    plan = sweep_plan(n, c, hw, _channels_last(x), programs or target_programs(x.device))
    partial = torch.empty((2, plan.split, n, c), **f32)
    channel_stats = torch.empty((4, c), **f32)
    plane_stats = torch.empty((4, n, c), **f32)
    strides = _strides(x)
    grid = plan.grid(n)
    _plane_moments[grid](x, partial, n, c, hw, plan.chunk, plan.num_cb, *strides, BLOCK_C=plan.block_c,
                         BLOCK_HW=plan.block_hw, num_warps=plan.num_warps)
    block_n, block_c = _stats_blocks(n, c)
    count = n * hw
    _forward_stats[(triton.cdiv(c, block_c),)](
        partial, weight if weight is not None else attn_weight, bias if bias is not None else attn_bias,
        attn_weight, attn_bias, channel_stats, plane_stats, n, c, hw, plan.chunk, plan.split, eps, 1.0 / count,
        count / max(count - 1, 1), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_C=block_c)
    y = torch.empty_like(x)
    _plane_affine[grid](x, y, plane_stats, n, c, hw, plan.chunk, plan.num_cb, *strides, BLOCK_C=plan.block_c,
                        BLOCK_HW=plan.block_hw, num_warps=plan.num_warps)
    return y, channel_stats, plane_stats


def backward(grad_out: Tensor, x: Tensor, weight: Tensor | None, attn_weight: Tensor, channel_stats: Tensor,
             plane_stats: Tensor, need_input: bool, programs: int | None = None) -> tuple[Tensor | None, Tensor]:
    """``dx`` (``None`` unless ``need_input``) and the float32 parameter gradients ``(4, C)``:
    weight, bias, attn_weight, attn_bias. ``grad_out`` is contiguous or channels_last, like ``x``."""
    n, c, h, w = x.shape
    hw = h * w
    f32 = {"dtype": torch.float32, "device": x.device}
    plan = sweep_plan(n, c, hw, _channels_last(x), programs or target_programs(x.device))
    strides = (*_strides(x), *_strides(grad_out))
    grid = plan.grid(n)
    partial = torch.empty((2, plan.split, n, c), **f32)
    _grad_sums[grid](grad_out, x, channel_stats, partial, n, c, hw, plan.chunk, plan.num_cb, *strides,
                     BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw, num_warps=plan.num_warps)
    grads = torch.empty((4, c), **f32)
    coefficients = torch.empty(((n + 1) * c,), **f32)
    block_n, block_c = _stats_blocks(n, c)
    _backward_stats[(triton.cdiv(c, block_c),)](
        partial, channel_stats, plane_stats, weight if weight is not None else attn_weight, attn_weight, grads,
        coefficients, n, c, plan.split, 1.0 / hw, 1.0 / (n * hw), HAS_WEIGHT=weight is not None, BLOCK_N=block_n,
        BLOCK_C=block_c)
    dx = None
    if need_input:
        dx = torch.empty_like(x)
        _grad_input[grid](grad_out, x, dx, channel_stats, plane_stats, coefficients, n, c, hw, plan.chunk,
                          plan.num_cb, *strides, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw,
                          num_warps=plan.num_warps)
    return dx, grads
