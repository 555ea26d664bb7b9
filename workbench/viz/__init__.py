"""Plotly figure builders: pure functions, plain data in, ``go.Figure`` out.

Call :func:`setup` once in a notebook: figures then carry both plotly's own mime type (rendered
natively by JupyterLab) and an HTML fallback with plotly.js inlined, so executed notebooks and their
HTML exports render with no internet connection.
"""

from __future__ import annotations

from workbench.viz.common import setup, show
from workbench.viz.training import confusion_matrix_figure, training_curves_figure

__all__ = ["confusion_matrix_figure", "setup", "show", "training_curves_figure"]
