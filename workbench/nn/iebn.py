"""IEBN: Instance Enhancement Batch Normalization (Liang et al., AAAI-20), as a BatchNorm2d subclass."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from workbench.nn.functional import (
    PlaneMoments,
    accumulate_dtype,
    gated_batch_norm,
    iebn_train_fused,
    layer_sharing_state,
    plane_moments,
    running_average_factor,
    update_running_stats,
    use_composite,
)
from workbench.nn.fused_cuda import iebn_train_cuda, use_fused_cuda
from workbench.nn.probe import AttentionProbe

StatTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class IEBN2d(nn.BatchNorm2d):
    r"""Batch normalisation whose affine scale is recalibrated per instance and channel.

    .. math::
        \hat x = (x - \mu_B) / \sqrt{\sigma_B^2 + \epsilon},\quad
        a_{n,c} = \sigma(\hat w_c\,\mathrm{GAP}(x)_{n,c} + \hat b_c),\quad
        y = \hat x \cdot (\gamma_c a_{n,c}) + \beta_c

    ``GAP`` is taken per sample over H, W of the *un-normalised* input, in eval mode too (the gate
    stays input dependent while ``x_hat`` uses the running statistics). Parameters: ``weight``
    (gamma) and ``bias`` (beta) of shape ``(C,)`` exactly as in ``nn.BatchNorm2d``, plus
    ``attn_weight`` (init 0) and ``attn_bias`` (init -1), also ``(C,)``; the initial gate is
    sigmoid(-1) ~= 0.269. Running statistics are updated exactly like ``nn.BatchNorm2d``'s
    (momentum or cumulative average with ``momentum=None``, unbiased variance,
    ``num_batches_tracked``).

    The layer is one reduction pass and one scale-and-shift pass over the activation, in forward
    and in backward (see ``workbench.nn.functional``), and has no graph breaks under
    ``torch.compile(fullgraph=True)``. In training mode on CUDA (float32, bfloat16 or float16) both
    run as Triton kernels behind one ``torch.library`` operator (:mod:`workbench.nn.fused_cuda`;
    ``WORKBENCH_FUSED=0`` turns them off), unless a hook point below needs the gate or the
    statistics as tensors.

    Hook points (plain attributes, not in ``state_dict``):

    - ``stat_transform``: ``None`` or a callable ``(mean, var) -> (mean, var)`` on the biased batch
      statistics ``(C,)``; its result normalises the batch. Called only in training mode, on every
      forward, after the (synchronised, for :class:`~workbench.nn.sync.SyncIEBN2d`) batch
      statistics are computed and before the gate and the scale-and-shift. The statistics carry
      autograd history: gradients flow through whatever the transform does. The running
      statistics absorb the clean statistics unless ``stat_transform_updates_running_stats`` is
      ``True``. Used by batch-statistic noise injection; exactly removable by resetting to ``None``.
    - ``attention_probe``: an :class:`~workbench.nn.probe.AttentionProbe` the ``(N, C)`` gate ``a``
      passes through; a forward hook on it records the gate (or replaces it, if it returns a tensor).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.attn_weight = nn.Parameter(torch.empty(num_features, **factory))
        self.attn_bias = nn.Parameter(torch.empty(num_features, **factory))
        self.reset_attention_parameters()
        self.attention_probe = AttentionProbe("iebn")
        self.stat_transform: StatTransform | None = None
        self.stat_transform_updates_running_stats = False

    def reset_attention_parameters(self) -> None:
        nn.init.zeros_(self.attn_weight)
        nn.init.constant_(self.attn_bias, -1.0)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> IEBN2d:
        """An IEBN2d carrying ``bn``'s configuration, affine parameters and running statistics.

        Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, the new layer *shares* ``bn``'s
        parameter and buffer tensors (an optimiser built before the conversion keeps updating
        them); the attention parameters are new, on ``bn``'s device and dtype, at their init. The
        output equals ``bn``'s with gamma scaled by the gate.
        """
        if not isinstance(bn, nn.BatchNorm2d):
            raise ValueError(f"bn={type(bn).__name__} is not valid; allowed: an nn.BatchNorm2d")
        return layer_sharing_state(cls, bn)

    def _batch_statistics(self, moments: PlaneMoments, plane_size: int) -> tuple[Tensor, Tensor, int | Tensor]:
        """Biased batch mean/variance ``(C,)`` that normalise, and the number of values behind
        them. The synced subclass overrides this to pool over the process group."""
        return moments.batch_mean, moments.batch_var, moments.mean.shape[0] * plane_size

    def _observed(self) -> bool:
        """Whether anything outside the layer must see the gate or the statistics as tensors."""
        probe = self.attention_probe
        return bool(self.stat_transform is not None or probe._forward_hooks or probe._forward_pre_hooks
                    or probe._backward_hooks or probe._backward_pre_hooks or _global_hooks_active()
                    or type(self)._batch_statistics is not IEBN2d._batch_statistics)

    def _forward_device_batch_norm(self, x: Tensor, update_running: bool) -> Tensor:
        """Unhooked training step on an accelerator: ``x_hat`` from the device's own batch-norm
        kernel (cuDNN), which also updates the running statistics, then the gate as a per-plane
        scale. Eager GPU work at CIFAR sizes is bound by kernel launches, not memory traffic: this
        is ~20 launches for forward and backward against ~80 for the fused ATen-op formula
        (measured 3-4.6x BatchNorm2d on an H100), so fewer, larger kernels win here even though
        they re-read the activation."""
        factor = 0.0
        if update_running:
            factor = running_average_factor(self)
            factor = float(factor) if isinstance(factor, Tensor) else factor
        x_hat = F.batch_norm(x, self.running_mean if update_running else None,
                             self.running_var if update_running else None, None, None, True, factor, self.eps)
        gap = x.mean((2, 3), dtype=accumulate_dtype(x))
        gate = torch.sigmoid(torch.addcmul(self.attn_bias, self.attn_weight, gap))
        scale = gate if self.weight is None else gate * self.weight
        scale = scale.to(x.dtype)[..., None, None]
        if self.bias is None:
            return x_hat * scale
        return torch.addcmul(self.bias.to(x.dtype)[:, None, None], x_hat, scale)

    def _forward_fused_cuda(self, x: Tensor, update_running: bool) -> Tensor:
        """Unhooked training step through the fused CUDA operator, then ``nn.BatchNorm2d``'s
        running-statistics update (one fused lerp of both buffers)."""
        y, mean, unbiased_var = iebn_train_cuda(x, self.weight, self.bias, self.attn_weight, self.attn_bias,
                                                self.eps)
        if update_running:
            factor = running_average_factor(self)
            stats = [mean, unbiased_var]
            if self.running_mean.dtype != torch.float32:
                stats = [t.to(self.running_mean.dtype) for t in stats]
            if isinstance(factor, Tensor):  # momentum=None: cumulative average, a tensor factor
                with torch.no_grad():
                    self.running_mean.lerp_(stats[0], factor)
                    self.running_var.lerp_(stats[1], factor)
            else:
                torch._foreach_lerp_([self.running_mean, self.running_var], stats, factor)
        return y

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        x = input
        plane_size = x.shape[2] * x.shape[3]
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        update_running = self.training and self.track_running_stats and self.running_mean is not None
        if use_batch_stats and x.shape[0] * plane_size <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{tuple(x.shape)}")
        if use_batch_stats and not self._observed():
            if use_fused_cuda(x):
                return self._forward_fused_cuda(x, update_running)
            if _use_device_batch_norm(x):
                return self._forward_device_batch_norm(x, update_running)
            # Nobody hooks the gate or the statistics: moments, gate and normalisation in one node.
            y, mean, var = iebn_train_fused(x, self.weight, self.bias, self.attn_weight, self.attn_bias, self.eps)
            if update_running:
                count = x.shape[0] * plane_size
                update_running_stats(self, mean, var, count, running_average_factor(self))
            return y
        moments = None
        if use_batch_stats:
            # The per-sample GAP and the batch statistics come from the same per-plane moments.
            moments = plane_moments(x)
            gap = moments.mean
            mean, var, count = self._batch_statistics(moments, plane_size)
            clean_mean, clean_var = mean, var
            if self.training and self.stat_transform is not None:
                mean, var = self.stat_transform(mean, var)
            if update_running:
                factor = running_average_factor(self)
                if self.stat_transform_updates_running_stats:
                    update_running_stats(self, mean, var, count, factor)
                else:
                    update_running_stats(self, clean_mean, clean_var, count, factor)
        else:
            gap = x.mean((2, 3), dtype=accumulate_dtype(x))
            mean, var = self.running_mean, self.running_var
        gate = self.attention_probe(torch.sigmoid(torch.addcmul(self.attn_bias, self.attn_weight, gap)))
        return gated_batch_norm(x, mean, var, self.weight, self.bias, self.eps, gate, moments)


def _use_device_batch_norm(x: Tensor) -> bool:
    """Accelerators take :meth:`IEBN2d._forward_device_batch_norm`; CPUs the fused kernel (one pass
    fewer over the activation, which is what a CPU pays for); ``torch.compile`` and ``torch.func``
    the composite formula."""
    return x.device.type != "cpu" and not use_composite()


def _global_hooks_active() -> bool:
    from torch.nn.modules import module as _module

    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)
