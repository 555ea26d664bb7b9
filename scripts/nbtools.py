"""Write a notebook from a list of cells with the metadata the runner expects (kernelspec, the
experiment module whose PARAMETERS validate it, a `parameters` tag) and no outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]


def write_notebook(path: str | Path, experiment: str, cells: list[tuple[str, str]]) -> Path:
    """``cells``: (kind, source) with kind in {"md", "code", "parameters"}."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "workbench", "display_name": "Python (workbench)",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["workbench"] = {"experiment": experiment}
    for kind, source in cells:
        source = source.strip("\n")
        if kind == "md":
            nb.cells.append(new_markdown_cell(source))
        else:
            cell = new_code_cell(source)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    nbformat.validate(nb)
    path = Path(path)
    if not path.is_absolute():
        path = ROOT / path
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    sys.exit("import write_notebook from this module")
