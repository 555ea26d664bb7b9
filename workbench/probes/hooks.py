"""Hook lifecycle shared by the recorders: a context manager that registers forward hooks on
entry and removes every one of them on exit (also after an exception, and when registering fails
half-way), refuses to be entered twice, and counts calls per site within one forward of the model
(so a module shared by several blocks, such as a stage's DIA-LSTM cell, is told apart by its call
index)."""

from __future__ import annotations

from typing import Any

from torch import nn

from workbench.nn.compiled import unwrap_model, watch_hooks


class HookRecorder:
    """Base for recorders; subclasses register their hooks in :meth:`_register` with :meth:`_keep`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap_model(model, parallel=False)
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self):
        if self._handles:
            raise RuntimeError(f"this {type(self).__name__} is already active; it cannot be entered twice")
        try:
            watch_hooks()
            # The model pre-hook marks forward boundaries for the per-forward call counts.
            self._keep(self.model.register_forward_pre_hook(self._reset_calls))
            self._register()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this recorder registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def _register(self) -> None:
        raise NotImplementedError

    def _keep(self, handle: Any) -> None:
        self._handles.append(handle)

    def _next_call(self, site: str) -> int:
        """This site's call index within the current forward of the model (0, 1, ...)."""
        call = self._calls.get(site, 0)
        self._calls[site] = call + 1
        return call

    def _reset_calls(self, _module: nn.Module, _args: Any) -> None:
        self._calls = {}
