"""Optional C++ CPU kernels, built on first use with ``torch.utils.cpp_extension`` and cached.

Why native code at all: on a CPU, eager IEBN's cost at CIFAR-sized activations is dominated by the
dispatch of ~55 small ATen calls per training step, not by memory traffic (``workbench bench
layers``); a fused kernel does the per-plane arithmetic in two sweeps with nothing in between.
The kernels are an accelerator only: every caller falls back to the pure-PyTorch path (identical
math, tested against the same reference) when they are disabled, cannot be built (no C++
compiler), or the input is not a contiguous float32/float64 CPU tensor.

``WORKBENCH_NATIVE=0`` disables them; the build (about 25 s, once per torch version) goes to
torch's extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("csrc") / "iebn_cpu.cpp"
_ENV = "WORKBENCH_NATIVE"


def native_enabled() -> bool:
    """Whether the native kernels may be used (the ``WORKBENCH_NATIVE`` switch, default on)."""
    value = os.environ.get(_ENV, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{_ENV}={value!r} is not valid; allowed: 1/true/yes/on or 0/false/no/off")


def _import_cpp_extension():
    # Its import logs "No CUDA runtime is found" on CPU-only machines: irrelevant to a CPU kernel.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _put_ninja_on_path() -> None:
    # torch's JIT build runs `ninja` from PATH; a kernel or `make` started without the venv
    # activated does not have the venv's bin/ on PATH, where the `ninja` dependency put it.
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.lru_cache(maxsize=1)
def _load_iebn() -> bool:
    try:
        cpp_extension = _import_cpp_extension()
        cached = Path(cpp_extension._get_build_directory("workbench_iebn_cpu", verbose=False))
        if not any(cached.glob("*.so")):
            print("workbench: building the IEBN CPU kernel (once, ~25 s)...", file=sys.stderr, flush=True)
        _put_ninja_on_path()
        # -fopenmp: at::parallel_for is an inline OpenMP region, serial without it. The extension
        # then links libgomp.so.1, which resolves to the copy torch has already loaded.
        cpp_extension.load(name="workbench_iebn_cpu", sources=[str(_SOURCE)], is_python_module=False,
                           extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
        return hasattr(torch.ops.workbench_iebn, "forward")
    except Exception as error:  # noqa: BLE001 - any build failure means "use the Python path"
        warnings.warn(f"workbench: the IEBN CPU kernel could not be built ({type(error).__name__}: {error}); "
                      f"using the pure-PyTorch path (same results, slower on CPU). Set {_ENV}=0 to silence this.",
                      RuntimeWarning, stacklevel=3)
        return False


def iebn_cpu_available() -> bool:
    """Whether ``torch.ops.workbench_iebn.forward/backward`` can be called (builds them on first call)."""
    return native_enabled() and _load_iebn()
