import plotly.graph_objects as go

from workbench import report, widgets


def _build(result, level):
    return go.Figure(go.Scatter(x=[0, 1], y=result, name=f"level {level}"))


def test_interactive_figure_updates_in_place_and_caches():
    calls = []

    def compute(level):
        calls.append(level)
        return [level, 2 * level]

    slider = widgets.noise_level_slider(0.5, levels=[0.0, 0.5, 1.0])
    panel = widgets.InteractiveFigure({"level": slider}, compute, _build)
    figure = panel.figure
    assert list(figure.data[0].y) == [0.5, 1.0]
    slider.value = 1.0
    assert panel.figure is figure, "the same FigureWidget is updated, not replaced"
    assert list(figure.data[0].y) == [1.0, 2.0]
    slider.value = 0.5
    assert list(figure.data[0].y) == [0.5, 1.0]
    assert calls == [0.5, 1.0], "a setting already computed is served from the cache"


def _front_end_messages(figure) -> list[str]:
    """The names of the plotly.js calls the widget sends its front end from now on."""
    names = ["_py2js_addTraces", "_py2js_deleteTraces", "_py2js_restyle", "_py2js_relayout", "_py2js_update",
             "_py2js_animate", "_py2js_removeLayoutProps", "_py2js_removeTraceProps"]
    sent: list[str] = []
    figure.observe(lambda change: sent.append(change["name"]) if change["new"] else None, names=names)
    return sent


def _bars(result, level):
    figure = go.Figure([go.Bar(x=["bn", "iebn"], y=result, error_y=dict(type="data", array=[0.1, 0.1])),
                        go.Scatter(y=result, mode="lines", name="loss")])
    if level > 0.5:  # a property only the first figure has must not survive the update
        figure.data[0].error_y = None
    return figure.update_layout(title=f"level {level}")


def test_a_new_setting_reaches_the_front_end_as_one_update():
    slider = widgets.noise_level_slider(0.0, levels=[0.0, 1.0])
    panel = widgets.InteractiveFigure({"level": slider}, lambda level: [level, 2 * level], _bars)
    sent = _front_end_messages(panel.figure)
    slider.value = 1.0
    # deleting and re-adding the traces would draw an empty plot, then the new data under the old title
    assert sent == ["_py2js_update"]
    assert [list(t.y) for t in panel.figure.data] == [[1.0, 2.0], [1.0, 2.0]]
    assert panel.figure.layout.title.text == "level 1.0"
    assert not panel.figure.data[0].error_y.array


def test_other_trace_types_replace_the_traces():
    def build(result, level):
        trace = go.Bar(y=result) if level > 0.5 else go.Scatter(y=result)
        return go.Figure(trace, layout=dict(title=f"level {level}"))

    slider = widgets.noise_level_slider(0.0, levels=[0.0, 1.0])
    panel = widgets.InteractiveFigure({"level": slider}, lambda level: [level, 3 * level], build)
    slider.value = 1.0
    assert [(t.type, list(t.y)) for t in panel.figure.data] == [("bar", [1.0, 3.0])]
    assert panel.figure.layout.title.text == "level 1.0"


def test_failure_is_shown_next_to_the_control():
    def compute(level):
        if level > 0.5:
            raise RuntimeError("diverged")
        return [level, level]

    slider = widgets.noise_level_slider(0.0, levels=[0.0, 1.0])
    panel = widgets.InteractiveFigure({"level": slider}, compute, _build)
    slider.value = 1.0
    assert "diverged" in panel.status.value
    assert list(panel.figure.data[0].y) == [0.0, 0.0]


def test_batch_mode_shows_static_figure(monkeypatch):
    monkeypatch.setenv(report.BATCH_ENV_VAR, "1")
    slider = widgets.prune_ratio_slider(0.3, options=[0.1, 0.3])
    assert widgets.static_or_interactive({"ratio": slider}, lambda ratio: [ratio, ratio],
                                         lambda r, ratio: _build(r, ratio)) is None
    monkeypatch.delenv(report.BATCH_ENV_VAR)
    assert not report.is_batch()


def test_bound_range_follows_its_source_before_the_figure_recomputes():
    import ipywidgets

    channels = {"layer1": 16, "layer3": 64}
    stage = widgets.dropdown(list(channels), "layer3", "stage")
    channel = ipywidgets.IntSlider(value=-1, min=-1, max=0)
    widgets.bind_range(channel, stage, lambda s: (-1, channels[s] - 1))
    assert (channel.min, channel.max) == (-1, 63)

    seen = []

    def compute(stage, channel):
        if not -1 <= channel < channels[stage]:
            raise ValueError(f"channel {channel} out of range for {stage}")
        seen.append((stage, channel))
        return [channel, channel]

    panel = widgets.InteractiveFigure({"stage": stage, "channel": channel}, compute,
                                      lambda r, stage, channel: _build(r, channel))
    channel.value = 60
    stage.value = "layer1"
    assert (channel.max, channel.value) == (15, 15), "the value is clamped into the new stage's range"
    assert panel.status.value == "", "no out-of-range combination reached the computation"
    assert seen[-1] == ("layer1", 15)
    stage.value = "layer3"
    assert channel.max == 63 and channel.value == 15
