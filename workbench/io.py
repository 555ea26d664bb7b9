"""Atomic file writes (a reader, or a crash, never sees a half-written checkpoint, report or log) and the
JSON-safe plain data they hold."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it is fsynced and renamed over ``path``,
    on an exception it is deleted and ``path`` keeps its previous content."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}; allowed: 'w', 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; reports and checkpoints get the usual umask-based mode
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    with atomic_open(path, "w") as handle:
        json.dump(data, handle, indent=2)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) and check that a file can be written in it, so that a
    read-only destination is refused before any work starts. Raises ``ValueError`` naming the
    folder that cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        where = exc.filename or folder
        raise ValueError(f"cannot write to {where}: {exc.strerror or exc}; make it writable or choose "
                         "another folder (--output)") from None
    return folder


def plain(value: Any, strict: bool = False) -> Any:
    """JSON-safe plain data: tensors and numpy values become lists or numbers, mapping keys strings,
    NaN ``None`` and infinities ``"inf"`` / ``"-inf"``. Any other object passes through unchanged, or,
    with ``strict``, raises ``TypeError`` (a recorded metric must be data)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): plain(v, strict) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, strict) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if strict and not (value is None or isinstance(value, (bool, int, float, str))):
        raise TypeError(f"cannot record a value of type {type(value).__name__}; use numbers, strings, "
                        "lists or dicts of them")
    return value
