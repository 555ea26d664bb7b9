"""Benchmarks run by ``workbench bench <name>``: each module exposes ``main(argv) -> int`` and reports
ratios against a baseline measured in the same run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def write_results(folder: str | os.PathLike, stem: str, data: Any, table: str) -> None:
    """``<folder>/<stem>.json`` (the measurements) and ``<stem>.md`` (the printed table), each written
    atomically so an interrupted benchmark never leaves a half-written result behind."""
    from workbench.io import write_json_atomic, write_text_atomic

    folder = Path(folder)
    write_json_atomic(folder / f"{stem}.json", data)
    write_text_atomic(folder / f"{stem}.md", table if table.endswith("\n") else table + "\n")
