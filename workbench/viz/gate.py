"""The IEBN gate-engagement figure (notebooks 01 and 02): is the gate instance-specific?

Plain data in (:class:`workbench.probes.GateEngagement` logs, as ``to_dict()``), ``go.Figure`` out.
"""

from __future__ import annotations

from collections.abc import Mapping

import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from workbench.probes.gate import GATE_ENGAGEMENT_THRESHOLD
from workbench.viz.common import base_layout

PANELS = (("gate_std", "gate std over samples"), ("relative_spread", "gate std / mean"),
          ("gap_std", "pooled-input (GAP) std over samples"))


def gate_engagement_figure(log: Mapping, threshold: float = GATE_ENGAGEMENT_THRESHOLD,
                           title: str = "IEBN gate engagement over training") -> go.Figure:
    """Per IEBN layer over training steps: the gate's std over samples, its std/mean (with the
    engagement threshold: below it in every layer the run cannot speak about IEBN's mechanism) and
    the spread of the pooled input the gate's weight multiplies. ``log``: a gate-engagement log
    (``{"records": [{"step", "layers": {name: {...}}}, ...]}``)."""
    records = [r for r in log.get("records", []) if r.get("layers")]
    if not records:
        raise ValueError("the gate-engagement log has no records; allowed: a GateEngagement log with at least one "
                         "measurement (train for at least `every` steps)")
    layers = list(records[0]["layers"])
    colors = sample_colorscale("Viridis", [0.9 * i / max(len(layers) - 1, 1) for i in range(len(layers))])
    fig = make_subplots(rows=1, cols=len(PANELS), subplot_titles=[t for _, t in PANELS])
    steps = [r["step"] for r in records]
    for i, layer in enumerate(layers):
        for col, (key, _) in enumerate(PANELS, start=1):
            fig.add_trace(go.Scatter(x=steps, y=[r["layers"][layer][key] for r in records], mode="lines",
                                     line=dict(color=colors[i], width=1.5), name=layer, legendgroup=layer,
                                     showlegend=col == 1, hovertemplate=f"{layer}<br>step %{{x}}: %{{y:.3g}}"),
                          row=1, col=col)
    fig.add_hline(y=threshold, line=dict(color="firebrick", dash="dash"), row=1, col=2,
                  annotation_text=f"engagement threshold {threshold:g}", annotation_position="top left")
    for col in range(1, len(PANELS) + 1):
        fig.update_xaxes(title_text="step", row=1, col=col)
    fig.update_yaxes(type="log", row=1, col=2)
    return base_layout(fig, title, height=430)
