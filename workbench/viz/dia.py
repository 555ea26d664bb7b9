"""Figures of DIA-LSTM's ties between the layers of a stage: cross-layer attention correlation,
gate activations and state norms per block, the shared-vs-independent ablation and the
stabilisation study (no skip connections, no BN) and its paired-seed trial. Pure builders."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.viz.common import PALETTE, base_layout

GATE_COLORS = {"i": PALETTE[0], "f": PALETTE[1], "o": PALETTE[2], "g": PALETTE[3], "h": PALETTE[4]}
GATE_NAMES = {"i": "input gate i", "f": "forget gate f", "o": "output gate o", "g": "candidate g",
              "h": "hidden state h"}


def _nonempty(mapping: Mapping, name: str) -> None:
    if not mapping:
        raise ValueError(f"{name} is empty: nothing to plot")


def _num(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def correlation_matrices_figure(matrices: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
                                title: str = "Correlation of attention vectors across the blocks of a stage"
                                ) -> go.Figure:
    """Grid of correlation heatmaps: one row per model (e.g. DIA, SE), one column per stage.

    ``matrices``: model -> stage -> ``(L, L)`` matrix over the blocks of that stage.
    """
    _nonempty(matrices, "matrices")
    models = list(matrices)
    stages = list(dict.fromkeys(s for m in matrices.values() for s in m))
    if not stages:
        raise ValueError("matrices holds no stage")
    fig = make_subplots(rows=len(models), cols=len(stages), horizontal_spacing=0.06, vertical_spacing=0.12,
                        subplot_titles=[f"{m} · {s}" for m in models for s in stages])
    for r, model in enumerate(models, start=1):
        for c, stage in enumerate(stages, start=1):
            mat = matrices[model].get(stage)
            if mat is None:
                continue
            mat = [[_num(v) for v in row] for row in mat]
            ticks = [str(i) for i in range(len(mat))]
            fig.add_trace(go.Heatmap(z=mat, x=ticks, y=ticks, zmin=-1, zmax=1, zmid=0, colorscale="RdBu_r",
                                     showscale=(r == 1 and c == 1), colorbar=dict(title="ρ"),
                                     hovertemplate="block %{y} vs %{x}<br>ρ %{z:.3f}<extra></extra>"),
                          row=r, col=c)
            fig.update_xaxes(title_text="block", type="category", row=r, col=c)
            fig.update_yaxes(type="category", autorange="reversed", row=r, col=c)
    return base_layout(fig, title, height=280 * len(models) + 120)


def correlation_by_distance_figure(curves: Mapping[str, Mapping[str, Sequence[float]]],
                                   title: str = "Mean cross-block attention correlation against block distance"
                                   ) -> go.Figure:
    """``curves``: model -> stage -> mean correlation at distance 1, 2, ... (index 0 = distance 1).
    One colour per model, one dash per stage."""
    _nonempty(curves, "curves")
    dashes = ("solid", "dash", "dot", "dashdot", "longdash")
    fig = go.Figure()
    for i, (model, per_stage) in enumerate(curves.items()):
        for j, (stage, values) in enumerate(per_stage.items()):
            ys = [_num(v) for v in values]
            fig.add_trace(go.Scatter(x=list(range(1, len(ys) + 1)), y=ys, mode="lines+markers",
                                     name=f"{model} {stage}", legendgroup=model,
                                     line=dict(color=PALETTE[i % len(PALETTE)], dash=dashes[j % len(dashes)])))
    fig.update_xaxes(title_text="block distance |l - m|", dtick=1)
    fig.update_yaxes(title_text="mean ρ", range=[-1, 1])
    return base_layout(fig, title)


def gate_curves_figure(gates: Mapping[str, Mapping[str, Sequence[float]]],
                       spread: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                       title: str = "DIA-LSTM gate activations over the blocks of each stage") -> go.Figure:
    """One subplot per stage; x = block, one line per gate (``i``, ``f``, ``o``, ``g``) with the mean
    over samples and channels, and an optional ±std band from ``spread`` (same layout)."""
    _nonempty(gates, "gates")
    stages = list(gates)
    fig = make_subplots(rows=1, cols=len(stages), subplot_titles=stages, shared_yaxes=True)
    for c, stage in enumerate(stages, start=1):
        for gate, values in gates[stage].items():
            ys = [float(v) for v in values]
            x = list(range(len(ys)))
            color = GATE_COLORS.get(gate, PALETTE[5])
            if spread is not None and gate in spread.get(stage, {}):
                sd = [float(v) for v in spread[stage][gate]]
                upper = [y + s for y, s in zip(ys, sd)]
                lower = [y - s for y, s in zip(ys, sd)]
                fig.add_trace(go.Scatter(x=x + x[::-1], y=upper + lower[::-1], fill="toself", opacity=0.15,
                                         fillcolor=color, line=dict(width=0), showlegend=False, hoverinfo="skip",
                                         legendgroup=gate), row=1, col=c)
            fig.add_trace(go.Scatter(x=x, y=ys, mode="lines+markers", name=GATE_NAMES.get(gate, gate),
                                     legendgroup=gate, showlegend=c == 1, line=dict(color=color)), row=1, col=c)
        fig.update_xaxes(title_text="block", dtick=1, row=1, col=c)
    fig.update_yaxes(title_text="mean activation", row=1, col=1)
    return base_layout(fig, title)


def state_norms_figure(norms: Mapping[str, Mapping[str, Sequence[float]]],
                       title: str = "DIA-LSTM cell and hidden state per block (RMS over channels)") -> go.Figure:
    """One subplot per stage; x = block, lines for the cell state ``c`` and hidden state ``h``."""
    _nonempty(norms, "norms")
    stages = list(norms)
    fig = make_subplots(rows=1, cols=len(stages), subplot_titles=stages)
    colors = {"c": PALETTE[4], "h": PALETTE[3]}
    names = {"c": "cell state c", "h": "hidden state h"}
    for col, stage in enumerate(stages, start=1):
        for key, values in norms[stage].items():
            ys = [float(v) for v in values]
            fig.add_trace(go.Scatter(x=list(range(len(ys))), y=ys, mode="lines+markers", name=names.get(key, key),
                                     legendgroup=key, showlegend=col == 1,
                                     line=dict(color=colors.get(key, PALETTE[0]))), row=1, col=col)
        fig.update_xaxes(title_text="block", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text="RMS over channels (mean over samples)", row=1, col=1)
    return base_layout(fig, title)


ABLATION_PANELS = (("test_acc", "test accuracy"), ("params", "parameters"),
                   ("mean_corr", "mean cross-block ρ (profile)"), ("mean_corr_sample", "mean cross-block ρ (sample)"))


def ablation_figure(variants: Mapping[str, Mapping[str, float]],
                    title: str = "Shared DIA-LSTM vs independent per-block attention") -> go.Figure:
    """``variants``: name -> {"test_acc", "params", "mean_corr", "mean_corr_sample"} (any subset
    present in at least one variant); one bar panel per quantity."""
    _nonempty(variants, "variants")
    panels = [(k, label) for k, label in ABLATION_PANELS if any(k in v for v in variants.values())]
    if not panels:
        raise ValueError(f"variants hold none of {[k for k, _ in ABLATION_PANELS]}")
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[1] for p in panels])
    names = list(variants)
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(names))]
    for col, (key, _label) in enumerate(panels, start=1):
        ys = [_num(variants[n].get(key)) for n in names]
        fig.add_trace(go.Bar(x=names, y=ys, marker_color=colors, showlegend=False, cliponaxis=False,
                             text=[("" if y is None else (f"{y:,.0f}" if key == "params" else f"{y:.3f}")) for y in ys],
                             textposition="outside"), row=1, col=col)
        # headroom above 1 for the value labels outside the bars
        if key == "test_acc":
            fig.update_yaxes(range=[0, 1.15], row=1, col=col)
        elif key.startswith("mean_corr"):
            fig.update_yaxes(range=[-1, 1.25], row=1, col=col)
    return base_layout(fig, title)


def stabilisation_curves_figure(curves: Mapping[str, Mapping[str, Sequence[float]]], x_title: str = "epoch",
                                log_y: bool = True, x: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                                title: str = "Training loss without skip connections / without BN") -> go.Figure:
    """``curves``: condition (e.g. "no skip", "no BN") -> attention ("none", "se", "dia") -> loss per
    epoch (or per logged step, with the steps in ``x`` laid out the same way; default 1, 2, ...).
    One subplot per condition (own y range), one colour per attention."""
    _nonempty(curves, "curves")
    conditions = list(curves)
    fig = make_subplots(rows=1, cols=len(conditions), subplot_titles=conditions)
    attentions = list(dict.fromkeys(a for c in curves.values() for a in c))
    for col, cond in enumerate(conditions, start=1):
        for attention, values in curves[cond].items():
            i = attentions.index(attention)
            ys = [_num(v) for v in values]
            xs = list((x or {}).get(cond, {}).get(attention, [])) or list(range(1, len(ys) + 1))
            if len(xs) != len(ys):
                raise ValueError(f"x[{cond!r}][{attention!r}] has {len(xs)} values for {len(ys)} losses")
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=attention, legendgroup=attention,
                                     showlegend=col == 1, line=dict(color=PALETTE[i % len(PALETTE)])), row=1, col=col)
        fig.update_xaxes(title_text=x_title, row=1, col=col)
    fig.update_yaxes(type="log" if log_y else "linear")
    fig.update_yaxes(title_text="training loss", row=1, col=1)
    return base_layout(fig, title)


def grad_norm_figure(norms: Mapping[str, Mapping[str, Sequence[float]]], steps: Sequence[int] | None = None,
                     title: str = "Gradient norm per stage during training") -> go.Figure:
    """``norms``: variant -> stage -> gradient L2 norm per logged step. One subplot per stage,
    one line per variant, log scale (vanishing/exploding gradients span decades)."""
    _nonempty(norms, "norms")
    stages = list(dict.fromkeys(s for v in norms.values() for s in v))
    cols = min(len(stages), 3)
    rows = math.ceil(len(stages) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=stages, shared_xaxes=True)
    for i, (variant, per_stage) in enumerate(norms.items()):
        for j, stage in enumerate(stages):
            if stage not in per_stage:
                continue
            ys = [_num(v) for v in per_stage[stage]]
            x = list(steps) if steps is not None and len(steps) == len(ys) else list(range(len(ys)))
            fig.add_trace(go.Scatter(x=x, y=ys, mode="lines", name=variant, legendgroup=variant, showlegend=j == 0,
                                     line=dict(color=PALETTE[i % len(PALETTE)], width=1.5)),
                          row=j // cols + 1, col=j % cols + 1)
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="step", row=rows)
    return base_layout(fig, title, height=300 * rows + 140)


def final_accuracy_figure(acc: Mapping[str, Mapping[str, float]],
                          title: str = "Final test accuracy") -> go.Figure:
    """``acc``: condition -> attention -> accuracy; grouped bars, one group per condition."""
    _nonempty(acc, "acc")
    attentions = list(dict.fromkeys(a for c in acc.values() for a in c))
    fig = go.Figure()
    for i, attention in enumerate(attentions):
        ys = [_num(acc[c].get(attention)) for c in acc]
        fig.add_trace(go.Bar(x=list(acc), y=ys, name=attention, marker_color=PALETTE[i % len(PALETTE)],
                             text=[("" if y is None else f"{y:.3f}") for y in ys], textposition="outside"))
    fig.update_layout(barmode="group")
    fig.update_traces(cliponaxis=False)
    fig.update_yaxes(title_text="top-1", range=[0, 1.15])
    return base_layout(fig, title)


ARM_NAMES = {"none": "no attention", "se": "SE", "dia": "DIA-LSTM"}
VERDICT_COLORS = {"supports": "#2ca02c", "contradicts": "#d62728", "inconclusive": "#7f7f7f"}


def paired_seed_accuracy_figure(rows: Sequence[Mapping], arms: Sequence[str] = ("none", "se", "dia"),
                                chance: float | None = None, metric: str = "acc",
                                title: str = "Final test accuracy per seed and arm") -> go.Figure:
    """One panel per condition: per seed a line through its arms' ``metric`` (the pairing: same seed,
    same initial weights, same batches), diverged runs (``row["diverged"]``) as crosses, ``chance``
    dashed. ``rows``: tidy rows with ``arm``, ``seed``, ``condition``, ``metric`` (and ``diverged``)."""
    if not rows:
        raise ValueError("rows is empty: nothing to plot")
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    arms = [a for a in arms if any(r["arm"] == a for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    value = {(r["condition"], r["seed"], r["arm"]): r for r in rows}
    fig = make_subplots(rows=1, cols=len(conditions), subplot_titles=conditions, shared_yaxes=True)
    for col, condition in enumerate(conditions, start=1):
        for i, seed in enumerate(seeds):
            got = [value.get((condition, seed, a)) for a in arms]
            color = PALETTE[i % len(PALETTE)]
            fig.add_trace(go.Scatter(
                x=[ARM_NAMES.get(a, a) for a in arms], y=[None if r is None else r[metric] for r in got],
                mode="lines+markers", name=f"seed {seed}", legendgroup=f"seed {seed}", showlegend=col == 1,
                line=dict(color=color), hovertemplate=f"seed {seed}, %{{x}}: %{{y:.4f}}<extra>{condition}</extra>",
                marker=dict(size=9, color=color,
                            symbol=["x" if r is not None and r.get("diverged") else "circle" for r in got])), 1, col)
        if chance is not None:
            fig.add_hline(y=chance, line=dict(color="black", dash="dot"), row=1, col=col,
                          annotation_text="chance" if col == 1 else None)
    fig.update_yaxes(title_text=f"final test {metric} (x: diverged, counted as chance)", row=1, col=1)
    return base_layout(fig, title)


def arm_difference_figure(verdicts: Sequence[Mapping],
                          title: str = "Paired differences of final accuracy (95% CI)") -> go.Figure:
    """Per verdict (``Verdict.to_dict()`` with a ``condition`` setting) the mean paired difference
    treatment - reference with its interval, coloured and labelled by the verdict word; zero dotted."""
    if not verdicts:
        raise ValueError("verdicts is empty; allowed: at least one Verdict.to_dict()")
    fig = go.Figure()
    for v in verdicts:
        iv = v["interval"]
        label = (f"{ARM_NAMES.get(v['treatment'], v['treatment'])} - {ARM_NAMES.get(v['reference'], v['reference'])}"
                 f", {v['setting'].get('condition', '')}")
        fig.add_trace(go.Scatter(
            x=[iv["mean"]], y=[label], mode="markers+text", text=[v["verdict"]], textposition="top center",
            marker=dict(size=11, color=VERDICT_COLORS[v["verdict"]]), name=v["verdict"],
            showlegend=v["verdict"] not in [t.name for t in fig.data],
            error_x=dict(type="data", symmetric=False, array=[iv["high"] - iv["mean"]],
                         arrayminus=[iv["mean"] - iv["low"]], thickness=2),
            hovertemplate=(f"{label}: %{{x:+.4f}} [{iv['low']:+.4f}, {iv['high']:+.4f}], {iv['n']} seeds"
                           "<extra></extra>")))
    fig.add_vline(x=0, line=dict(color="black", dash="dot"))
    fig.update_xaxes(title_text="paired difference of final test accuracy (treatment - reference)", zeroline=False)
    fig.update_yaxes(autorange="reversed")
    return base_layout(fig, title, height=max(300, 90 + 60 * len(verdicts)))
