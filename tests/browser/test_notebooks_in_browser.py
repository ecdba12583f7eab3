"""The course notebooks in a real browser: JupyterLab runs every cell, then the page is checked as a reader sees it.

For each notebook of ``NOTEBOOKS`` (an explicit list: a missing notebook fails, it does not skip): open it in
JupyterLab (fixtures in conftest.py), Run ▸ Run All Cells, wait until every code cell has run, then check that

- no cell shows an error output, a traceback on stderr, or "Error displaying widget";
- the plotly figures rendered (``.js-plotly-plot`` with its SVG) and the ipywidgets rendered (``.jupyter-widgets``);
- where the notebook has a dashboard (sliders and figures in one widget), moving a slider redraws a figure.

A screenshot of each notebook goes to ``build/screenshots/NN_name.png`` (and of each dashboard to
``NN_name-dashboard.png``; docs/img/dashboard.png is a copy of 06's). Run with ``make browser-test``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
SCREENSHOTS = ROOT / "build" / "screenshots"

RUN_TIMEOUT_S = 420  # a notebook takes up to 1-2 minutes on 2 cores
RENDER_TIMEOUT_S = 60
REDRAW_TIMEOUT_S = 180


@dataclass(frozen=True)
class Expect:
    min_figures: int  # plotly figures (.js-plotly-plot) the notebook must show
    min_widgets: int  # ipywidgets views (.jupyter-widgets roots in outputs)
    dashboard: bool  # a widget output holding sliders and plotly figures: move a slider, a figure must change


NOTEBOOKS = {
    # the hybrid run's measured-vs-simulated timeline, Mixtral's simulated prefill, the speedup figure
    "00_quickstart": Expect(min_figures=3, min_widgets=0, dashboard=False),
    # the three comparison figures drawn once, then the plan tuner's (six sliders and three FigureWidgets)
    "06_partitioning": Expect(min_figures=6, min_widgets=1, dashboard=True),
    # two measured-vs-simulated timelines, then the prompt explorer (a slider, the sweep and a timeline)
    "08_engine": Expect(min_figures=4, min_widgets=1, dashboard=True),
}

# What JupyterLab 4 puts in the DOM.
NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook"
OUTPUT = ".jp-OutputArea-output"
# JupyterLab 4.6 renders an exception (an "error" output) as text with the stderr mime type; the error mime type
# is checked too, in case a later version renders it apart.
ERROR_OUTPUT = f'{OUTPUT}[data-mime-type="application/vnd.jupyter.error"]'
STDERR_OUTPUT = f'{OUTPUT}[data-mime-type="application/vnd.jupyter.stderr"]'
WIDGET_OUTPUT = f"{OUTPUT}:has(> .jupyter-widgets)"  # a widget view's output carries no mime type
PLOTLY = ".js-plotly-plot"
SLIDER = ".widget-slider"
RUN_ALL = '.lm-Menu-item:has(> .lm-Menu-itemLabel:text-is("Run All Cells"))'

_PROGRESS = """(sel) => {
  const nb = document.querySelector(sel);
  if (!nb) return null;
  const prompts = [...nb.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent.trim());
  return {cells: prompts.length,
          done: prompts.filter(p => /^\\[\\d+\\]/.test(p)).length,
          busy: prompts.filter(p => p.includes('*')).length,
          ran_or_queued: prompts.some(p => /^\\[(\\d+|\\*)\\]/.test(p)),
          errors: [...nb.querySelectorAll('[data-mime-type="application/vnd.jupyter.error"], ' +
                                          '[data-mime-type="application/vnd.jupyter.stderr"]')]
                  .filter(e => e.textContent.includes('Traceback')).length};
}"""

# What a plotly figure shows: its traces' data and its title (plotly keeps them on the graph div).
_FIGURE_STATE = """(els) => els.map(gd => JSON.stringify([
  (gd.data || []).map(t => [t.name, t.x, t.y, t.z, t.text, t.base]),
  gd.layout && gd.layout.title && gd.layout.title.text,
  (gd.querySelector('.main-svg') || {}).innerHTML ? gd.querySelector('.main-svg').innerHTML.length : 0]))"""


def _wait(cond, timeout: float, what, interval: float = 1.0):
    """Poll cond() until it is truthy (returned) or timeout; what (a string, or a callable giving one) says what."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def _texts(page, selector: str) -> list[str]:
    return page.locator(f"{NOTEBOOK} {selector}").all_inner_texts()


def _shutdown_kernel(lab, name: str) -> None:
    """End the notebook's session (and its kernel): the next notebook gets the CPU to itself."""
    for s in lab.api("/api/sessions"):
        if s.get("path", "").endswith(f"{name}.ipynb"):
            lab.api(f"/api/sessions/{s['id']}", method="DELETE", timeout=30)


def _kernel_idle(lab, name: str) -> bool:
    """The server's own view: the notebook's session has a kernel, and it is idle."""
    sessions = lab.api("/api/sessions")
    return any(s.get("path", "").endswith(f"{name}.ipynb") and s["kernel"]["execution_state"] == "idle"
               for s in sessions)


def _open_and_run(page, lab, name: str) -> dict:
    page.goto(lab.notebook_url(name))
    page.wait_for_selector(f"{NOTEBOOK} .jp-CodeCell", timeout=60_000)
    # The kernel must be up and connected before Run All: JupyterLab drops a run requested before that.
    _wait(lambda: _kernel_idle(lab, name), 120, f"{name}'s kernel to start")
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=120_000)
    for _attempt in range(3):
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(RUN_ALL).click()
        try:
            _wait(lambda: page.evaluate(_PROGRESS, NOTEBOOK)["ran_or_queued"], 20, "the run to start", 0.5)
            break
        except AssertionError:
            continue
    else:
        raise AssertionError(f"{name}: Run All Cells did not start the cells (3 tries)")

    def finished():
        p = page.evaluate(_PROGRESS, NOTEBOOK)
        if p and p["cells"] and (p["done"] == p["cells"] or (p["errors"] and not p["busy"])):
            return p
        return None

    progress = _wait(finished, RUN_TIMEOUT_S, f"{name} to run all its cells")
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=120_000)
    return progress


def _check_outputs(page, name: str, expect: Expect) -> None:
    errors = _texts(page, ERROR_OUTPUT)
    assert not errors, f"{name}: error outputs:\n" + "\n---\n".join(e[-2000:] for e in errors)
    tracebacks = [t for t in _texts(page, STDERR_OUTPUT) if "Traceback" in t]
    assert not tracebacks, f"{name}: tracebacks on stderr:\n" + "\n---\n".join(t[-2000:] for t in tracebacks)

    nb = page.locator(NOTEBOOK)

    def rendered():
        text = nb.inner_text()
        n_fig = page.locator(f"{NOTEBOOK} {PLOTLY} .main-svg").count()
        n_wid = page.locator(f"{NOTEBOOK} {WIDGET_OUTPUT}").count()
        loading = "Loading widget..." in text
        return (n_fig >= expect.min_figures and n_wid >= expect.min_widgets and not loading) and (n_fig, n_wid)

    try:
        found = lambda: (f"{page.locator(f'{NOTEBOOK} {PLOTLY}').count()} figures, "
                         f"{page.locator(f'{NOTEBOOK} {WIDGET_OUTPUT}').count()} widget outputs")
        _wait(rendered, RENDER_TIMEOUT_S, lambda: f"{name}'s figures and widgets to render (at least "
              f"{expect.min_figures} figures and {expect.min_widgets} widget outputs; found {found()})")
    finally:
        text = nb.inner_text()
        assert "Error displaying widget" not in text, f"{name}: 'Error displaying widget' in the page"
    n_fig = page.locator(f"{NOTEBOOK} {PLOTLY}").count()
    assert n_fig >= expect.min_figures, f"{name}: {n_fig} plotly figures, expected at least {expect.min_figures}"
    if expect.min_widgets:
        assert page.locator(f"{NOTEBOOK} {WIDGET_OUTPUT}").count() >= expect.min_widgets


def _dashboard(page):
    """The first widget output holding both a slider and a plotly figure."""
    return (page.locator(f"{NOTEBOOK} {WIDGET_OUTPUT}")
            .filter(has=page.locator(SLIDER)).filter(has=page.locator(PLOTLY)).first)


def _move_slider_and_check_redraw(page, name: str) -> None:
    board = _dashboard(page)
    assert board.count(), f"{name}: no widget output with a slider and a plotly figure"
    figures = board.locator(PLOTLY)
    # The state before: the same on two looks a second apart (a redraw the last cells asked for has landed).
    last = [None]

    def steady():
        state = figures.evaluate_all(_FIGURE_STATE)
        same, last[0] = state == last[0], state
        return same and state

    before = _wait(steady, 30, f"{name}: the dashboard's figures to settle")
    slider = board.locator(SLIDER).first
    readout = slider.locator(".widget-readout")
    value_before = readout.inner_text()
    handle = slider.locator(".noUi-handle").first
    handle.scroll_into_view_if_needed()
    handle.focus()
    handle.press("PageDown")  # noUiSlider: several steps down in one change
    _wait(lambda: readout.inner_text() != value_before, 10, f"{name}: the slider's readout to move", 0.2)
    value_after = readout.inner_text()
    changed = _wait(lambda: figures.evaluate_all(_FIGURE_STATE) != before and figures.evaluate_all(_FIGURE_STATE),
                    REDRAW_TIMEOUT_S, f"{name}: a figure to change after the slider moved "
                    f"({value_before} -> {value_after})")
    assert len(changed) == len(before)
    # Let the redraw finish (the kernel computes, then updates the figures one after another).
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=120_000)
    time.sleep(1.0)


def _screenshots(page, name: str, expect: Expect) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    board = _dashboard(page) if expect.dashboard else None
    anchor = board if board is not None and board.count() else page.locator(f"{NOTEBOOK} {PLOTLY}").first
    if anchor.count():
        anchor.evaluate("el => el.scrollIntoView({block: 'start'})")
        time.sleep(0.5)
    page.screenshot(path=SCREENSHOTS / f"{name}.png")
    if board is not None and board.count():
        # The dashboard cropped to its controls and first figure (docs/img/dashboard.png is 06's).
        box = board.bounding_box()
        fig = board.locator(PLOTLY).first.bounding_box()
        viewport = page.viewport_size
        bottom = min(fig["y"] + fig["height"], viewport["height"]) if fig else viewport["height"]
        top = max(box["y"] - 6, 0)
        clip = {"x": box["x"], "y": top, "width": min(box["width"], viewport["width"] - box["x"]),
                "height": bottom - top + 8}
        page.screenshot(path=SCREENSHOTS / f"{name}-dashboard.png", clip=clip)


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_in_jupyterlab(page, lab, name):
    expect = NOTEBOOKS[name]
    source = NOTEBOOK_DIR / f"{name}.py"
    assert source.is_file(), f"notebooks/{name}.py is missing: the browser test covers it (tests/browser)"
    try:
        progress = _open_and_run(page, lab, name)
        _check_outputs(page, name, expect)
        assert progress["done"] == progress["cells"], f"{name}: {progress}"
        if expect.dashboard:
            _move_slider_and_check_redraw(page, name)
            _check_outputs(page, name, expect)
    finally:
        try:
            _screenshots(page, name, expect)
        except Exception as e:  # a screenshot must not hide the real failure
            print(f"screenshot of {name} failed: {e}")
        try:
            _shutdown_kernel(lab, name)
        except Exception as e:
            print(f"shutting {name}'s kernel down failed: {e}")
    assert not [e for e in page.console_errors if "Error displaying widget" in e], page.console_errors


def test_harness_sees_a_failing_cell(page, lab):
    """The checks above, on a notebook whose second cell raises: the run must end and the error be reported.

    Guards the selectors: were JupyterLab to render errors otherwise, the notebooks' checks would pass unseen.
    """
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("1 / 0"),
                nbformat.v4.new_code_cell("y = 2")]
    nbformat.write(nb, lab.root / "zz_failing.ipynb")
    try:
        progress = _open_and_run(page, lab, "zz_failing")
        assert progress["errors"] == 1 and progress["done"] < progress["cells"], progress
        with pytest.raises(AssertionError, match="ZeroDivisionError"):
            _check_outputs(page, "zz_failing", Expect(min_figures=0, min_widgets=0, dashboard=False))
    finally:
        _shutdown_kernel(lab, "zz_failing")
