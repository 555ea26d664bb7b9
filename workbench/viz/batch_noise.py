"""Figures of the batch-noise notebook (01): accuracy under noise, training curves, estimation
noise, gradient noise scale and GSNR, coupling gap, IEBN gates under noise, the mix attack.

Pure builders: plain data from ``workbench.experiments.batch_noise`` (or re-read JSON) in,
``go.Figure`` out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from workbench.viz.common import PALETTE, base_layout

NORM_COLORS = {"bn": PALETTE[0], "iebn": PALETTE[1], "none": PALETTE[2]}
NORM_NAMES = {"bn": "BN", "iebn": "IEBN", "none": "no norm"}


MIX_ARM_NAMES = {"separate": "single-source batches", "mixed": "mixed batches",
                 "separate-source-stats": "single-source batches, per-source BN statistics"}


def _color(norm: str, i: int = 0) -> str:
    return NORM_COLORS.get(norm, PALETTE[(i + 3) % len(PALETTE)])


def _name(norm: str) -> str:
    return NORM_NAMES.get(norm, norm)


def _ramp(n: int, scale: str = "Viridis") -> list[str]:
    if n <= 1:
        return sample_colorscale(scale, [0.2])
    return sample_colorscale(scale, [0.9 * i / (n - 1) for i in range(n)])


def _rgba(color: str, alpha: float) -> str:
    if color.startswith("#") and len(color) == 7:
        r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
        return f"rgba({r},{g},{b},{alpha})"
    if color.startswith("rgb("):
        return color.replace("rgb(", "rgba(").replace(")", f",{alpha})")
    return color


def accuracy_vs_level_figure(summary: Sequence[Mapping], title: str = "Clean test accuracy vs training noise level",
                             kind: str | None = None) -> go.Figure:
    """One panel per batch size: mean +- std over seeds per norm against the noise level; models
    without normalisation (trained at level 0 only) as a horizontal band."""
    sizes = sorted({r["batch_size"] for r in summary})
    if not sizes:
        raise ValueError("summary is empty")
    levels = sorted({r["level"] for r in summary})
    fig = make_subplots(rows=1, cols=len(sizes), shared_yaxes=True,
                        subplot_titles=[f"batch size {b}" for b in sizes])
    norms = list(dict.fromkeys(r["norm"] for r in summary))
    for col, bs in enumerate(sizes, start=1):
        for i, norm in enumerate(norms):
            pts = sorted((r for r in summary if r["norm"] == norm and r["batch_size"] == bs), key=lambda r: r["level"])
            if not pts:
                continue
            color = _color(norm, i)
            if len(pts) == 1 and pts[0]["level"] == 0.0 and len(levels) > 1:
                m, s = pts[0]["mean"], pts[0]["std"]
                xs = [levels[0], levels[-1]]
                fig.add_trace(go.Scatter(x=xs + xs[::-1], y=[m + s] * 2 + [m - s] * 2, fill="toself", mode="lines",
                                         fillcolor=_rgba(color, 0.15), line=dict(width=0), hoverinfo="skip",
                                         showlegend=False, legendgroup=norm), row=1, col=col)
                fig.add_trace(go.Scatter(x=xs, y=[m, m], mode="lines", line=dict(color=color, dash="dash"),
                                         name=f"{_name(norm)} (level 0 only)", legendgroup=norm,
                                         showlegend=col == 1), row=1, col=col)
                continue
            fig.add_trace(go.Scatter(
                x=[r["level"] for r in pts], y=[r["mean"] for r in pts],
                error_y=dict(type="data", array=[r["std"] for r in pts], visible=True),
                mode="lines+markers", name=_name(norm), legendgroup=norm, showlegend=col == 1,
                line=dict(color=color), customdata=[[r["n"]] for r in pts],
                hovertemplate="level %{x}<br>acc %{y:.3f} ± %{error_y.array:.3f} (n=%{customdata[0]})"),
                row=1, col=col)
    fig.update_xaxes(title_text="noise level" + (f" ({kind})" if kind else ""))
    fig.update_yaxes(title_text="test accuracy", row=1, col=1)
    return base_layout(fig, title)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def loss_curves_figure(runs: Sequence[Mapping], smooth: int = 5,
                       title: str = "Training loss per step under noise") -> go.Figure:
    """Per-step training loss (running mean over ``smooth`` steps), one panel per norm, one colour
    per noise level. ``runs``: ``{"norm", "level", "losses"}`` dicts."""
    norms = list(dict.fromkeys(r["norm"] for r in runs))
    if not norms:
        raise ValueError("runs is empty")
    levels = sorted({r["level"] for r in runs})
    colors = dict(zip(levels, _ramp(len(levels), "Plasma")))
    fig = make_subplots(rows=1, cols=len(norms), shared_yaxes=True, subplot_titles=[_name(n) for n in norms])
    for col, norm in enumerate(norms, start=1):
        for r in sorted((r for r in runs if r["norm"] == norm), key=lambda r: r["level"]):
            ys = [min(v, 1e3) if math.isfinite(v) else None for v in r["losses"]]
            fig.add_trace(go.Scatter(y=_smooth([v if v is not None else 1e3 for v in ys], smooth), mode="lines",
                                     name=f"level {r['level']:g}", legendgroup=str(r["level"]),
                                     showlegend=col == 1, line=dict(color=colors[r["level"]], width=1.5)),
                          row=1, col=col)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="train loss", type="log", row=1, col=1)
    return base_layout(fig, title)


def estimation_noise_figure(estimation: Mapping[str, Mapping],
                            title: str = "BN estimation noise per layer vs batch size") -> go.Figure:
    """RMS deviation of batch mean (left) and variance (right) from population statistics, per
    layer (thin, coloured by depth) and averaged over layers (bold), with the 1/sqrt(B) slope."""
    if not estimation:
        raise ValueError("estimation is empty")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("batch mean: RMS (mu_B - mu) / sigma",
                                                        "batch variance: RMS (s_B^2 / sigma^2 - 1)"))
    dashes = ("solid", "dot", "dash")
    for i, (norm, est) in enumerate(estimation.items()):
        sizes = est["batch_sizes"]
        layers = list(est["layers"].items())
        depth = _ramp(len(layers), "Viridis")
        for col, key in ((1, "mean_dev"), (2, "var_dev")):
            for j, (name, lay) in enumerate(layers):
                fig.add_trace(go.Scatter(x=sizes, y=lay[key], mode="lines", opacity=0.45,
                                         line=dict(color=depth[j], width=1, dash=dashes[i % 3]),
                                         name=f"{_name(norm)} {name}", legendgroup=f"{norm}-layers",
                                         showlegend=False, hovertemplate=f"{name}<br>B=%{{x}}: %{{y:.3g}}"),
                              row=1, col=col)
            avg = [sum(lay[key][k] for _, lay in layers) / len(layers) for k in range(len(sizes))]
            fig.add_trace(go.Scatter(x=sizes, y=avg, mode="lines+markers", name=f"{_name(norm)} (mean of layers)",
                                     legendgroup=norm, showlegend=col == 1,
                                     line=dict(color=_color(norm, i), width=3, dash=dashes[i % 3])), row=1, col=col)
            ref = [avg[0] * math.sqrt(sizes[0] / b) for b in sizes]
            fig.add_trace(go.Scatter(x=sizes, y=ref, mode="lines", line=dict(color="gray", dash="dot", width=1),
                                     name="∝ 1/√B", showlegend=col == 1 and i == 0, legendgroup="ref"),
                          row=1, col=col)
    fig.update_xaxes(title_text="batch size B", type="log")
    fig.update_yaxes(type="log")
    return base_layout(fig, title)


def _records(log: Mapping) -> list[Mapping]:
    return list(log.get("records", [])) if isinstance(log, Mapping) else list(log.records)


def probes_over_training_figure(probe_logs: Mapping[str, Mapping[str, Mapping]],
                                title: str = "Gradient noise scale and GSNR over training") -> go.Figure:
    """``B_simple`` (ratio of the moving averages) and the network-wide GSNR (variance-weighted
    and median over parameters) against the step, per norm. ``probe_logs``: ``{norm: {probe name:
    log dict}}`` as written by the probes."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("B_simple = tr Σ / |G|²", "micro-batch GSNR"))
    for i, (norm, logs) in enumerate(probe_logs.items()):
        color = _color(norm, i)
        gns = _records(logs.get("gradient_noise_scale", {}))
        if gns:
            ys = [r.get("b_simple") for r in gns]
            ys = [y if isinstance(y, (int, float)) and y > 0 else None for y in ys]
            fig.add_trace(go.Scatter(x=[r["step"] for r in gns], y=ys, mode="lines+markers", name=_name(norm),
                                     legendgroup=norm, line=dict(color=color)), row=1, col=1)
        snr = _records(logs.get("gsnr", {}))
        if snr:
            steps = [r["step"] for r in snr]
            fig.add_trace(go.Scatter(x=steps, y=[r.get("weighted") for r in snr], mode="lines+markers",
                                     name=f"{_name(norm)} weighted", legendgroup=norm, showlegend=False,
                                     line=dict(color=color)), row=1, col=2)
            fig.add_trace(go.Scatter(x=steps, y=[r.get("median") for r in snr], mode="lines",
                                     name=f"{_name(norm)} median", legendgroup=norm, showlegend=False,
                                     line=dict(color=color, dash="dot")), row=1, col=2)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="samples", type="log", row=1, col=1)
    fig.update_yaxes(title_text="GSNR (solid: variance-weighted, dotted: median)", row=1, col=2)
    return base_layout(fig, title)


def gsnr_layers_figure(gsnr_log: Mapping, statistic: str = "median",
                       title: str = "Per-layer micro-batch GSNR over training") -> go.Figure:
    """Heatmap layer x step of the per-layer GSNR ``statistic`` (``"mean"`` or ``"median"``)."""
    records = _records(gsnr_log)
    if not records:
        raise ValueError("gsnr_log has no records")
    layers = list(records[0]["layers"])
    z = [[r["layers"].get(lay, {}).get(statistic) for r in records] for lay in layers]
    fig = go.Figure(go.Heatmap(z=z, x=[r["step"] for r in records], y=layers, colorscale="Viridis",
                               colorbar=dict(title=f"GSNR ({statistic})")))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="layer", autorange="reversed", type="category")
    return base_layout(fig, title, height=max(420, 16 * len(layers)))


def coupling_gap_figure(coupling: Mapping[str, Mapping],
                        title: str = "BN coupling gap vs micro-batch size") -> go.Figure:
    """‖mean micro-batch gradient − full-batch gradient‖ / ‖full-batch gradient‖ per norm."""
    fig = go.Figure()
    for i, (norm, res) in enumerate(coupling.items()):
        fig.add_trace(go.Scatter(x=res["micro_sizes"], y=[max(g, 1e-12) for g in res["gap"]], mode="lines+markers",
                                 name=_name(norm), line=dict(color=_color(norm, i))))
    fig.update_xaxes(title_text="micro-batch size b", type="log")
    fig.update_yaxes(title_text="relative gap", type="log", exponentformat="power")
    return base_layout(fig, title)


def attention_response_figure(injected: Mapping | None, trained: Mapping | None,
                              title: str = "IEBN gates vs noise level") -> go.Figure:
    """Mean (top) and spread (bottom) of IEBN gates per layer: left, a clean-trained model under
    injected noise (training-mode forward); right, models trained at each level (eval, clean
    inputs). Lines coloured by depth."""
    panels = [("noise injected into a clean-trained model", injected), ("model trained at that noise level", trained)]
    panels = [(t, d) for t, d in panels if d]
    if not panels:
        raise ValueError("no attention data")
    fig = make_subplots(rows=2, cols=len(panels), shared_xaxes=True, subplot_titles=[t for t, _ in panels],
                        vertical_spacing=0.08)
    for col, (_, data) in enumerate(panels, start=1):
        layers = list(data["layers"].items())
        colors = _ramp(len(layers), "Viridis")
        for j, (name, stats) in enumerate(layers):
            for row, key in ((1, "mean"), (2, "std")):
                fig.add_trace(go.Scatter(x=data["levels"], y=stats[key], mode="lines+markers",
                                         line=dict(color=colors[j], width=1.5), marker=dict(size=4), name=name,
                                         legendgroup=name, showlegend=col == 1 and row == 1), row=row, col=col)
    fig.update_xaxes(title_text="noise level", row=2)
    fig.update_yaxes(title_text="gate mean", row=1, col=1)
    fig.update_yaxes(title_text="gate std (samples × channels)", row=2, col=1)
    return base_layout(fig, title, height=620)


def mix_attack_figure(mix: Mapping[str, Mapping], title: str = "Mix-dataset attack: accuracy per source") -> go.Figure:
    """Grouped bars per norm: accuracy on each source's test split after training on both sources
    with single-source batches (``separate``, the control) and with batches mixing the sources
    (``mixed``, the attack); ``alone``: trained on the first source only. ``mix``: ``{norm: {arm:
    {source: {"mean", "std"}}, "alone": {"mean", "std"}}}``."""
    norms = list(mix)
    if not norms:
        raise ValueError("mix is empty")
    bars: list[tuple[str, str | None]] = []
    for norm in norms:
        for arm, value in mix[norm].items():
            if arm == "alone":
                key = ("alone", None)
                if key not in bars:
                    bars.append(key)
                continue
            for source in value:
                if source != "all" and (arm, source) not in bars:
                    bars.append((arm, source))
    order = {"alone": 0, "separate": 1, "separate-source-stats": 2, "mixed": 3}
    bars.sort(key=lambda b: (order.get(b[0], 3), b[1] or ""))
    separate, mixed = _ramp(4, "Blues"), _ramp(4, "Reds")
    fig = go.Figure()
    for i, (arm, source) in enumerate(bars):
        if arm == "alone":
            label, color = "first source only (no mixing)", "#7f7f7f"
            values = [mix[n].get("alone", {}) for n in norms]
        else:
            label = f"{source}: {MIX_ARM_NAMES.get(arm, arm)}"
            color = (mixed if arm == "mixed" else separate)[1 + i % 3]
            values = [mix[n].get(arm, {}).get(source, {}) for n in norms]
        fig.add_trace(go.Bar(x=[_name(n) for n in norms], y=[v.get("mean") for v in values],
                             error_y=dict(type="data", array=[v.get("std", 0) for v in values]), name=label,
                             marker_color=color))
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text="test accuracy")
    return base_layout(fig, title)


def accuracy_at_figure(point: Mapping[str, Mapping], level: float, batch_size: int,
                       losses: Mapping[str, Sequence[float]] | None = None) -> go.Figure:
    """What the sliders show: test accuracy per norm at the grid point nearest to
    ``(level, batch_size)`` (bars: mean +- std, dots: seeds) and, with ``losses``, the training loss
    of each norm's seed-0 run there."""
    cols = 2 if losses else 1
    fig = make_subplots(rows=1, cols=cols, subplot_titles=["test accuracy", "training loss"][:cols])
    norms = list(point)
    for i, norm in enumerate(norms):
        p = point[norm]
        fig.add_trace(go.Bar(x=[_name(norm)], y=[p["mean"]], error_y=dict(type="data", array=[p["std"]]),
                             marker_color=_color(norm, i), name=_name(norm), legendgroup=norm,
                             hovertemplate=f"level {p['level']:g}, batch {p['batch_size']}<br>%{{y:.3f}}"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=[_name(norm)] * len(p.get("accs", [])), y=p.get("accs", []), mode="markers",
                                 marker=dict(color="black", size=6), showlegend=False, hoverinfo="y"), row=1, col=1)
        if losses and norm in losses:
            fig.add_trace(go.Scatter(y=_smooth(losses[norm], 5), mode="lines", line=dict(color=_color(norm, i)),
                                     name=_name(norm), legendgroup=norm, showlegend=False), row=1, col=2)
    fig.update_yaxes(range=[0, 1.02], title_text="accuracy", row=1, col=1)
    if losses:
        fig.update_yaxes(type="log", title_text="train loss", row=1, col=2)
        fig.update_xaxes(title_text="step", row=1, col=2)
    return base_layout(fig, f"Noise level {level:g}, batch size {batch_size}")


VERDICT_COLORS = {"supports": "#2ca02c", "contradicts": "#d62728", "inconclusive": "#7f7f7f"}


def _verdict_label(verdict: Mapping) -> str:
    setting = verdict["setting"]
    if "attack" in setting:
        return f"{setting['attack']} @ {setting['level']:g}"
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or verdict["claim"][:30]


def paired_difference_figure(verdicts: Sequence[Mapping], title: str = "Paired differences IEBN - BN (95% CI)",
                             xaxis: str = "paired difference (treatment - reference)") -> go.Figure:
    """Interval plot: per verdict (``Verdict.to_dict()``) the mean paired difference with its 95%
    interval, coloured and labelled by the verdict word, and the zero line."""
    if not verdicts:
        raise ValueError("verdicts is empty; allowed: at least one Verdict.to_dict()")
    fig = go.Figure()
    labels = [_verdict_label(v) for v in verdicts]
    for label, v in zip(labels, verdicts):
        iv = v["interval"]
        fig.add_trace(go.Scatter(
            x=[iv["mean"]], y=[label], mode="markers+text", text=[v["verdict"]], textposition="top center",
            marker=dict(size=11, color=VERDICT_COLORS[v["verdict"]]), name=v["verdict"], legendgroup=v["verdict"],
            showlegend=v["verdict"] not in [t.name for t in fig.data],
            error_x=dict(type="data", symmetric=False, array=[iv["high"] - iv["mean"]],
                         arrayminus=[iv["mean"] - iv["low"]], thickness=2),
            hovertemplate=(f"{label}: %{{x:+.4f}} [{iv['low']:+.4f}, {iv['high']:+.4f}], {iv['n']} seeds; "
                           f"claim: {v['metric']} {v['direction']}<extra></extra>")))
    fig.add_vline(x=0, line=dict(color="black", dash="dot"))
    fig.update_xaxes(title_text=xaxis, zeroline=False)
    fig.update_yaxes(autorange="reversed")
    return base_layout(fig, title, height=max(300, 90 + 60 * len(verdicts)))


def calibration_figure(calibration: Mapping,
                       title: str = "Calibration: fraction of clean accuracy BN keeps") -> go.Figure:
    """Per attack, BN's retained fraction ``acc / clean`` at each candidate level (calibration seed),
    the 50-90% band shaded and the picked levels circled."""
    fig = go.Figure()
    low, high = calibration["band"]
    fig.add_hrect(y0=low, y1=high, fillcolor="#2ca02c", opacity=0.12, line_width=0,
                  annotation_text="calibration band", annotation_position="top left")
    for i, (attack, c) in enumerate(calibration["attacks"].items()):
        retained = {float(k): v for k, v in c["retained"].items()}
        levels = sorted(retained)
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=levels, y=[retained[lv] for lv in levels], mode="lines+markers", name=attack,
                                 line=dict(color=color), hovertemplate=f"{attack}<br>level %{{x:g}}: %{{y:.0%}}"))
        picked = [float(lv) for lv in c["levels"]]
        fig.add_trace(go.Scatter(x=picked, y=[retained[lv] for lv in picked], mode="markers", showlegend=False,
                                 marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(color=color, width=2)),
                                 hoverinfo="skip"))
    fig.update_xaxes(title_text="noise level")
    fig.update_yaxes(title_text="BN accuracy / clean accuracy", tickformat=".0%")
    return base_layout(fig, f"{title} (seed {calibration['seed']}, clean {calibration['clean_acc']:.3f})")
