"""Figures of training runs: loss/accuracy curves and confusion matrices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.viz.common import PALETTE, base_layout


def training_curves_figure(histories: Mapping[str, Sequence[Mapping]] | Sequence[Mapping],
                           title: str = "Training curves") -> go.Figure:
    """Loss (left) and accuracy (right) per epoch, one colour per run, train dashed, validation solid.

    ``histories`` is one ``fit`` history (a list of per-epoch dicts) or a mapping name -> history.
    """
    if not isinstance(histories, Mapping):
        histories = {"run": histories}
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    for i, (name, history) in enumerate(histories.items()):
        color = PALETTE[i % len(PALETTE)]
        epochs = [h["epoch"] for h in history]
        for col, key in ((1, "loss"), (2, "acc")):
            for split, dash in (("train", "dash"), ("val", "solid")):
                ys = [h.get(f"{split}_{key}") for h in history]
                if all(y is None for y in ys):
                    continue
                fig.add_trace(go.Scatter(x=epochs, y=ys, mode="lines+markers", name=f"{name} {split}",
                                         legendgroup=name, line=dict(color=color, dash=dash),
                                         showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="cross-entropy", row=1, col=1)
    fig.update_yaxes(title_text="top-1", row=1, col=2)
    return base_layout(fig, title)


def confusion_matrix_figure(confusion: Sequence[Sequence[float]], class_names: Sequence[str] | None = None,
                            normalize: bool = True, title: str = "Confusion matrix") -> go.Figure:
    """Heatmap, rows = true class, columns = prediction; row-normalised by default."""
    rows = [list(map(float, r)) for r in confusion]
    n = len(rows)
    if any(len(r) != n for r in rows):
        raise ValueError("confusion must be a square matrix")
    names = [str(c) for c in (class_names if class_names is not None else range(n))]
    if len(names) != n:
        raise ValueError(f"class_names has {len(names)} entries for a {n}x{n} matrix")
    values = [[v / max(sum(r), 1.0) for v in r] for r in rows] if normalize else rows
    text = [[f"{int(c)}" for c in r] for r in rows]
    fig = go.Figure(go.Heatmap(z=values, x=names, y=names, text=text, texttemplate="%{text}",
                               colorscale="Blues", zmin=0, zmax=1 if normalize else None,
                               colorbar=dict(title="fraction" if normalize else "count")))
    fig.update_xaxes(title_text="predicted", type="category")
    fig.update_yaxes(title_text="true", type="category", autorange="reversed")
    return base_layout(fig, title, height=480)
