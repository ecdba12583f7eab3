"""The speedup board: scheinfer's speedup over a baseline on a models × profiles grid, for one phase.

The grid's cells are **simulated**: the paper experiment (``benchmarks/paper.py`` →
``data/results/paper_experiment.json``, read by :class:`~offloadkit.viz.benchmarks.PaperExperiment`),
or, for a model or profile the file lacks, computed here by
:func:`~offloadkit.runtime.compare.compare_policies` (the same pp512 + tg128, behind a progress bar).
A bench run (:class:`~offloadkit.bench.results.BenchRun`) adds **measured** rows below, on their
machine: offloadkit's CPU engine over llama.cpp, the only baseline measured there.

:func:`speedup_grid` and :func:`measured_grid` are the data, :func:`speedup_grid_figure` the figure;
:class:`SpeedupBoard` the widget (controls: phase, baseline, routing).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from offloadkit.bench.results import BenchRun
from offloadkit.errors import PlanError
from offloadkit.viz.benchmarks import (
    BASELINE_NAMES,
    BASELINES,
    PHASES,
    MeasuredSpeedup,
    PaperExperiment,
    measured_speedups,
    routing_name,
)
from offloadkit.viz.controls import ControlPanel, progress
from offloadkit.viz.timeline import sync_figure

ROUTINGS = ("uniform", "zipf:1.2", "trace")
#: Colour by log2 of the speedup: 1× white, slower red, faster blue; the colour bar is labelled in ×.
COLORSCALE = "RdBu"
TICKS = (0.25, 0.5, 1, 2, 4, 8, 16)


@dataclass
class SpeedupGrid:
    """Speedups [model][profile] (None: cannot run / not simulated), with what each cell rests on."""

    phase: str
    baseline: str
    routing: str
    models: list[str]
    profiles: list[str]
    values: list[list[float | None]]
    notes: list[list[str]]  # the routing used, or why there is no figure
    workload: str = "pp512+tg128"
    computed: set[tuple[str, str]] = field(default_factory=set)  # cells simulated here, not read from the file


def _cell_routing(paper: PaperExperiment, model: str, profile: str, routing: str) -> str | None:
    """The experiment's routing of the case matching ``routing`` (``dense`` for a dense model), or None."""
    for r in paper.routings(model, profile):
        if routing_name(r) == routing or r == "dense":
            return r
    return None


def speedup_grid(paper: PaperExperiment, models: list[str], profiles: list[str], baseline: str, phase: str,
                 routing: str = "uniform", computed: dict[tuple, Any] | None = None) -> SpeedupGrid:
    """The grid of scheinfer's ``phase`` speedup over ``baseline`` (its time / scheinfer's), **simulated**.

    Cells come from ``paper``; ``computed`` maps (model, profile, routing) to a
    :class:`~offloadkit.runtime.compare.Comparison` for cases the file lacks."""
    values, notes, done = [], [], set()
    for m in models:
        vrow, nrow = [], []
        for p in profiles:
            r = _cell_routing(paper, m, p, routing)
            c = (computed or {}).get((m, p, routing))
            if r is not None:
                v = paper.speedup(m, p, r, baseline, phase)
                why = None if v else (paper.why_not(m, p, r, baseline) or paper.why_not(m, p, r, "scheinfer"))
                note = f"routing {routing_name(r)}" if v else f"cannot run: {why or 'no figure'}"
            elif c is not None:
                v = c.speedup(baseline, phase)
                run = c.runs.get(baseline)
                note = f"routing {c.routing}, simulated here" if v else \
                    f"cannot run: {run.error if run and run.error else 'no figure'}"
                done.add((m, p))
            else:
                v, note = None, f"not in the experiment (routing {routing})"
            vrow.append(v)
            nrow.append(note)
        values.append(vrow)
        notes.append(nrow)
    label = (paper.meta.get("workload") or {}).get("label", "pp512+tg128")
    return SpeedupGrid(phase, baseline, routing, list(models), list(profiles), values, notes, label, done)


def measured_grid(run: BenchRun | None, phase: str) -> list[MeasuredSpeedup]:
    """The measured rows of ``phase``: offloadkit / llama.cpp per test of the run (mean ± sd of rounds)."""
    return measured_speedups(run, phase)


def _log2(v: float | None) -> float | None:
    return math.log2(v) if v else None


def speedup_grid_figure(grid: SpeedupGrid, measured: list[MeasuredSpeedup] | None = None,
                        machine: str | None = None) -> go.Figure:
    """A heatmap: models (rows) × profiles (columns), the speedup written in each cell, colour by log2;
    measured rows (offloadkit / llama.cpp on ``machine``) in a second panel below, if given.

    The cells' speedups are the heatmap's ``customdata`` (``z`` is their log2)."""
    has_measured = measured is not None
    name = BASELINE_NAMES[grid.baseline]
    sim_title = (f"<b>simulated</b> ({grid.workload}, routing {grid.routing}; dense models: dense) "
                 f"on each catalog profile")
    titles = [sim_title]
    if has_measured:
        titles.append(f"<b>measured</b> on {machine or 'this machine'}: offloadkit's CPU engine over llama.cpp "
                      f"(CPU), same weights")
    n_meas = len(measured or [])
    fig = make_subplots(rows=2 if has_measured else 1, cols=1, subplot_titles=titles, vertical_spacing=0.16,
                        row_heights=[len(grid.models), max(n_meas, 1) + 0.5] if has_measured else None)
    vals = np.array([[np.nan if v is None else v for v in row] for row in grid.values], dtype=float)
    z = np.log2(vals)
    text = [[f"{v:.2f}×" if v else "–" for v in row] for row in grid.values]
    bar = {"title": {"text": "speedup"}, "tickvals": [math.log2(t) for t in TICKS], "ticktext": [f"{t:g}×" for t in
                                                                                                 TICKS]}
    lim = max(2.0, float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 2.0)
    fig.add_trace(go.Heatmap(z=z, x=grid.profiles, y=grid.models, customdata=vals, text=text, texttemplate="%{text}",
                             hovertext=grid.notes, colorscale=COLORSCALE, zmid=0, zmin=-lim, zmax=lim, colorbar=bar,
                             meta="simulated", xgap=2, ygap=2,
                             hovertemplate="%{y} on %{x}: %{text} (simulated)<br>%{hovertext}<extra></extra>"),
                  row=1, col=1)
    fig.update_yaxes(autorange="reversed", title_text="model", row=1, col=1)
    fig.update_xaxes(title_text="profile (simulated)", side="bottom", row=1, col=1)
    if has_measured:
        if measured and grid.baseline == "llamacpp":
            mv = [[m.mean] for m in measured]
            fig.add_trace(go.Heatmap(z=[[math.log2(m.mean)] for m in measured], x=[f"measured on {machine}"],
                                     y=[f"measured · {m.label}" for m in measured], customdata=mv,
                                     text=[[f"{m.mean:.2f} ± {m.sd:.2f}×"] for m in measured], texttemplate="%{text}",
                                     colorscale=COLORSCALE, zmid=0, zmin=-lim, zmax=lim, showscale=False,
                                     meta="measured", xgap=2, ygap=2,
                                     hovertemplate="%{y}: %{text} (measured, mean ± sd of alternated rounds)"
                                                   "<extra></extra>"), row=2, col=1)
            fig.update_yaxes(autorange="reversed", row=2, col=1)
        else:
            why = (f"the measured runs compare with llama.cpp only, not {name}" if measured
                   else f"no measured {grid.phase} rows in this run")
            y0, y1 = fig.layout.yaxis2.domain  # paper coordinates: a domain ref of an empty panel can misplace
            fig.add_annotation(text=why, xref="paper", yref="paper", x=0.5, y=(y0 + y1) / 2, showarrow=False)
            fig.update_xaxes(visible=False, row=2, col=1)
            fig.update_yaxes(visible=False, row=2, col=1)
    fig.update_layout(
        title=f"Speedup of scheinfer over {name} in {grid.phase}: <b>simulated</b> on the catalog profiles"
              + (f" · <b>measured</b> on {machine}" if has_measured else "")
              + "<br><sup>the baseline's time / scheinfer's; – : cannot run (does not fit or does not apply)</sup>",
        height=200 + 46 * len(grid.models) + (90 + 40 * max(n_meas, 1) if has_measured else 0),
        margin={"t": 110, "l": 20})
    return fig


class SpeedupBoard(ControlPanel):
    """The models × profiles speedup grid with phase, baseline and routing controls; see the module docstring.

    ``models`` / ``profiles`` default to the experiment's; others are simulated here once (a progress
    bar). ``measured``: a :class:`BenchRun` or its ``run.json`` path.
    """

    def __init__(self, models: list[str] | None = None, profiles: list[str] | None = None,
                 measured: BenchRun | str | Path | None = None, phase: str = "overall", *,
                 baseline: str = "llamacpp", routing: str = "uniform",
                 paper: PaperExperiment | str | Path | None = None) -> None:
        self.paper = paper if isinstance(paper, PaperExperiment) else PaperExperiment.load(paper)
        self.models = list(models) if models else self.paper.models()
        self.profiles = list(profiles) if profiles else self.paper.profiles()
        self.run = measured if measured is None or isinstance(measured, BenchRun) else BenchRun.read_json(measured)
        self.computed: dict[tuple, Any] = {}
        self.controls: dict[str, widgets.ValueWidget] = {
            "phase": widgets.ToggleButtons(options=list(PHASES), value=phase, description="phase"),
            "baseline": widgets.ToggleButtons(options=[(BASELINE_NAMES[b], b) for b in BASELINES], value=baseline,
                                              description="over"),
            "routing": widgets.ToggleButtons(options=list(ROUTINGS), value=routing, description="routing"),
        }
        self.figure = go.FigureWidget()
        self.status = widgets.HTML()
        self.widget = widgets.VBox([*self.controls.values(), self.status, self.figure])
        self.grid: SpeedupGrid | None = None
        self.last_redraw_s: float | None = None
        self._watch_controls()
        self._update()

    def _compute_missing(self, routing: str) -> None:
        """Simulate the (model, profile) cases the experiment lacks for ``routing``, once, behind a progress bar."""
        todo = [(m, p) for m in self.models for p in self.profiles
                if _cell_routing(self.paper, m, p, routing) is None and (m, p, routing) not in self.computed]
        if not todo or routing == "trace":
            return
        from offloadkit.hardware.catalog import load_profile
        from offloadkit.model.zoo import load_spec
        from offloadkit.plan.plans import Workload
        from offloadkit.runtime.compare import compare_policies

        for m, p in progress(todo, f"simulating {len(todo)} missing cases"):
            try:
                spec = load_spec(m)
                self.computed[(m, p, routing)] = compare_policies(
                    spec, load_profile(p), Workload(512, 128), routing if spec.is_moe else None,
                    policies=("scheinfer", *BASELINES), with_bounds=False)
            except (PlanError, OSError) as e:  # an unknown model or profile: the cell says so
                self.computed[(m, p, routing)] = None
                self.status.value = f"{m} on {p}: {e}"

    def _update(self) -> None:
        t0 = time.perf_counter()
        v = self.values()
        self._compute_missing(v["routing"])
        self.grid = speedup_grid(self.paper, self.models, self.profiles, v["baseline"], v["phase"], v["routing"],
                                 {k: c for k, c in self.computed.items() if c is not None})
        measured = measured_grid(self.run, v["phase"]) if self.run is not None else None
        sync_figure(self.figure, speedup_grid_figure(self.grid, measured, self.run.machine if self.run else None))
        self.last_redraw_s = time.perf_counter() - t0
        here = f" · {len(self.grid.computed)} cells simulated here" if self.grid.computed else ""
        self.status.value = (f"<b>simulated</b>: {self.paper.path.name if self.paper.path else 'the experiment'}"
                             f"{here}" + (f" · <b>measured</b> on {self.run.machine}" if self.run else
                                          " · no measured run") + f" · redrawn in {self.last_redraw_s * 1e3:.0f} ms "
                                                                  f"(measured here)")


__all__ = ["ROUTINGS", "SpeedupBoard", "SpeedupGrid", "measured_grid", "speedup_grid", "speedup_grid_figure"]
