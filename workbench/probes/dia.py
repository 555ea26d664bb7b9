"""DIA-LSTM recorder: per block of each stage, the gates ``i, f, o``, the candidate ``g``, the cell
state ``c`` and the hidden state ``h`` (the block's attention) of the stage's shared cell.

A forward hook on every :class:`~workbench.nn.dia.DIALSTMCell` sees, for each block in order, the
cell's inputs ``(z, (h, c))`` and its output ``(h', c')``. The recorder keeps ``h'`` and ``c'`` as
the forward produced them and recomputes ``i, f, g, o`` from the inputs with
:func:`~workbench.nn.dia.dia_lstm_gates` (the code the forward itself runs), under ``no_grad`` on
detached copies: the model's outputs and autograd graph are untouched. Same lifecycle as
:class:`~workbench.probes.attention.AttentionRecorder` (context manager, hooks removed on exit and
on exceptions), same GPU rule (tensors stay on the device; :func:`gate_summary` reduces).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from workbench.nn.compiled import unwrap_model
from workbench.nn.dia import DIALSTMCell, dia_lstm_gates
from workbench.probes.hooks import HookRecorder

DIA_KEYS = ("i", "f", "g", "o", "c", "h")


def dia_cells(model: nn.Module) -> dict[str, DIALSTMCell]:
    """Stage name -> DIA-LSTM cell. A stage is named after the module holding its cell
    (``layer1`` for ``layer1.dia``); a cell at the top level keeps its own name."""
    cells = {}
    for name, module in unwrap_model(model, parallel=False).named_modules():
        if isinstance(module, DIALSTMCell):
            stage = name.rsplit(".", 1)[0] if "." in name else name
            cells[stage if stage not in cells else name] = module
    return cells


class DIARecorder(HookRecorder):
    """Records ``i, f, g, o, c, h`` per block of each stage while active.

    ``stages``: ``None`` (all) or stage names (see :func:`dia_cells`); a bad name lists the
    available ones, a model without DIA-LSTM cells says so. Recordings accumulate over forwards
    (concatenated along the batch) until :meth:`clear`.
    """

    def __init__(self, model: nn.Module, stages: str | Sequence[str] | None = None) -> None:
        cells = dia_cells(model)
        if not cells:
            raise ValueError(f"model {type(model).__name__} has no DIA-LSTM cell; build it with attention='dia'")
        if stages is not None:
            stages = [stages] if isinstance(stages, str) else list(stages)
            missing = [s for s in stages if s not in cells]
            if missing or not stages:
                raise ValueError(f"stages={missing or stages!r} not found among the DIA stages; available: "
                                 f"{', '.join(cells)}")
            cells = {s: cells[s] for s in stages}
        super().__init__(model)
        self.cells = cells
        self._records: dict[str, list[dict[str, list[Tensor]]]] = {}

    def _register(self) -> None:
        for stage, cell in self.cells.items():
            self._keep(cell.register_forward_hook(self._make_hook(stage), with_kwargs=True))

    def clear(self) -> None:
        self._records = {}

    def _make_hook(self, stage: str):
        def hook(cell: DIALSTMCell, args: tuple, kwargs: dict, output: tuple[Tensor, Tensor]) -> None:
            z = args[0] if args else kwargs["z"]
            h, c = args[1] if len(args) > 1 else kwargs["state"]
            block = self._next_call(stage)
            with torch.no_grad():
                step = dia_lstm_gates(cell, z.detach(), h.detach(), c.detach())
            step["h"], step["c"] = output[0].detach().clone(), output[1].detach().clone()
            blocks = self._records.setdefault(stage, [])
            while len(blocks) <= block:
                blocks.append({key: [] for key in DIA_KEYS})
            for key in DIA_KEYS:
                blocks[block][key].append(step[key])

        return hook

    def states(self) -> dict[str, list[dict[str, Tensor]]]:
        """Stage -> one dict per block, in block order, of ``(N_total, C)`` tensors
        ``i, f, g, o, c, h`` (on the model's device)."""
        return {stage: [{key: torch.cat(chunks) if len(chunks) > 1 else chunks[0] for key, chunks in block.items()}
                        for block in blocks]
                for stage, blocks in self._records.items()}

    @torch.no_grad()
    def attribute(self, inputs: Tensor, **forward_kwargs: Any) -> dict[str, list[dict[str, Tensor]]]:
        """One forward of ``inputs`` (model left in its current mode) and its recorded states."""
        self.clear()
        with self:
            self.model(inputs, **forward_kwargs)
        out = self.states()
        self.clear()
        return out


@torch.no_grad()
def gate_summary(states: dict[str, list[dict[str, Tensor]]]) -> dict:
    """Per stage and block: mean and std (over samples and channels) of ``i, f, o, g``, and the
    RMS over channels of ``c`` and ``h`` averaged over samples. Plain lists, one value per block."""
    if not states:
        raise ValueError("states is empty: nothing was recorded (did the forward run inside the recorder?)")
    gates: dict[str, dict[str, list[float]]] = {}
    gate_std: dict[str, dict[str, list[float]]] = {}
    norms: dict[str, dict[str, list[float]]] = {}
    for stage, blocks in states.items():
        means = {k: torch.stack([b[k].float().mean() for b in blocks]) for k in ("i", "f", "o", "g")}
        stds = {k: torch.stack([b[k].float().std(correction=0) for b in blocks]) for k in ("i", "f", "o", "g")}
        rms = {k: torch.stack([b[k].float().square().mean(1).sqrt().mean() for b in blocks]) for k in ("c", "h")}
        gates[stage] = {k: v.cpu().tolist() for k, v in means.items()}
        gate_std[stage] = {k: v.cpu().tolist() for k, v in stds.items()}
        norms[stage] = {k: v.cpu().tolist() for k, v in rms.items()}
    return {"stages": list(states), "gates": gates, "gate_std": gate_std, "norms": norms}
