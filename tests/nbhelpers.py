"""Small notebooks written on the fly for runner and sweep tests."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook


def write_test_notebook(path: Path, body: str, params: str = 'preset = "quick"\ndevice = "cpu"\nseed = 0\nscale = 2\n'):
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "workbench", "display_name": "Python (workbench)", "language": "python"}
    cell = new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, new_code_cell(body)]
    nbformat.write(nb, path)
    return path
