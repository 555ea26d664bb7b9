"""ipywidgets controls wired to experiment functions, with a plotly ``FigureWidget`` updated in place.

A control panel is built from a notebook's parameters (the slider starts at the value papermill or
the parameters cell gave), calls an experiment function with the control values, caches results per
setting (a model trained once per setting is never retrained when the slider comes back), and
replaces the figure's data in place. In a papermill run there is no live front end: notebooks show
the static figure for the given parameters as well, through :func:`static_or_interactive`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import plotly.graph_objects as go


def _ipywidgets():
    import ipywidgets

    return ipywidgets


def noise_level_slider(value: float = 0.0, levels: Sequence[float] | None = None, description: str = "noise level"):
    """A slider over the noise levels an experiment computed (or a continuous 0..2 range)."""
    w = _ipywidgets()
    if levels:
        options = sorted({float(v) for v in levels} | {float(value)})
        return w.SelectionSlider(options=options, value=float(value), description=description,
                                 continuous_update=False, layout=w.Layout(width="420px"))
    return w.FloatSlider(value=float(value), min=0.0, max=2.0, step=0.05, description=description,
                         continuous_update=False, layout=w.Layout(width="420px"))


def batch_size_slider(value: int = 64, options: Sequence[int] = (2, 4, 8, 16, 32, 64, 128, 256),
                      description: str = "batch size"):
    w = _ipywidgets()
    options = sorted({int(v) for v in options} | {int(value)})
    return w.SelectionSlider(options=options, value=int(value), description=description, continuous_update=False,
                             layout=w.Layout(width="420px"))


def prune_ratio_slider(value: float = 0.5, options: Sequence[float] | None = None, description: str = "prune ratio"):
    w = _ipywidgets()
    if options:
        options = sorted({round(float(v), 4) for v in options} | {round(float(value), 4)})
        return w.SelectionSlider(options=options, value=round(float(value), 4), description=description,
                                 continuous_update=False, layout=w.Layout(width="420px"))
    return w.FloatSlider(value=float(value), min=0.0, max=0.95, step=0.05, description=description,
                         continuous_update=False, layout=w.Layout(width="420px"))


def dropdown(options: Sequence[Any], value: Any = None, description: str = ""):
    w = _ipywidgets()
    options = list(options)
    return w.Dropdown(options=options, value=value if value is not None else options[0], description=description)


def bind_range(control, source, bounds: Callable[[Any], tuple[int | float, int | float]]):
    """Keep ``control``'s ``min``/``max`` at ``bounds(source.value)`` (e.g. a channel slider whose range
    depends on the chosen layer), now and whenever ``source`` changes; the value is clamped into the new
    range. Bind before handing the controls to :class:`InteractiveFigure`, so the range follows first and
    the figure is recomputed with a valid combination. Returns ``control``."""

    def apply(value: Any) -> None:
        low, high = bounds(value)
        if low > high:
            raise ValueError(f"bounds({value!r}) gave min={low!r} > max={high!r}; allowed: min <= max")
        # Widen before narrowing: ipywidgets refuses a min above the current max (and vice versa).
        if low > control.max:
            control.max = high
            control.min = low
        else:
            control.min = low
            control.max = high

    apply(source.value)
    source.observe(lambda change: apply(change["new"]), names="value")
    return control


class InteractiveFigure:
    """Controls + a ``go.FigureWidget`` whose traces are recomputed when a control changes.

    ``compute(**values)`` does the (expensive) work and is cached per combination of values;
    ``build(result, **values)`` turns its result into a ``go.Figure`` (a pure viz builder). The
    widget's data and layout are replaced in place (:func:`show_in_place`), so the front end redraws
    once, from the old figure straight to the new one.
    """

    def __init__(self, controls: Mapping[str, Any], compute: Callable[..., Any],
                 build: Callable[..., go.Figure], cache_size: int = 64) -> None:
        w = _ipywidgets()
        self.controls = dict(controls)
        self._compute = functools.lru_cache(maxsize=cache_size)(self._call_compute(compute))
        self._build = build
        self._lock = threading.Lock()
        self.status = w.HTML(value="")
        self.progress = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="160px", visibility="hidden"))
        self.figure = go.FigureWidget(self.figure_for(**self.values()))
        for control in self.controls.values():
            control.observe(self._on_change, names="value")
        self.widget = w.VBox([w.HBox([*self.controls.values(), self.progress, self.status]), self.figure])

    @staticmethod
    def _call_compute(compute: Callable[..., Any]) -> Callable[..., Any]:
        def call(items: tuple) -> Any:
            return compute(**dict(items))

        return call

    def values(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def figure_for(self, **values: Any) -> go.Figure:
        result = self._compute(tuple(sorted(values.items())))
        return self._build(result, **values)

    def update(self) -> None:
        values = self.values()
        self.progress.layout.visibility = "visible"
        self.status.value = "computing..."
        try:
            with self._lock:
                show_in_place(self.figure, self.figure_for(**values))
            self.status.value = ""
        except Exception as exc:  # show the failure next to the control instead of a silent dead slider
            self.status.value = f"<span style='color:#cf222e'>{type(exc).__name__}: {exc}</span>"
        finally:
            self.progress.layout.visibility = "hidden"

    def _on_change(self, _change: Mapping) -> None:
        self.update()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def show_in_place(widget: go.FigureWidget, fresh: go.Figure) -> None:
    """Make ``widget`` show ``fresh``'s traces and layout, keeping the widget.

    When both have the same trace types in the same order (a builder called with other values), every
    trace is overwritten property by property (properties only the old trace had are unset) inside one
    ``batch_update``: one ``Plotly.update`` message, one redraw. Deleting and re-adding the traces
    instead sends three messages (delete, add, relayout), and the front end draws an empty plot, then
    the new data under the old layout, before the new figure. A different set of traces is replaced
    that way all the same, since a trace's type cannot be restyled.
    """
    if [trace.type for trace in widget.data] != [trace.type for trace in fresh.data]:
        with widget.batch_update():
            widget.data = []
            widget.add_traces(list(fresh.data))
            widget.layout = fresh.layout
        return
    with widget.batch_update():
        for trace, new in zip(widget.data, fresh.data):
            _overwrite(trace, new.to_plotly_json(), keep={"type", "uid"})
        _overwrite(widget.layout, fresh.layout.to_plotly_json(), keep=set())


def _overwrite(properties, spec: Mapping[str, Any], keep: set[str]) -> None:
    # Assigning properties one by one (rather than the whole layout, which plotly sends at once) lets
    # batch_update gather them into its single update message.
    for stale in properties.to_plotly_json().keys() - spec.keys() - keep:
        properties[stale] = None
    properties.update({name: value for name, value in spec.items() if name not in keep}, overwrite=True)


def interactive_figure(controls: Mapping[str, Any], compute: Callable[..., Any],
                       build: Callable[..., go.Figure]) -> InteractiveFigure:
    return InteractiveFigure(controls, compute, build)


def static_or_interactive(controls: Mapping[str, Any], compute: Callable[..., Any], build: Callable[..., go.Figure],
                          interactive: bool | None = None) -> InteractiveFigure | None:
    """In a live kernel: display the controls and a figure that follows them. In a batch run
    (``workbench run``/``sweep``, or ``WORKBENCH_BATCH=1``), where no front end will ever move a
    slider: display the static figure for the current values, which the executed notebook and its
    HTML export keep. Returns the :class:`InteractiveFigure`, or ``None`` in batch mode."""
    from workbench import report
    from workbench.viz import show

    if interactive is None:
        interactive = not report.is_batch()
    if not interactive:
        values = {name: control.value for name, control in controls.items()}
        show(build(compute(**values), **values))
        return None
    from IPython.display import display

    panel = InteractiveFigure(controls, compute, build)
    display(panel.widget)
    return panel
