"""Attention probe points: identities that attention layers pass their attention vector through.

Every attention-bearing layer (IEBN2d's gate, SEModule's excitation, the DIA-LSTM attention a
block applies) routes its ``(N, C)`` attention vector through an :class:`AttentionProbe`. The probe
returns its input unchanged and owns no parameters or buffers, so the forward and the
``state_dict`` are exactly those of the layer without it; a forward hook registered on the probe
sees the attention the layer really used. Recorders find probes with :func:`attention_probes`.
A forward hook that *returns* a tensor replaces the attention (useful to clamp or freeze it).
"""

from __future__ import annotations

from torch import Tensor, nn

from workbench.nn.compiled import unwrap_model

ATTENTION_KINDS = ("iebn", "se", "dia")


class AttentionProbe(nn.Identity):
    """Identity marking where an ``(N, C)`` attention vector of kind ``kind`` flows."""

    def __init__(self, kind: str) -> None:
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"kind={kind!r} is not valid; allowed: {ATTENTION_KINDS}")
        super().__init__()
        self.kind = kind

    def forward(self, attention: Tensor) -> Tensor:
        return attention

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def attention_probes(model: nn.Module, kinds: str | tuple[str, ...] | None = None) -> dict[str, AttentionProbe]:
    """All attention probes in ``model`` (any model, ours or converted), in forward-definition order,
    keyed by qualified module name, optionally only those of the given kind(s)."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    if kinds is not None:
        bad = [k for k in kinds if k not in ATTENTION_KINDS]
        if bad:
            raise ValueError(f"kinds={kinds!r} contains {bad}; allowed: {ATTENTION_KINDS}")
    # names as in the module inside a torch.compile wrapper, so they do not depend on compiling
    return {name: m for name, m in unwrap_model(model, parallel=False).named_modules()
            if isinstance(m, AttentionProbe) and (kinds is None or m.kind in kinds)}
