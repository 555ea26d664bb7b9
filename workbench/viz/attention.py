"""Figures of channel attention (IEBN gates, SE excitations, DIA hidden states): per layer, channel,
class and sample; shift under batch noise; agreement with captum attributions. Pure builders."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.viz.common import PALETTE, base_layout

ATTENTION_COLORSCALE = "Viridis"


def _floats(values: Sequence) -> list[float]:
    return [float(v) for v in values]


def _flatten(values) -> list[float]:
    out: list[float] = []
    for v in values:
        if isinstance(v, (list, tuple)) or hasattr(v, "__len__"):
            out.extend(_flatten(v))
        else:
            out.append(float(v))
    return out


def _nonempty(mapping: Mapping, name: str) -> None:
    if not mapping:
        raise ValueError(f"{name} is empty: nothing to plot")


def _kind_color(kind: str | None, i: int) -> str:
    return {"iebn": PALETTE[0], "se": PALETTE[1], "dia": PALETTE[2]}.get(kind or "", PALETTE[i % len(PALETTE)])


def attention_heatmap_figure(means: Mapping[str, Sequence[float]], sort_channels: bool = False,
                             title: str = "Mean attention per layer and channel") -> go.Figure:
    """Layer x channel heatmap of mean attention. Layers of different widths are padded with gaps.

    ``sort_channels``: order each layer's channels by decreasing mean attention, so the x axis is
    the channel's rank in its layer (the hover keeps the original channel index). This shows how
    peaked each layer's attention is irrespective of which channels carry it.
    """
    _nonempty(means, "means")
    layers = list(means)
    width = max(len(v) for v in means.values())
    z, custom = [], []
    for layer in layers:
        row = _floats(means[layer])
        order = sorted(range(len(row)), key=lambda c: -row[c]) if sort_channels else list(range(len(row)))
        pad = width - len(row)
        z.append([row[c] for c in order] + [None] * pad)
        custom.append(order + [None] * pad)
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(width)), y=layers, customdata=custom, colorscale=ATTENTION_COLORSCALE,
        colorbar=dict(title="attention"),
        hovertemplate="layer %{y}<br>channel %{customdata}<br>mean attention %{z:.3f}<extra></extra>"))
    fig.update_xaxes(title_text="channel rank (sorted by mean attention)" if sort_channels else "channel")
    fig.update_yaxes(title_text="layer", autorange="reversed", type="category")
    return base_layout(fig, title, height=max(360, 18 * len(layers) + 160))


def attention_distribution_figure(values: Mapping[str, Sequence], kinds: Mapping[str, str] | None = None,
                                  style: str = "violin", max_points: int = 4000,
                                  title: str = "Attention values per layer (all samples and channels)") -> go.Figure:
    """One violin (or box) per layer of every per-sample, per-channel attention value.

    ``values``: layer -> ``(S, C)`` nested lists or a flat list. At most ``max_points`` values per
    layer are drawn (evenly strided) to keep the figure light.
    """
    if style not in ("violin", "box"):
        raise ValueError(f"style={style!r} is not valid; allowed: 'violin', 'box'")
    _nonempty(values, "values")
    fig = go.Figure()
    seen: set[str] = set()
    for i, (layer, v) in enumerate(values.items()):
        flat = _flatten(v)
        stride = max(1, math.ceil(len(flat) / max_points))
        flat = flat[::stride]
        kind = (kinds or {}).get(layer)
        color = _kind_color(kind, i)
        # x carries the layer, the trace name the kind: one legend entry per kind
        common = dict(x=[layer] * len(flat), y=flat, name=kind or layer, legendgroup=kind or layer,
                      showlegend=kind is not None and kind not in seen)
        seen.add(kind)
        if style == "violin":
            fig.add_trace(go.Violin(**common, line_color=color, box_visible=True, meanline_visible=True,
                                    points=False, spanmode="hard", scalemode="width"))
        else:
            fig.add_trace(go.Box(**common, marker_color=color, boxpoints=False))
    fig.update_yaxes(title_text="attention")  # autorange: IEBN gates often span a few hundredths only
    fig.update_xaxes(title_text="layer", type="category")
    return base_layout(fig, title)


def class_attention_figure(class_mean: Sequence[Sequence[float]], class_names: Sequence[str] | None = None,
                           center: bool = True, sort_channels: bool = False, layer: str = "",
                           title: str | None = None) -> go.Figure:
    """Class x channel heatmap of one layer's mean attention per class.

    ``center``: subtract each channel's mean over classes, showing which channels a class turns
    up or down (class effects are often small next to the channel profile itself).
    """
    rows = [_floats(r) for r in class_mean]
    if not rows or not rows[0]:
        raise ValueError("class_mean is empty: nothing to plot")
    k, c = len(rows), len(rows[0])
    if any(len(r) != c for r in rows):
        raise ValueError("class_mean rows must all have the same number of channels")
    names = [str(n) for n in (class_names if class_names is not None else range(k))]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} entries for {k} classes")
    finite = [[v for v in col if not math.isnan(v)] for col in zip(*rows)]
    col_mean = [sum(col) / len(col) if col else 0.0 for col in finite]
    z = [[v - col_mean[j] for j, v in enumerate(r)] for r in rows] if center else rows
    order = sorted(range(c), key=lambda j: -col_mean[j]) if sort_channels else list(range(c))
    z = [[r[j] for j in order] for r in z]
    z = [[None if math.isnan(v) else v for v in r] for r in z]
    if center:
        bound = max((abs(v) for r in z for v in r if v is not None), default=1.0) or 1.0
        scale = dict(colorscale="RdBu", zmid=0, zmin=-bound, zmax=bound,
                     colorbar=dict(title="minus channel mean"))
    else:
        scale = dict(colorscale=ATTENTION_COLORSCALE, colorbar=dict(title="attention"))
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(c)), y=names, customdata=[order] * k, **scale,
        hovertemplate="class %{y}<br>channel %{customdata}<br>%{z:.3f}<extra></extra>"))
    fig.update_xaxes(title_text="channel rank (by mean attention)" if sort_channels else "channel")
    fig.update_yaxes(title_text="class", type="category", autorange="reversed")
    return base_layout(fig, title or f"Class-conditional attention, {layer}".rstrip(", "), height=420)


def sample_attention_figure(sample: Sequence[float], mean: Sequence[float], low: Sequence[float] | None = None,
                            high: Sequence[float] | None = None, layer: str = "", label: str = "sample",
                            title: str | None = None) -> go.Figure:
    """One sample's attention per channel (markers) against the layer's mean (line) and a quantile band."""
    sample, mean = _floats(sample), _floats(mean)
    if not sample or len(sample) != len(mean):
        raise ValueError(f"sample ({len(sample)}) and mean ({len(mean)}) must be non-empty and equally long")
    x = list(range(len(sample)))
    fig = go.Figure()
    if low is not None and high is not None:
        low, high = _floats(low), _floats(high)
        fig.add_trace(go.Scatter(x=x + x[::-1], y=high + low[::-1], fill="toself", fillcolor="rgba(31,119,180,0.15)",
                                 line=dict(width=0), name="quantile band", hoverinfo="skip"))
    # markers, not bars: bars would pin the axis at 0 and flatten differences of a few hundredths
    fig.add_trace(go.Scatter(x=x, y=sample, mode="markers", name=label, marker=dict(color=PALETTE[4], size=9)))
    fig.add_trace(go.Scatter(x=x, y=mean, mode="lines", name="mean over samples", line=dict(color=PALETTE[0])))
    fig.update_xaxes(title_text="channel")
    fig.update_yaxes(title_text="attention")
    return base_layout(fig, title or f"Attention of one sample, {layer}".rstrip(", "))


def channel_attention_figure(values_by_class: Mapping[str, Sequence[float]], layer: str = "",
                             channel: int | None = None,
                             title: str | None = None) -> go.Figure:
    """Box per class of one channel's attention across samples."""
    _nonempty(values_by_class, "values_by_class")
    fig = go.Figure()
    for i, (name, vals) in enumerate(values_by_class.items()):
        fig.add_trace(go.Box(y=_floats(vals), name=str(name), marker_color=PALETTE[i % len(PALETTE)],
                             boxpoints="outliers", showlegend=False))
    fig.update_xaxes(title_text="class", type="category")
    fig.update_yaxes(title_text="attention")
    return base_layout(fig, title or f"Attention of channel {channel} in {layer} by class")


def attention_spread_figure(spread: Mapping[str, Mapping[str, float]],
                            title: str = "Attention spread per layer (std over samples, mean over channels)"
                            ) -> go.Figure:
    """``spread``: series name (model or kind) -> layer -> spread; one line per series."""
    _nonempty(spread, "spread")
    fig = go.Figure()
    for i, (name, per_layer) in enumerate(spread.items()):
        fig.add_trace(go.Scatter(x=list(per_layer), y=_floats(per_layer.values()), mode="lines+markers", name=name,
                                 line=dict(color=PALETTE[i % len(PALETTE)])))
    fig.update_xaxes(title_text="layer", type="category")
    fig.update_yaxes(title_text="std of attention across samples", rangemode="tozero")
    return base_layout(fig, title)


def attention_noise_shift_figure(levels: Sequence[float], shift: Mapping[str, Sequence[float]],
                                 title: str = "Attention shift under injected batch-statistic noise") -> go.Figure:
    """Left: layer x noise level heatmap of the mean absolute attention change against the clean
    forward; right: the mean over layers against the noise level."""
    _nonempty(shift, "shift")
    levels = _floats(levels)
    if any(len(v) != len(levels) for v in shift.values()):
        raise ValueError("every layer's shift must have one value per noise level")
    layers = list(shift)
    z = [_floats(shift[layer]) for layer in layers]
    mean = [sum(col) / len(col) for col in zip(*z)]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.2,
                        subplot_titles=("per layer", "mean over layers"))
    colorbar_x = fig.layout.xaxis.domain[1] + 0.01  # right of the heatmap, clear of the line plot's axis
    fig.add_trace(go.Heatmap(z=z, x=[f"{lv:g}" for lv in levels], y=layers, colorscale="Magma",
                             colorbar=dict(title="|Δa|", x=colorbar_x, thickness=14),
                             hovertemplate="layer %{y}<br>level %{x}<br>|Δa| %{z:.4f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=levels, y=mean, mode="lines+markers", name="mean |Δa|",
                             line=dict(color=PALETTE[1])), row=1, col=2)
    fig.update_xaxes(title_text="noise level", type="category", row=1, col=1)
    fig.update_xaxes(title_text="noise level", row=1, col=2)
    fig.update_yaxes(autorange="reversed", type="category", row=1, col=1)
    fig.update_yaxes(title_text="mean |attention change|", rangemode="tozero", row=1, col=2)
    return base_layout(fig, title, height=max(380, 16 * len(layers) + 160))


def attribution_correlation_figure(rho: Mapping[str, Mapping[str, float]],
                                   title: str = "Spearman rank correlation of attention and attribution per layer"
                                   ) -> go.Figure:
    """``rho``: attribution method -> layer -> Spearman rho (NaN where undefined)."""
    _nonempty(rho, "rho")
    fig = go.Figure()
    for i, (method, per_layer) in enumerate(rho.items()):
        ys = [None if v is None or math.isnan(float(v)) else float(v) for v in per_layer.values()]
        fig.add_trace(go.Bar(x=list(per_layer), y=ys, name=method, marker_color=PALETTE[i % len(PALETTE)]))
    fig.add_hline(y=0, line=dict(color="gray", width=1))
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="layer", type="category")
    fig.update_yaxes(title_text="Spearman ρ", range=[-1, 1])
    return base_layout(fig, title)


def attribution_scatter_figure(attention: Sequence[float], attribution: Mapping[str, Sequence[float]],
                               layer: str = "", title: str | None = None) -> go.Figure:
    """Per channel of one layer: mean attention (x) against each method's mean attribution (y),
    attributions scaled to their largest magnitude so methods share an axis."""
    attention = _floats(attention)
    _nonempty(attribution, "attribution")
    fig = go.Figure()
    for i, (method, values) in enumerate(attribution.items()):
        values = _floats(values)
        if len(values) != len(attention):
            raise ValueError(f"attribution[{method!r}] has {len(values)} channels, attention {len(attention)}")
        top = max((abs(v) for v in values), default=0.0) or 1.0
        fig.add_trace(go.Scatter(x=attention, y=[v / top for v in values], mode="markers", name=method,
                                 text=[f"channel {c}" for c in range(len(values))],
                                 marker=dict(color=PALETTE[i % len(PALETTE)], size=8, opacity=0.8)))
    fig.update_xaxes(title_text="mean attention")
    fig.update_yaxes(title_text="mean attribution (scaled to max |·|)")
    return base_layout(fig, title or f"Channel attention vs attribution, {layer}".rstrip(", "))
