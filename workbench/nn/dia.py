"""DIA-LSTM (Huang et al., DIANet, AAAI-20): the modified LSTM cell one stage shares across its blocks.

Math exactly as the official code (docs/methods.md, *DIA-LSTM / DIANet*), for the GAP ``z`` of a block's residual branch
and the state ``(h, c)`` the previous block of the stage left behind (zeros at the stage start)::

    [i~, f~, g~, o~] = phi_ih(z) + phi_hh(h)          phi(u) = W2 relu(W1 u + b1) + b2, C -> C/r -> 4C
    i, f, o = sigmoid(i~, f~, o~);  g = tanh(g~)
    c' = f * c + i * g;  h' = o * sigmoid(c')           h' in (0, 1) is the block's channel attention

Recording the gates: a forward hook on the cell sees ``args = (z, (h, c))`` and ``output = (h', c')``
for every block, in block order; :func:`dia_lstm_gates` (the same code the forward runs) recomputes
``i, f, g, o`` from those inputs exactly. The attention a block applies also passes through that
block's :class:`~workbench.nn.probe.AttentionProbe` (see the stage in ``workbench.models``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _bottleneck_mlp(channels: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=False), nn.Linear(hidden, 4 * channels))


class DIALSTMCell(nn.Module):
    """The DIA-LSTM cell: input and hidden transforms ``phi_ih``/``phi_hh``, each
    ``Linear(C, C // r) -> ReLU -> Linear(C // r, 4C)`` with biases (default ``nn.Linear`` init)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels={channels!r} is not valid; allowed: a positive int")
        if not isinstance(reduction, int) or reduction < 1 or channels // reduction < 1:
            raise ValueError(f"reduction={reduction!r} is not valid for channels={channels}; allowed: an int "
                             f"in 1..{channels}")
        self.channels = channels
        self.reduction = reduction
        hidden = channels // reduction
        self.phi_ih = _bottleneck_mlp(channels, hidden)
        self.phi_hh = _bottleneck_mlp(channels, hidden)

    def initial_state(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Zero ``(h, c)`` shaped, placed and typed like ``z`` (the state at a stage's first block)."""
        return torch.zeros_like(z), torch.zeros_like(z)

    def gates(self, z: Tensor, h: Tensor, c: Tensor) -> dict[str, Tensor]:
        """All intermediate values of one step: ``i, f, g, o`` and the new ``c``, ``h``, each ``(N, C)``."""
        i, f, g, o = (self.phi_ih(z) + self.phi_hh(h)).chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        h_new = o * torch.sigmoid(c_new)
        return {"i": i, "f": f, "g": g, "o": o, "c": c_new, "h": h_new}

    def forward(self, z: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """One step: ``z`` ``(N, C)``, ``state = (h, c)`` -> new ``(h, c)``."""
        if z.dim() != 2 or z.shape[1] != self.channels:
            raise ValueError(f"z.shape={tuple(z.shape)} is not valid; allowed: (N, {self.channels})")
        step = self.gates(z, *state)
        return step["h"], step["c"]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}"


def dia_lstm_gates(cell: DIALSTMCell, z: Tensor, h: Tensor, c: Tensor) -> dict[str, Tensor]:
    """Recompute ``i, f, g, o, c, h`` of ``cell`` for the inputs a forward hook saw."""
    return cell.gates(z, h, c)
