"""Figures for notebook 04_pruning_sparsity: BN-scale histograms, sparsity curves, kept channels,
mIoU/params/FLOPs/latency against the prune ratio, mIoU against FLOPs with intervals over seeds, the
paired difference per FLOPs target with its verdict, predicted masks. Pure: plain data in, figure out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.viz.common import PALETTE, base_layout

REGIME_COLORS = {"plain": PALETTE[0], "l1": PALETTE[1], "cags": PALETTE[2]}
METHOD_COLORS = {"slimming": PALETTE[1], "cap": PALETTE[2], "cap_guided": PALETTE[3]}
ARM_NAMES = {"slimming": "slimming (L1, |gamma|)", "cap": "CAP (CAGS, |gamma|)",
             "cap_guided": "CAGS, |gamma| x guide (ablation)"}
VERDICT_COLORS = {"supports": "#2ca02c", "contradicts": "#d62728", "inconclusive": "#7f7f7f"}
REGIME_NAMES = {"plain": "plain", "l1": "L1 (Network Slimming)", "cags": "CAGS (CAP)"}


def _scales_of(record: Mapping, layer: str | None) -> np.ndarray:
    scales = record["scales"]
    if layer is None:
        return np.concatenate([np.abs(np.asarray(v, dtype=float)) for v in scales.values()])
    if layer not in scales:
        raise ValueError(f"layer={layer!r} is not a recorded BN layer; allowed: None or one of {sorted(scales)}")
    return np.abs(np.asarray(scales[layer], dtype=float))


def scale_histogram_figure(records: Sequence[Mapping], layer: str | None = None, bins: int = 40,
                           title: str | None = None) -> go.Figure:
    """Histogram of ``|gamma|`` (all BN layers, or ``layer``) with a slider over the recorded epochs.

    ``records`` are :class:`~workbench.probes.BNScaleProbe` records
    (``[{"epoch", "scales": {name: [...]}}]``); the bins are shared by every epoch.
    """
    if not records:
        raise ValueError("records is empty: nothing to plot")
    values = [_scales_of(r, layer) for r in records]
    hi = max(float(v.max()) for v in values if v.size) or 1.0
    edges = np.linspace(0.0, hi * 1.0001, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for i, (r, v) in enumerate(zip(records, values)):
        counts, _ = np.histogram(v, bins=edges)
        fig.add_trace(go.Bar(x=centres.tolist(), y=counts.tolist(), width=float(edges[1] - edges[0]),
                             name=f"epoch {r['epoch']}", visible=i == len(records) - 1,
                             marker_color=PALETTE[0]))
    steps = [dict(method="update", label=str(r["epoch"]),
                  args=[{"visible": [j == i for j in range(len(records))]}]) for i, r in enumerate(records)]
    fig.update_layout(sliders=[dict(active=len(records) - 1, currentvalue=dict(prefix="epoch "), steps=steps,
                                    pad=dict(t=40))])
    fig.update_xaxes(title_text="|gamma|")
    fig.update_yaxes(title_text="channels")
    where = "all BN layers" if layer is None else layer
    return base_layout(fig, title or f"BN scale histogram over training ({where})", height=460, showlegend=False)


def scale_heatmap_figure(records: Sequence[Mapping], bins: int = 30, title: str | None = None) -> go.Figure:
    """Per layer (rows) histogram of ``|gamma|`` at the last recorded epoch, as a heatmap."""
    if not records:
        raise ValueError("records is empty: nothing to plot")
    last = records[-1]["scales"]
    names = list(last)
    hi = max(max(np.abs(v)) for v in last.values() if len(v)) or 1.0
    edges = np.linspace(0.0, hi * 1.0001, bins + 1)
    z = [np.histogram(np.abs(np.asarray(last[n], dtype=float)), bins=edges)[0] / max(1, len(last[n]))
         for n in names]
    fig = go.Figure(go.Heatmap(z=np.asarray(z).tolist(), x=((edges[:-1] + edges[1:]) / 2).tolist(), y=names,
                               colorscale="Viridis", colorbar=dict(title="fraction")))
    fig.update_xaxes(title_text="|gamma|")
    return base_layout(fig, title or f"BN scales per layer, epoch {records[-1]['epoch']}",
                       height=max(360, 14 * len(names)))


def sparsity_curves_figure(curves: Mapping[str, Sequence[Mapping]], threshold: float = 1e-2,
                           title: str | None = None) -> go.Figure:
    """Fraction of BN scales below ``threshold`` against epoch, one line per training regime."""
    fig = go.Figure()
    for i, (regime, points) in enumerate(curves.items()):
        xs, ys = [], []
        for p in points:
            fractions = {float(k): v for k, v in p["fraction_below"].items()}
            if float(threshold) not in fractions:
                raise ValueError(f"threshold={threshold!r} was not recorded; allowed: {sorted(fractions)}")
            xs.append(p["epoch"])
            ys.append(fractions[float(threshold)])
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=REGIME_NAMES.get(regime, regime),
                                 line=dict(color=REGIME_COLORS.get(regime, PALETTE[i % len(PALETTE)]))))
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text=f"fraction of |gamma| < {threshold:g}", rangemode="tozero")
    return base_layout(fig, title or f"Sparsity of BN scales during training (|gamma| < {threshold:g})")


def kept_channels_figure(layers_by_method: Mapping[str, Mapping[str, Sequence[int]]],
                         title: str | None = None) -> go.Figure:
    """Fraction of channels each method keeps per BN layer (``{method: {layer: (before, after)}}``)."""
    fig = go.Figure()
    for i, (method, layers) in enumerate(layers_by_method.items()):
        names = list(layers)
        kept = [layers[n][1] / layers[n][0] if layers[n][0] else 0.0 for n in names]
        fig.add_trace(go.Bar(x=names, y=kept, name=method,
                             marker_color=METHOD_COLORS.get(method, PALETTE[i % len(PALETTE)]),
                             customdata=[list(layers[n]) for n in names],
                             hovertemplate="%{x}<br>kept %{customdata[1]} of %{customdata[0]}<extra></extra>"))
    fig.update_layout(barmode="group")
    fig.update_xaxes(tickangle=-60, tickfont=dict(size=8))
    fig.update_yaxes(title_text="fraction of channels kept", range=[0, 1.05])
    return base_layout(fig, title or "Channels kept per BN layer", height=480)


def tradeoff_figure(rows: Sequence[Mapping], title: str | None = None) -> go.Figure:
    """mIoU (pruned, and fine-tuned where rows have it), params, FLOPs and latency against the prune
    ratio, per method."""
    if not rows:
        raise ValueError("rows is empty: nothing to plot")
    fig = make_subplots(rows=2, cols=2, subplot_titles=("mIoU", "parameters", "FLOPs", "latency (ms)"))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, method in enumerate(methods):
        color = METHOD_COLORS.get(method, PALETTE[i % len(PALETTE)])
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["ratio"])
        x = [r["ratio"] for r in rs]
        if all(r.get("miou_finetuned") is not None for r in rs):
            fig.add_trace(go.Scatter(x=x, y=[r["miou_finetuned"] for r in rs], name=f"{method}, fine-tuned",
                                     mode="lines+markers", line=dict(color=color)), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=[r["miou_pruned"] for r in rs], name=f"{method}, pruned only",
                                 mode="lines+markers", line=dict(color=color, dash="dot")), row=1, col=1)
        fig.add_trace(go.Scatter(x=[0.0], y=[rs[0]["miou_unpruned"]], name=f"{method}, unpruned",
                                 mode="markers", marker=dict(color=color, symbol="star", size=11)), row=1, col=1)
        for (row, col), key in (((1, 2), "params_after"), ((2, 1), "flops_after"), ((2, 2), "latency_ms_after")):
            ys = [r.get(key) for r in rs]
            before = rs[0].get(key.replace("after", "before"))
            fig.add_trace(go.Scatter(x=[0.0, *x], y=[before, *ys], mode="lines+markers", showlegend=False,
                                     name=method, line=dict(color=color)), row=row, col=col)
    for row, col in ((1, 1), (1, 2), (2, 1), (2, 2)):
        fig.update_xaxes(title_text="prune ratio", row=row, col=col)
    return base_layout(fig, title or "Accuracy and cost against the prune ratio", height=640)


def flops_curves_figure(points: Sequence[Mapping], dense: float | None = None, metric: str = "fine-tuned mIoU",
                        title: str | None = None) -> go.Figure:
    """Mean ``metric`` against the achieved FLOPs fraction per arm, with 95% intervals over seeds as
    error bars; ``points`` from :func:`workbench.experiments.pruning_comparison.curve_points`;
    ``dense``: the dense networks' mean, drawn at FLOPs fraction 1."""
    if not points:
        raise ValueError("points is empty: nothing to plot")
    fig = go.Figure()
    arms = list(dict.fromkeys(p["arm"] for p in points))
    for i, arm in enumerate(arms):
        ps = sorted((p for p in points if p["arm"] == arm), key=lambda p: p["flops_fraction"])
        fig.add_trace(go.Scatter(
            x=[p["flops_fraction"] for p in ps], y=[p["mean"] for p in ps], mode="lines+markers",
            name=ARM_NAMES.get(arm, arm), line=dict(color=METHOD_COLORS.get(arm, PALETTE[i % len(PALETTE)])),
            error_y=dict(type="data", symmetric=False, array=[p["high"] - p["mean"] for p in ps],
                         arrayminus=[p["mean"] - p["low"] for p in ps]),
            customdata=[[p["flops_target"], p["n"]] for p in ps],
            hovertemplate="target %{customdata[0]}: FLOPs %{x:.3f}<br>%{y:.4f} "
                          "(%{customdata[1]} seeds)<extra></extra>"))
    if dense is not None:
        fig.add_trace(go.Scatter(x=[1.0], y=[dense], mode="markers", name="dense (unpruned)",
                                 marker=dict(color=PALETTE[0], symbol="star", size=12)))
    fig.update_xaxes(title_text="FLOPs fraction of the dense network")
    fig.update_yaxes(title_text=metric)
    return base_layout(fig, title or f"{metric} against FLOPs (mean over seeds, 95% interval)")


def paired_difference_figure(verdicts: Sequence[Mapping], title: str | None = None) -> go.Figure:
    """Paired difference (treatment - reference) per FLOPs target with its 95% interval, coloured and
    labelled by the verdict word; ``verdicts`` are :meth:`workbench.recipe.Verdict.to_dict` dicts."""
    if not verdicts:
        raise ValueError("verdicts is empty: nothing to plot")
    fig = go.Figure()
    for word in dict.fromkeys(v["verdict"] for v in verdicts):
        vs = [v for v in verdicts if v["verdict"] == word]
        iv = [v["interval"] for v in vs]
        fig.add_trace(go.Scatter(
            x=[v["setting"]["flops_target"] for v in vs], y=[i["mean"] for i in iv], mode="markers+text",
            name=word, text=[word for _ in vs], textposition="top center",
            marker=dict(size=11, color=VERDICT_COLORS.get(word, PALETTE[0])),
            error_y=dict(type="data", symmetric=False, array=[i["high"] - i["mean"] for i in iv],
                         arrayminus=[i["mean"] - i["low"] for i in iv]),
            hovertext=[v["sentence"] for v in vs], hoverinfo="text"))
    fig.add_hline(y=0.0, line=dict(color="black", dash="dash", width=1))
    first = verdicts[0]
    fig.update_xaxes(title_text="FLOPs target (fraction of the dense network)")
    fig.update_yaxes(title_text=f"{first['metric']}: {first['treatment']} - {first['reference']}")
    return base_layout(fig, title or f"Paired difference {first['treatment']} - {first['reference']} "
                                     f"({first['interval']['n']} seeds, 95% interval)")


def flops_match_figure(rows: Sequence[Mapping], tolerance: float = 0.02, title: str | None = None) -> go.Figure:
    """Achieved FLOPs fraction against the target for every arm and seed, with the tolerance band."""
    if not rows:
        raise ValueError("rows is empty: nothing to plot")
    fig = go.Figure()
    targets = sorted({r["flops_target"] for r in rows})
    fig.add_trace(go.Scatter(x=targets + targets[::-1], y=[t * (1 + tolerance) for t in targets]
                             + [t * (1 - tolerance) for t in targets[::-1]], fill="toself", mode="none",
                             fillcolor="rgba(128,128,128,0.2)", name=f"target +- {tolerance:.0%}"))
    for i, arm in enumerate(dict.fromkeys(r["arm"] for r in rows)):
        rs = [r for r in rows if r["arm"] == arm]
        fig.add_trace(go.Scatter(x=[r["flops_target"] for r in rs], y=[r["flops_fraction"] for r in rs],
                                 mode="markers", name=ARM_NAMES.get(arm, arm),
                                 marker=dict(color=METHOD_COLORS.get(arm, PALETTE[i % len(PALETTE)])),
                                 customdata=[r["seed"] for r in rs],
                                 hovertemplate="seed %{customdata}: %{y:.4f}<extra></extra>"))
    fig.update_xaxes(title_text="FLOPs target")
    fig.update_yaxes(title_text="achieved FLOPs fraction")
    return base_layout(fig, title or "FLOPs matching: every arm and seed against its target")


def _label_colors(num_classes: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    colors = rng.integers(40, 255, size=(max(num_classes, 1), 3))
    colors[0] = (0, 0, 0)  # background black
    return colors


def predictions_figure(samples: Mapping[str, Any], title: str | None = None) -> go.Figure:
    """Images, true masks and every model's predicted masks (rows: scenes; columns: what is shown)."""
    images = np.asarray(samples["images"], dtype=float)
    targets = np.asarray(samples["targets"])
    preds = {k: np.asarray(v) for k, v in samples["predictions"].items()}
    n = images.shape[0]
    columns = ["image", "truth", *preds]
    fig = make_subplots(rows=n, cols=len(columns), column_titles=columns, horizontal_spacing=0.01,
                        vertical_spacing=0.01)
    palette = _label_colors(int(max(targets.max(initial=0), *(p.max(initial=0) for p in preds.values()))) + 1)
    for i in range(n):
        masks = [targets[i], *(p[i] for p in preds.values())]
        fig.add_trace(go.Image(z=(images[i] * 255).astype(np.uint8).tolist()), row=i + 1, col=1)
        for j, mask in enumerate(masks, start=2):
            rgb = palette[np.clip(mask, 0, len(palette) - 1)]
            fig.add_trace(go.Image(z=rgb.astype(np.uint8).tolist()), row=i + 1, col=j)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return base_layout(fig, title or "Predicted masks on test scenes", height=160 * n + 80, showlegend=False)
