"""Where on-disk datasets live when no ``root`` is given."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV_VAR = "WORKBENCH_DATA"


def default_data_root() -> Path:
    """``$WORKBENCH_DATA`` if set, else ``<repo>/data`` for a source checkout, else ``./data``."""
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "workbench").is_dir():
        return repo / "data"
    return Path.cwd() / "data"


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    if root is None:
        return default_data_root()
    if not isinstance(root, str | os.PathLike):
        raise ValueError(f"root={root!r} must be a path (str or os.PathLike) or None")
    return Path(root).expanduser()
