"""SyncIEBN2d: IEBN whose batch statistics are pooled over a process group (DDP / torchrun)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from workbench.nn.functional import (
    PlaneMoments,
    accumulate_dtype,
    layer_sharing_state,
    running_average_factor,
    update_running_stats,
)
from workbench.nn.iebn import IEBN2d


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient of every rank's input is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def pool_moments_over_group(mean: Tensor, var: Tensor, count: int | Tensor,
                            process_group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Exact mean and biased variance ``(C,)`` of the union of every rank's values, differentiably.

    Each rank contributes its local count, mean and biased variance (parallel-variance formula, no
    E[x^2] - E[x]^2 cancellation); gradients flow back to every rank through the all-reduce.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    # Each rank writes (count, count * mean, count * var) into its own row; a differentiable
    # all-reduce sums the rows, so every rank sees all and gradients return to their source.
    local = torch.stack([torch.full_like(mean, float(count)), mean * count, var * count])
    rows = torch.cat([local.new_zeros((rank, *local.shape)), local.unsqueeze(0),
                      local.new_zeros((world - rank - 1, *local.shape))])
    rows = _AllReduceSum.apply(rows, group)
    counts, sums, var_sums = rows[:, 0], rows[:, 1], rows[:, 2]
    total = counts.sum(0)
    pooled_mean = sums.sum(0) / total
    rank_means = sums / counts
    pooled_var = (var_sums + counts * (rank_means - pooled_mean).square()).sum(0) / total
    return pooled_mean, pooled_var, total


class _GroupSynced:
    """The constructor both synced layers share: a BN layer's arguments plus the ``process_group``
    whose ranks pool the statistics (``None``: the default group)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group


class SyncBatchNorm2d(_GroupSynced, nn.BatchNorm2d):
    """``BatchNorm2d`` with statistics pooled over a process group, on CPU (gloo) as well as GPU.

    ``nn.SyncBatchNorm`` refuses CPU modules, so DDP on CPU (and the tests of DDP) would have no
    synchronised BN; this layer uses the same exact pooling as :class:`SyncIEBN2d`. Outside
    training, or without an initialised process group, it is exactly ``nn.BatchNorm2d``.
    """


    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, process_group: dist.ProcessGroup | None = None) -> SyncBatchNorm2d:
        """A SyncBatchNorm2d sharing ``bn``'s parameters and buffers."""
        return layer_sharing_state(cls, bn, process_group=process_group)

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        self._check_input_dim(input)
        x = input.to(accumulate_dtype(input))
        count = x.shape[0] * x.shape[2] * x.shape[3]
        mean = x.mean((0, 2, 3))
        var = (x - mean.view(1, -1, 1, 1)).square().mean((0, 2, 3))
        mean, var, total = pool_moments_over_group(mean, var, count, self.process_group)
        if self.track_running_stats and self.running_mean is not None:
            update_running_stats(self, mean, var, total, running_average_factor(self))
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return (x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(input.dtype)


class SyncIEBN2d(_GroupSynced, IEBN2d):
    """:class:`IEBN2d` with batch mean and variance pooled across ``process_group`` in training.

    Each rank contributes its local count, mean and biased variance; the pooled statistics are the
    exact moments of the union (parallel-variance formula, no E[x^2] - E[x]^2 cancellation) and
    gradients flow back to every rank through a differentiable all-reduce, as in
    ``nn.SyncBatchNorm``. The gate stays per sample and needs no communication. Outside training,
    or when ``torch.distributed`` is not initialised, it behaves exactly like IEBN2d. Synchronises
    whenever a process group is initialised, also with a single process (so the path is testable).
    """


    @classmethod
    def from_iebn(cls, module: IEBN2d, process_group: dist.ProcessGroup | None = None) -> SyncIEBN2d:
        """A SyncIEBN2d sharing ``module``'s parameters, buffers and hook attributes."""
        if not isinstance(module, IEBN2d):
            raise ValueError(f"module={type(module).__name__} is not valid; allowed: an IEBN2d")
        new = layer_sharing_state(cls, module, process_group=process_group)
        new.attn_weight, new.attn_bias = module.attn_weight, module.attn_bias
        new.attention_probe = module.attention_probe
        new.stat_transform = module.stat_transform
        new.stat_transform_updates_running_stats = module.stat_transform_updates_running_stats
        return new

    def _batch_statistics(self, moments: PlaneMoments, plane_size: int) -> tuple[Tensor, Tensor, int | Tensor]:
        count = moments.mean.shape[0] * plane_size
        mean, var = moments.batch_mean, moments.batch_var
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return mean, var, count
        return pool_moments_over_group(mean, var, count, self.process_group)
