"""The training-callback protocol, below every layer that plugs into training (noise, probes,
pruning) so they can subclass it without importing the training loop."""

from __future__ import annotations

from typing import Any


class Callback:
    """Base class of the training callbacks; every hook is optional.

    ``on_after_backward`` runs after ``loss.backward()`` and before ``optimizer.step()``: this is where
    sparsity subgradients on BN scales belong. ``state_dict``/``load_state_dict`` let a callback's
    running state (e.g. an EMA) travel in checkpoints.
    """

    def on_fit_start(self, state: Any) -> None: ...

    def on_step_start(self, state: Any) -> None: ...

    def on_after_backward(self, state: Any) -> None: ...

    def on_step_end(self, state: Any) -> None: ...

    def on_epoch_end(self, state: Any) -> None: ...

    def on_fit_end(self, state: Any) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None
