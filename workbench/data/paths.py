"""Where on-disk datasets live when no ``root`` is given."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DATA_ENV_VAR = "WORKBENCH_DATA"
# where a wheel install puts the data that ships with the project (pyproject's data-files)
INSTALLED_DATA_DIR = Path("share") / "workbench" / "data"
# How each entry point names a data root: notebooks take no root parameter, so the variable is their way
ROOT_HINT = (f"name the data root with ${DATA_ENV_VAR} (notebooks, workbench run / sweep), --data-root "
             "(workbench train) or root= (get_dataset)")


def _source_checkout() -> Path | None:
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "workbench").is_dir():
        return repo
    return None


def implicit_data_root() -> Path:
    """The data root nobody chose: ``<repo>/data`` for a source checkout, else ``./data``."""
    repo = _source_checkout()
    return repo / "data" if repo is not None else Path.cwd() / "data"


def default_data_root() -> Path:
    """``$WORKBENCH_DATA`` if set, else ``<repo>/data`` for a source checkout, else ``./data``."""
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return implicit_data_root()


def shipped_data_dir() -> Path:
    """The folder holding the data that ships with the project, whatever the data root is.

    ``<repo>/data`` for a source checkout (an editable install included), else
    ``<sys.prefix>/share/workbench/data``, where installing the wheel puts the same files.
    """
    repo = _source_checkout()
    return repo / "data" if repo is not None else Path(sys.prefix) / INSTALLED_DATA_DIR


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    if root is None:
        return default_data_root()
    if not isinstance(root, str | os.PathLike):
        raise ValueError(f"root={root!r} must be a path (str or os.PathLike) or None")
    return Path(root).expanduser()
