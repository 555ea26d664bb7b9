"""Shared plotly settings for every figure builder."""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio

TEMPLATE = "plotly_white"
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_configured = False


def setup(renderer: str = "plotly_mimetype+notebook") -> None:
    """Configure plotly for notebooks that must also render offline once exported to HTML.

    The ``notebook`` renderer inlines plotly.js into the output once (no CDN), and the plotly mime
    type keeps JupyterLab's native renderer; both are idempotent.
    """
    global _configured
    pio.templates.default = TEMPLATE
    if not _configured:
        pio.renderers.default = renderer
        _configured = True


def show(fig: go.Figure) -> None:
    """Display a figure in a notebook (no-op outside IPython). Returns None, so a cell ending with
    ``viz.show(fig)`` does not display the figure a second time as its value."""
    try:
        from IPython import get_ipython

        if get_ipython() is not None:
            fig.show()
    except ImportError:
        pass


def base_layout(fig: go.Figure, title: str, height: int = 420, **kwargs) -> go.Figure:
    fig.update_layout(title=title, template=TEMPLATE, height=height,
                      margin=dict(l=60, r=20, t=60, b=50), legend=dict(orientation="h", y=-0.2), **kwargs)
    return fig
