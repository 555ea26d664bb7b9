"""The ``amp``, ``channels_last`` and ``compile`` parameters of the notebooks, resolved for their device.

Every notebook declares the three (:data:`workbench.params.ACCELERATION`) and resolves them with
:func:`resolve_params_acceleration` when it validates its parameters: ``amp="auto"`` and
``channels_last=None`` become the device's defaults (bf16 autocast and channels_last on CUDA, neither
elsewhere) and what cannot apply (bf16 or fp16 autocast without CUDA) is refused there, before any
training. The resolved values are what the experiments hand to :func:`workbench.train.fit`.
"""

from __future__ import annotations

from typing import Any

from workbench.device import resolve_acceleration

ACCELERATION_KEYS = ("amp", "channels_last", "compile")


def resolve_params_acceleration(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with ``amp`` (``"off"``, ``"bf16"`` or ``"fp16"``), ``channels_last`` and ``compile``
    resolved for ``params["device"]`` (see :func:`workbench.device.resolve_acceleration`)."""
    acceleration = resolve_acceleration(params.get("device", "auto"), params.get("amp", "auto"),
                                        params.get("channels_last"), params.get("compile", False))
    params.update(acceleration.options())
    return params


def acceleration_options(params: dict[str, Any]) -> dict[str, Any]:
    """The resolved ``amp``, ``channels_last`` and ``compile`` of ``params`` (fp32, contiguous and eager
    where a caller's dict has none of them), as keyword arguments of the experiments' training."""
    defaults = {"amp": "off", "channels_last": False, "compile": False}
    return {k: params.get(k, defaults[k]) for k in ACCELERATION_KEYS}
