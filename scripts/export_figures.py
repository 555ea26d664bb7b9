"""Export each notebook's main figure from an executed run to docs/images/<notebook>.png.

The figure is the real one the notebook computed: the plotly JSON output of the cell tagged
``main-figure`` (else the first plotly output) in the executed notebook, rendered by kaleido through
the system Chromium. Usage: ``python scripts/export_figures.py [reports/<run-id>]`` (default: the
newest run under reports/).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nbformat
import plotly.io as pio

ROOT = Path(__file__).resolve().parents[1]
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def main_figure(executed: Path):
    nb = nbformat.read(executed, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in cells if "main-figure" in c.get("metadata", {}).get("tags", [])]
    for cell in tagged + cells:
        for output in cell.get("outputs", []):
            if PLOTLY_MIME in output.get("data", {}):
                return pio.from_json(nbformat.v4.nbjson.json.dumps(output["data"][PLOTLY_MIME]))
    return None


def main(argv: list[str]) -> int:
    runs = sorted((p for p in (ROOT / "reports").glob("*") if (p / "results.json").exists()),
                  key=lambda p: p.stat().st_mtime)
    run = Path(argv[0]) if argv else (runs[-1] if runs else None)
    if run is None:
        print("no executed run found: run `make run` first", file=sys.stderr)
        return 2
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("static export needs Chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    os.environ.setdefault("BROWSER_PATH", browser)
    out = ROOT / "docs" / "images"
    out.mkdir(parents=True, exist_ok=True)
    for executed in sorted(run.glob("*.ipynb")):
        fig = main_figure(executed)
        if fig is None:
            print(f"{executed.stem}: no plotly figure in the executed notebook")
            continue
        target = out / f"{executed.stem}.png"
        fig.write_image(target, width=1000, height=fig.layout.height or 480, scale=1)
        print(f"{executed.stem}: {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
