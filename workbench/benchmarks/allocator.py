"""Keep freed memory inside a CPU benchmark process, so latency measures the network, not page faults.

glibc's ``malloc`` serves every allocation above its mmap threshold (adaptive, at most 32 MiB on
64-bit) with a fresh mapping and unmaps it on ``free``. A segmentation network allocates its
activations afresh on every forward, so each forward faults those pages in again: the kernel zeroes
and maps them one 4 KiB page at a time. FLOPs do not see this, and the cost falls hardest on the
parts pruning does not shrink. On the 2-core development machine (1 thread) allocating and filling
ICNet's full-size logits (8 x 19 x 256 x 512 floats, 80 MB) took 52 ms, filling them in place 13 ms;
their final bilinear resize took 64 ms, 28 ms with freed memory kept. Over four alternating runs of
``workbench bench pruning`` (ICNet, full width, 256x512, 1 thread) keeping memory made the baseline
25% and the 0.7-pruned network 29% faster, and the 0.7 efficiency rose from 0.61 to 0.65 (eager)
and 0.65 to 0.71 (BN folded), with less spread between runs.

Deployments avoid this with jemalloc or tcmalloc (PyTorch's CPU performance guide and its
``torch.backends.xeon.run_cpu`` launcher preload them for this reason). :func:`keep_freed_memory`
gets the same effect from glibc itself: no mmapped chunks (``M_MMAP_MAX = 0``) and no trimming of
the heap top (``M_TRIM_THRESHOLD`` at its maximum), so freed activations are reused. It is a
process-wide setting meant for a dedicated benchmark process: memory freed afterwards stays with the
process until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

ALLOCATORS = ("keep", "system")
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes a C int


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # musl and other C libraries lack gnu_get_libc_version; their mallopt, where present, is a stub
        if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
            return None
    except OSError:
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse in this process. Returns whether it took
    effect (False where the C library is not glibc, e.g. macOS or musl: the setting is then left as
    the system has it)."""
    libc = _glibc()
    if libc is None:
        return False
    return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1


def apply_allocator(choice: str) -> str:
    """Apply a ``--allocator`` choice and return what is in effect, for the benchmark's header:
    ``"keep"``, ``"system"``, or ``"system (keep unavailable: not glibc)"``."""
    if choice not in ALLOCATORS:
        raise ValueError(f"allocator={choice!r} is not valid; allowed: {ALLOCATORS}")
    if choice == "system":
        return "system"
    return "keep" if keep_freed_memory() else "system (keep unavailable: not glibc)"
