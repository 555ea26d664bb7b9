"""Squeeze-and-excitation (Hu et al., 2018): the classic per-block channel attention baseline."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from workbench.nn.probe import AttentionProbe


class SEModule(nn.Module):
    """``x * sigmoid(fc2(relu(fc1(GAP(x)))))`` with ``fc1: C -> max(1, C // reduction)``.

    Laid out like timm's ``SEModule`` (1x1 convolutions with bias, ReLU, sigmoid gate) with the
    classic hidden width ``C // reduction`` (no rounding to a multiple of 8). The ReLU is not
    in-place so attribution methods can hook it. The ``(N, C)`` excitation passes through
    ``self.attention_probe`` (an :class:`~workbench.nn.probe.AttentionProbe`) before it scales ``x``.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels={channels!r} is not valid; allowed: a positive int")
        if not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"reduction={reduction!r} is not valid; allowed: a positive int")
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=False)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)
        self.attention_probe = AttentionProbe("se")

    def excitation(self, x: Tensor) -> Tensor:
        """The ``(N, C)`` channel attention for ``x`` (before the probe)."""
        squeeze = x.mean((2, 3), keepdim=True)
        return torch.sigmoid(self.fc2(self.act(self.fc1(squeeze)))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        attention = self.attention_probe(self.excitation(x))
        return x * attention[:, :, None, None]
