"""Every attention / DIA figure builder, called on small plain data."""

import math

import plotly.graph_objects as go
import pytest

from workbench.viz import attention as va
from workbench.viz import dia as vd


def _trace_types(fig):
    return [type(t).__name__ for t in fig.data]


def test_heatmap_pads_and_sorts_channels():
    means = {"layer1.0.bn1": [0.1, 0.9, 0.5], "layer2.0.bn1": [0.3, 0.2, 0.7, 0.4, 0.6]}
    fig = va.attention_heatmap_figure(means)
    hm = fig.data[0]
    assert isinstance(fig, go.Figure) and _trace_types(fig) == ["Heatmap"]
    assert list(hm.z[0]) == [0.1, 0.9, 0.5, None, None]
    sorted_fig = va.attention_heatmap_figure(means, sort_channels=True)
    assert list(sorted_fig.data[0].z[0][:3]) == [0.9, 0.5, 0.1]
    assert list(sorted_fig.data[0].customdata[0][:3]) == [1, 2, 0]  # hover keeps the original channel
    with pytest.raises(ValueError, match="empty"):
        va.attention_heatmap_figure({})


@pytest.mark.parametrize("style", ["violin", "box"])
def test_distribution_figure(style):
    values = {"a": [[0.1, 0.2], [0.3, 0.4]], "b": [0.5, 0.6, 0.7]}
    fig = va.attention_distribution_figure(values, kinds={"a": "iebn", "b": "se"}, style=style, max_points=2)
    assert len(fig.data) == 2
    assert len(fig.data[0].y) == 2 and len(fig.data[1].y) == 2  # strided down to max_points
    assert list(fig.data[0].x) == ["a", "a"] and fig.data[0].name == "iebn" and fig.data[0].showlegend
    with pytest.raises(ValueError, match="style"):
        va.attention_distribution_figure(values, style="bar")


def test_class_attention_figure_centres_and_handles_empty_classes():
    rows = [[0.2, 0.4], [0.4, 0.6], [float("nan"), float("nan")]]
    fig = va.class_attention_figure(rows, ["0", "1", "2"], center=True, layer="l")
    z = fig.data[0].z
    assert z[0][0] == pytest.approx(-0.1) and z[1][1] == pytest.approx(0.1)
    assert z[2][0] is None
    raw = va.class_attention_figure(rows, center=False, sort_channels=True)
    assert raw.data[0].z[0][0] == pytest.approx(0.4)  # channel 1 has the larger mean, comes first
    with pytest.raises(ValueError, match="class_names"):
        va.class_attention_figure(rows, ["0"])


def test_sample_and_channel_figures():
    fig = va.sample_attention_figure([0.1, 0.5], [0.2, 0.4], [0.1, 0.3], [0.3, 0.5], layer="l")
    assert _trace_types(fig) == ["Scatter", "Scatter", "Scatter"] and fig.data[1].mode == "markers"
    with pytest.raises(ValueError):
        va.sample_attention_figure([0.1], [0.2, 0.4])
    fig = va.channel_attention_figure({"0": [0.1, 0.2], "1": [0.3]}, layer="l", channel=3)
    assert len(fig.data) == 2 and "channel 3" in fig.layout.title.text


def test_spread_noise_and_attribution_figures():
    fig = va.attention_spread_figure({"iebn": {"a": 0.1, "b": 0.2}, "dia": {"c": 0.3}})
    assert len(fig.data) == 2
    fig = va.attention_noise_shift_figure([0.0, 0.5, 1.0], {"a": [0.0, 0.1, 0.2], "b": [0.0, 0.3, 0.4]})
    assert _trace_types(fig) == ["Heatmap", "Scatter"]
    assert list(fig.data[1].y) == pytest.approx([0.0, 0.2, 0.3])
    with pytest.raises(ValueError, match="one value per noise level"):
        va.attention_noise_shift_figure([0.0, 1.0], {"a": [0.0]})
    fig = va.attribution_correlation_figure({"gradcam": {"a": 0.5, "b": float("nan")}, "conductance": {"a": -0.2}})
    assert list(fig.data[0].y) == [0.5, None]
    fig = va.attribution_scatter_figure([0.1, 0.2, 0.3], {"gradcam": [1.0, -2.0, 0.5]}, layer="a")
    assert list(fig.data[0].y) == pytest.approx([0.5, -1.0, 0.25])
    with pytest.raises(ValueError, match="channels"):
        va.attribution_scatter_figure([0.1], {"gradcam": [1.0, 2.0]})


def test_dia_correlation_figures():
    m = [[1.0, 0.5], [0.5, 1.0]]
    fig = vd.correlation_matrices_figure({"dia": {"layer1": m, "layer2": m}, "se": {"layer1": m}})
    assert len(fig.data) == 3 and all(t.zmin == -1 and t.zmax == 1 for t in fig.data)
    fig = vd.correlation_by_distance_figure({"dia": {"layer1": [0.5, 0.2]}, "se": {"layer1": [0.1, float("nan")]}})
    assert list(fig.data[1].y) == [0.1, None]
    with pytest.raises(ValueError):
        vd.correlation_matrices_figure({})


def test_gate_state_ablation_figures():
    gates = {"layer1": {"i": [0.5, 0.6], "f": [0.4, 0.3], "o": [0.5, 0.5], "g": [0.0, 0.1]}}
    spread = {"layer1": {"i": [0.1, 0.1]}}
    fig = vd.gate_curves_figure(gates, spread)
    assert len(fig.data) == 5  # one band + four lines
    fig = vd.state_norms_figure({"layer1": {"c": [0.1, 0.2], "h": [0.5, 0.6]}, "layer2": {"c": [1.0], "h": [0.4]}})
    assert len(fig.data) == 4
    fig = vd.ablation_figure({"dia": {"test_acc": 0.9, "params": 1000, "mean_corr": 0.5},
                              "se": {"test_acc": 0.8, "params": 900, "mean_corr": math.nan}})
    assert len(fig.data) == 3 and list(fig.data[2].y) == [0.5, None]
    fig = vd.ablation_figure({"dia": {"test_acc": 0.9, "mean_corr_sample": 0.4}})
    assert len(fig.data) == 2 and list(fig.data[1].y) == [0.4]
    with pytest.raises(ValueError, match="none of"):
        vd.ablation_figure({"dia": {"accuracy": 0.9}})


def test_stabilisation_figures():
    curves = {"no skip": {"none": [2.0, 1.0], "dia": [2.0, 0.5]}, "no BN": {"none": [2.3, 2.3]}}
    fig = vd.stabilisation_curves_figure(curves)
    assert len(fig.data) == 3 and fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    fig = vd.stabilisation_curves_figure(curves, x={"no skip": {"none": [0, 10]}}, x_title="step")
    assert list(fig.data[0].x) == [0, 10] and list(fig.data[1].x) == [1, 2]
    with pytest.raises(ValueError, match="losses"):
        vd.stabilisation_curves_figure(curves, x={"no skip": {"none": [0]}})
    fig = vd.grad_norm_figure({"dia": {"layer1": [1.0, 0.5], "layer2": [0.1, 0.2]}, "se": {"layer1": [3.0, 2.0]}},
                              steps=[0, 10])
    assert len(fig.data) == 3 and list(fig.data[0].x) == [0, 10]
    fig = vd.final_accuracy_figure({"no skip": {"none": 0.5, "dia": 0.9}, "no BN": {"none": 0.1}})
    assert len(fig.data) == 2 and list(fig.data[1].y) == [0.9, None]
