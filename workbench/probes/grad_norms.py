"""Gradient norm per stage: how the training signal is spread over the stem, the residual stages
(with their attention modules) and the head, and the training loss, on the probe schedule."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import nn

from workbench.probes.base import Probe


class StageGradNorms(Probe):
    """After backward, on the schedule: the L2 norm of the gradient of each stage's parameters and
    the training loss.

    ``records``: ``{"step", "loss", "<stage>": norm, ...}``; the norms also go into
    ``state.logs`` as ``grad_norm/<stage>``. Norms are reduced on the device and read back once per
    measured step.
    """

    name = "grad_norm"
    hook = "on_after_backward"
    STAGE = re.compile(r"^(layer|stage)\d+$")

    def __init__(self, every: int | Collection[int] | Callable[[int], bool] = 1, path: str | None = None) -> None:
        super().__init__(every, path)
        self._groups: dict[str, list[nn.Parameter]] = {}

    def on_fit_start(self, state: Any) -> None:
        self._groups = self.groups(state.model)

    @classmethod
    def groups(cls, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Parameters by stage: ``stem`` (before the first stage), each ``layerK``/``stageK``, ``head``."""
        tops = [name for name, _ in model.named_children()]
        stages = [t for t in tops if cls.STAGE.match(t)]
        last = tops.index(stages[-1]) if stages else len(tops)
        groups: dict[str, list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            top = name.split(".")[0]
            if top in stages:
                key = top
            else:
                # parameters of modules defined before the first stage are the stem, after the last the head
                key = "head" if stages and top in tops and tops.index(top) > last else "stem"
            groups.setdefault(key, []).append(p)
        order = ["stem", *stages, "head"]
        return {k: groups[k] for k in order if k in groups}

    @torch.no_grad()
    def measure(self, state: Any) -> dict:
        names, norms = [], []
        for stage, params in self._groups.items():
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                names.append(stage)
                norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        values = torch.stack(norms).cpu().tolist() if norms else []
        return {"loss": float(state.loss.detach()), **dict(zip(names, values))}

    def make_record(self, state: Any, values: dict) -> dict:
        # Raw floats: a diverging run's NaN/inf norms are data here, not values to make JSON-safe.
        return {"step": int(state.step), **values}

    def log_values(self, logs: dict, record: dict) -> None:
        logs.update({f"{self.name}/{k}": v for k, v in record.items() if k in self._groups})

    def series(self) -> tuple[list[int], dict[str, list[float]]]:
        """Measured steps and stage -> gradient norms at those steps."""
        steps = [e["step"] for e in self.records]
        stages = [k for k in self._groups if any(k in e for e in self.records)]
        return steps, {k: [e.get(k, float("nan")) for e in self.records] for k in stages}

    def load_state_dict(self, state: dict) -> None:
        self.records = list(state.get("records", state.get("log", [])))  # "log": checkpoints of older runs
