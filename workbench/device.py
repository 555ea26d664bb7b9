"""Device choice, seeding and mixed precision: the one place that knows about accelerators."""

from __future__ import annotations

import contextlib
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch

from workbench.errors import DeviceUnavailableError
from workbench.params import AMP_CHOICES

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N" | "mps"`` into a ``torch.device``.

    ``auto`` prefers CUDA, then MPS, then CPU. Asking explicitly for an accelerator that is not
    there is an error rather than a silent CPU fallback, so a sweep meant for a GPU never runs
    for hours on a CPU by accident.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else str(spec).strip().lower()
    if not _DEVICE_PATTERN.match(spec):
        raise ValueError(f"device={spec!r} is not valid; allowed: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device={spec!r} was requested but CUDA is not available on this machine; "
                               "use device='auto' or 'cpu'")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"device={spec!r} was requested but only {torch.cuda.device_count()} CUDA "
                               f"device(s) exist (cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return torch.device(spec)
    if spec == "mps" and not _mps_available():
        raise DeviceUnavailableError("device='mps' was requested but MPS is not available; use 'auto' or 'cpu'")
    return torch.device(spec)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def seed_everything(seed: int, deterministic: bool = False) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded the same way."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def autocast_dtype(device: torch.device, amp: str | bool | None) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or ``None`` when autocast is off.

    ``auto``/``True`` means bf16 on CUDA where supported (fp16 otherwise) and off on CPU/MPS, where
    autocast gains little and changes numerics.
    """
    if amp is None or amp is False:
        amp = "off"
    if amp is True:
        amp = "auto"
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp={amp!r} is not valid; allowed: {AMP_CHOICES} or a bool")
    if amp == "off":
        return None
    if device.type != "cuda":
        return None if amp == "auto" else _raise_amp(device, amp)
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"amp='bf16' needs a GPU with bfloat16 support, {describe_device(device)} has none; "
                         "allowed here: 'fp16', 'auto' (fp16 on this GPU), 'off'")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _raise_amp(device: torch.device, amp: str):
    raise ValueError(f"amp={amp!r} needs a CUDA device, got {device}; use amp='off' or 'auto'")


def autocast(device: torch.device, amp: str | bool | None = "auto"):
    """A context manager: autocast on CUDA with the chosen dtype, a no-op elsewhere."""
    dtype = autocast_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Acceleration:
    """How training runs on its device: the autocast precision, the memory format, compilation.

    ``amp`` is resolved (``"off"``, ``"bf16"`` or ``"fp16"``, never ``"auto"``); the fields are what
    :func:`workbench.train.fit` and :func:`workbench.train.evaluate` take.
    """

    amp: str
    channels_last: bool
    compile: bool

    def options(self) -> dict:
        """``{"amp", "channels_last", "compile"}``: keyword arguments of ``fit`` (``evaluate`` takes the
        first two)."""
        return {"amp": self.amp, "channels_last": self.channels_last, "compile": self.compile}

    def __str__(self) -> str:
        return (f"{'fp32' if self.amp == 'off' else self.amp + ' autocast'}, "
                f"{'channels_last' if self.channels_last else 'contiguous'}, "
                f"{'compiled' if self.compile else 'eager'}")


def resolve_acceleration(device: str | torch.device, amp: str = "auto", channels_last: bool | None = None,
                         compile: bool = False) -> Acceleration:
    """The device's defaults for what is left at ``"auto"`` / ``None``, and a ``ValueError`` naming the
    parameter for what cannot apply, before any work starts.

    Defaults: on CUDA, bf16 autocast (fp16 on a GPU without bf16) and channels_last, the layout the
    tensor cores' convolutions run in; elsewhere fp32 and the contiguous layout (CPU autocast changes
    numerics and gains little). Refused: ``amp`` ``"bf16"``/``"fp16"`` without CUDA, ``"bf16"`` on a
    GPU without bf16. ``channels_last=True`` is allowed everywhere (every layer of the workbench runs
    in it, the CPU included, where it only costs layout conversions); ``compile`` is never implied.
    """
    device = resolve_device(device)
    dtype = autocast_dtype(device, amp)
    if channels_last is not None and not isinstance(channels_last, bool):
        raise ValueError(f"channels_last={channels_last!r} is not valid; allowed: None (the device's default: on "
                         "with CUDA, off elsewhere), True, False")
    if not isinstance(compile, bool):
        raise ValueError(f"compile={compile!r} is not valid; allowed: True, False")
    names = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return Acceleration(amp=names[dtype], channels_last=device.type == "cuda" if channels_last is None
                        else channels_last, compile=compile)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
