"""Real browser against `workbench lab`: open a notebook, run all cells, drag its slider (01_batch_noise's
noise level, 04_pruning_sparsity's prune ratio) and check that the figure's data changed. Runs when
Debian's Chromium is installed (`.ci/run` installs it)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from lab_server import running_lab

from workbench.runner import notebooks_dir

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# Small settings so each notebook's cells finish in about a minute on two cores; the cells and the
# widget wiring are the notebook's own, only the literals of its parameters cell change.
SMALL = {
    "01_batch_noise": {"norms": ["bn", "iebn"], "levels": [0.0, 1.0], "batch_sizes": [32, 64], "batch_size": 64,
                       "seeds": 2, "mix_seeds": 2, "mix_epochs": 1, "epochs": 1, "evidence_epochs": 1,
                       "attacks": ["mean"], "calibration_levels": [1.0]},
    "04_pruning_sparsity": {"epochs": 1, "sparsity_epochs": 1, "finetune_epochs": 0, "ratios": [0.3, 0.7],
                            "ratio": 0.3, "flops_targets": [0.5]},
}
# (notebook, slider label, where the drag ends: the track's left end is the smallest value, the right the largest)
SLIDERS = [("01_batch_noise", "noise level", "left"),
           ("04_pruning_sparsity", "prune ratio", "right")]

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                 "(apt-get install chromium); .ci/run installs it")]

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

READ_FIGURE = """() => {
  const panels = [...document.querySelectorAll('.widget-vbox')].filter(
      el => el.querySelector('.widget-slider') && el.querySelector('.js-plotly-plot'));
  if (!panels.length) return null;
  const plot = panels[0].querySelector('.js-plotly-plot');
  return JSON.stringify((plot.data || []).map(t => [t.name, t.x, t.y]));
}"""

ALL_CELLS_DONE = """() => {
  const prompts = [...document.querySelectorAll('.jp-InputArea-prompt')];
  return prompts.length > 0 && !prompts.some(el => el.textContent.includes('*'));
}"""


def _small_copy(tmp_path: Path, name: str) -> Path:
    from papermill.iorw import load_notebook_node, write_ipynb
    from papermill.parameterize import parameterize_notebook

    from workbench.runner import load_spec, plan_parameters

    source = notebooks_dir() / f"{name}.ipynb"
    plan_parameters([load_spec(source)], SMALL[name])  # a stale override fails here, not after a long wait

    target = tmp_path / f"{name}.ipynb"
    node = load_notebook_node(str(source))
    write_ipynb(parameterize_notebook(node, SMALL[name], kernel_name="workbench"), str(target))
    return target


@pytest.mark.parametrize(("name", "label", "end"), SLIDERS,
                         ids=["01_batch_noise-noise level", "04_pruning_sparsity-prune ratio"])
def test_dragging_the_slider_updates_the_figure_in_jupyterlab(tmp_path, name, label, end):
    from playwright.sync_api import sync_playwright

    _small_copy(tmp_path, name)
    ARTIFACTS.mkdir(exist_ok=True)
    with running_lab(root=str(tmp_path), log_path=str(tmp_path / "lab.log")) as lab, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"http://127.0.0.1:{lab.port}/lab/tree/{name}.ipynb?token={lab.token}")
            page.wait_for_selector(".jp-Notebook", timeout=120_000)
            # the status bar reads "Python (workbench) | Idle" once the kernel is up
            page.locator(".jp-StatusBar-Widget", has_text="Idle").first.wait_for(timeout=120_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click(timeout=30_000)
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click(timeout=30_000)
            page.wait_for_selector(".widget-vbox .widget-slider", timeout=900_000)
            page.wait_for_selector(".widget-vbox .js-plotly-plot", timeout=120_000)
            # the slider's callback runs only once the kernel is free: notebook 01's paired trials come after
            # its slider cell, so wait until no cell is queued or running ("[*]") before dragging
            _wait_for(page, lambda: page.evaluate(ALL_CELLS_DONE), timeout=900)
            before = _wait_for(page, lambda: page.evaluate(READ_FIGURE), timeout=120)
            readout = _readout(page, label)
            _drag_slider(page, label, end)
            # a drag that missed the handle would otherwise read as a figure that does not follow its slider
            _wait_for(page, lambda: _readout(page, label) != readout, timeout=30)
            after = _wait_for(page, lambda: _changed(page.evaluate(READ_FIGURE), before), timeout=300)
        finally:
            page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"), full_page=False)
            browser.close()
    assert after != before
    traces_before, traces_after = json.loads(before), json.loads(after)
    assert traces_before and traces_after
    assert [t[2] for t in traces_before] != [t[2] for t in traces_after], "the figure's data must change"


def _drag_slider(page, label: str, end: str) -> None:
    """Drag the handle of the slider labelled ``label`` with the mouse to the ``end`` of its track."""
    slider = page.locator(".widget-vbox .widget-slider").filter(has_text=label).first
    handle = slider.locator(".noUi-handle").first
    _scroll_until_settled(page, handle)
    handle.hover(timeout=30_000)  # checks that the handle itself is what the pointer is over
    box = handle.bounding_box()
    track = slider.locator(".noUi-target").first.bounding_box()
    target_x = track["x"] + 2 if end == "left" else track["x"] + track["width"] - 2
    page.mouse.down()
    page.mouse.move(target_x, box["y"] + box["height"] / 2, steps=15)
    page.mouse.up()


def _scroll_until_settled(page, locator, timeout: float = 60) -> None:
    """Scroll ``locator`` into the viewport until it stays there.

    JupyterLab draws the cells near a scrolled-to cell only once they come into view, so the cells
    above a slider grow after the scroll and push it out of the viewport again (in notebook 01, whose
    figures sit above its slider, by about 1,500 px); a drag at the position measured before that
    presses on whatever is there now, or on nothing."""
    viewport = page.viewport_size
    deadline, previous = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        locator.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        box = locator.bounding_box()
        inside = box and 0 <= box["y"] and box["y"] + box["height"] <= viewport["height"]
        if inside and box == previous:
            return
        previous = box
    raise AssertionError(f"the slider handle did not settle inside the viewport within {timeout} s")


def _readout(page, label: str) -> str:
    """The value the slider labelled ``label`` shows next to its track."""
    slider = page.locator(".widget-vbox .widget-slider").filter(has_text=label).first
    return slider.locator(".widget-readout").first.inner_text()


def _changed(current: str | None, before: str) -> str | None:
    return current if current and current != before else None


def _wait_for(page, probe, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        page.wait_for_timeout(500)
    raise AssertionError(f"condition not met within {timeout} s")
