"""The speedups of scheinfer over llama.cpp, Fiddler and KTransformers: simulated, and measured where we can.

Chapter 09 has two kinds of numbers, and this module keeps them apart while showing them together:

- **simulated**: the paper's experiment (``benchmarks/paper.py`` → ``data/results/paper_experiment.json``),
  every policy on catalog profiles with GPUs, pp512 + tg128 (:class:`PaperExperiment` reads it);
- **measured**: a :class:`~offloadkit.bench.results.BenchRun` of the machine at hand, offloadkit's CPU
  engine against the real llama.cpp on the same weights (:func:`measured_speedups`). Its rows compare
  two CPU engines, not scheinfer's GPU plan, and are on this machine's benchmark models, not the
  paper's.

:class:`SpeedupExplorer` is the ipywidgets panel: a model, a profile and a phase (prefill / decode /
overall) pick the simulated case; one plotly ``FigureWidget`` with two panels shows scheinfer's
speedup over each baseline for every routing of that case (solid bars, left, with the paper's own
reported range as a band: the paper's, measured by its authors) and offloadkit / llama.cpp for the
same phase from the BenchRun (hatched bars with error bars, right; a note instead where there is
no run). A redraw only looks values up and updates the traces in place (``fig.batch_update()``).
Each control's callback is the plain method :meth:`SpeedupExplorer._update`, so tests drive it
without a browser (``explorer.set(phase="decode")``). It draws what it is given; it measures nothing
but its own redraw time (``last_redraw_s``).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from offloadkit.bench.results import SHORT_DTYPES, BenchRun
from offloadkit.errors import OffloadkitError
from offloadkit.paths import data_dir
from offloadkit.viz.controls import ControlPanel, put_trace, trace

PHASES = ("prefill", "decode", "overall")
BASELINES = ("llamacpp", "fiddler", "ktransformers")
BASELINE_NAMES = {"llamacpp": "llama.cpp", "fiddler": "Fiddler", "ktransformers": "KTransformers"}
ROUTING_COLORS = {"uniform": "#1f77b4", "zipf:1.2": "#ff7f0e", "trace": "#2ca02c", "dense": "#7f7f7f"}
MEASURED_COLOR = "#d62728"


def routing_name(routing: str) -> str:
    """``"trace:demo-mixtral-pydoc tiled 4→32 layers"`` → ``"trace"``; other routings as they are."""
    return "trace" if routing.startswith("trace") else routing


# ---- the simulated experiment -------------------------------------------------------------------------

@dataclass
class PaperExperiment:
    """``paper_experiment.json``: tokens/s per (model, profile, routing, policy, phase), all **simulated**."""

    meta: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]] = field(default_factory=list)  # the file's "speedups": min/median/max per baseline
    path: Path | None = None

    def __post_init__(self) -> None:
        self._ts = {(r["model"], r["profile"], r["routing"], r["policy"], r["phase"]): r.get("tokens_per_s")
                    for r in self.rows}
        self._error = {(r["model"], r["profile"], r["routing"], r["policy"]): r["error"]
                       for r in self.rows if r.get("error")}

    @classmethod
    def load(cls, path: str | Path | None = None) -> PaperExperiment:
        """Read the file ``benchmarks/paper.py`` wrote (default ``data/results/paper_experiment.json``)."""
        p = Path(path) if path is not None else data_dir() / "results" / "paper_experiment.json"
        try:
            d = json.loads(p.read_text())
            return cls(meta=d["metadata"], rows=d["rows"], summary=d.get("speedups", []), path=p)
        except FileNotFoundError:
            raise OffloadkitError(f"{p}: no such file; write it with `python benchmarks/paper.py`") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise OffloadkitError(f"{p} is not the paper experiment's JSON ({e}); rewrite it with "
                                  "`python benchmarks/paper.py`") from None

    def models(self) -> list[str]:
        return list(dict.fromkeys(r["model"] for r in self.rows))

    def profiles(self) -> list[str]:
        return list(dict.fromkeys(r["profile"] for r in self.rows))

    def routings(self, model: str, profile: str) -> list[str]:
        """The routings simulated for the case, in the file's order (``"dense"`` for a dense model)."""
        return list(dict.fromkeys(r["routing"] for r in self.rows if r["model"] == model and r["profile"] == profile))

    def tokens_per_s(self, model: str, profile: str, routing: str, policy: str, phase: str) -> float | None:
        return self._ts.get((model, profile, routing, policy, phase))

    def speedup(self, model: str, profile: str, routing: str, baseline: str, phase: str) -> float | None:
        """The baseline's time / scheinfer's (same tokens), or None where either could not run."""
        mine = self.tokens_per_s(model, profile, routing, "scheinfer", phase)
        theirs = self.tokens_per_s(model, profile, routing, baseline, phase)
        return mine / theirs if mine and theirs else None

    def why_not(self, model: str, profile: str, routing: str, policy: str) -> str | None:
        """Why ``policy`` has no figure in the case (it does not fit, does not apply), or None."""
        return self._error.get((model, profile, routing, policy))

    def paper_range(self, phase: str) -> tuple[float, float] | None:
        """The paper's own reported speedup range for ``phase`` (its abstract; measured by its authors)."""
        ranges = (self.meta.get("paper") or {}).get("ranges") or {}
        lo_hi = ranges.get(phase)
        return (float(lo_hi[0]), float(lo_hi[1])) if lo_hi else None


# ---- the measured rows ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeasuredSpeedup:
    """offloadkit / llama.cpp tokens/s of one test on the machine at hand: mean ± sd over alternated rounds."""

    label: str  # "bench-moe · bf16 · 2 t · tg128"
    ratios: tuple[float, ...]
    offloadkit_ts: float
    llamacpp_ts: float

    @property
    def mean(self) -> float:
        return statistics.fmean(self.ratios)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.ratios) if len(self.ratios) > 1 else 0.0


def _phase_of(test: str) -> str:
    if "+" in test:
        return "overall"
    return "prefill" if test.startswith("pp") else "decode"


def measured_speedups(run: BenchRun | None, phase: str) -> list[MeasuredSpeedup]:
    """offloadkit / llama.cpp per test of ``phase`` in ``run`` (pp tests: prefill, tg: decode).

    ``overall`` takes the run's ``pp+tg`` tests, and combines each pp test with each tg test of the same
    model, dtype and threads round by round: round r's time is ``p / pp_ts[r] + g / tg_ts[r]`` per engine.
    """
    if run is None:
        return []
    rows = {(r.engine, *r.key()): r for r in run.rows}
    out = []

    def label(model: str, dtype: str, threads: int, test: str) -> str:
        return f"{model} · {SHORT_DTYPES.get(dtype, dtype)} · {threads} t · {test}"

    for r in run.ratios:
        ok, ll = rows.get(("offloadkit", r.model, r.dtype, r.threads, r.test)), \
            rows.get(("llama.cpp", r.model, r.dtype, r.threads, r.test))
        if _phase_of(r.test) == phase and r.ratios and ok and ll:
            out.append(MeasuredSpeedup(label(r.model, r.dtype, r.threads, r.test), tuple(r.ratios), ok.avg_ts,
                                       ll.avg_ts))
    if phase != "overall":
        return out
    for pp in (r for r in run.rows if r.engine == "offloadkit" and r.n_prompt and not r.n_gen):
        for tg in (r for r in run.rows if r.engine == "offloadkit" and r.n_gen and not r.n_prompt
                   and r.key()[:3] == pp.key()[:3]):
            ll_pp, ll_tg = (rows.get(("llama.cpp", *x.key())) for x in (pp, tg))
            if ll_pp is None or ll_tg is None:
                continue
            p, g = pp.n_prompt, tg.n_gen

            def seconds(a: float, b: float, p: int = p, g: int = g) -> float:
                return p / a + g / b

            n = min(len(x.samples_ts) for x in (pp, tg, ll_pp, ll_tg))
            ratios = tuple(seconds(ll_pp.samples_ts[i], ll_tg.samples_ts[i]) / seconds(pp.samples_ts[i],
                                                                                      tg.samples_ts[i])
                           for i in range(n))
            if ratios:
                out.append(MeasuredSpeedup(label(pp.model, pp.dtype, pp.threads, f"pp{p}+tg{g}"), ratios,
                                           (p + g) / seconds(pp.avg_ts, tg.avg_ts),
                                           (p + g) / seconds(ll_pp.avg_ts, ll_tg.avg_ts)))
    return out


# ---- the figure -------------------------------------------------------------------------------------

def figure_skeleton(machine: str | None) -> go.Figure:
    """Two panels: simulated speedups (left), measured offloadkit / llama.cpp (right); the 1× lines, the band."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.1,
                        subplot_titles=("<b>simulated</b>: scheinfer over each baseline",
                                        f"<b>measured</b> on {machine or 'this machine'}:<br>"
                                        "offloadkit's CPU engine over llama.cpp (CPU)"))
    fig.add_shape(type="rect", xref="x domain", x0=0, x1=1, yref="y", y0=1, y1=1, fillcolor="#9467bd",
                  opacity=0.15, line_width=0, layer="below", name="the paper's range", showlegend=True,
                  legendgroup="paper", legendgrouptitle_text="the paper's (measured by its authors)")
    for xref, yref in (("x domain", "y"), ("x2 domain", "y2")):
        fig.add_shape(type="line", xref=xref, x0=0, x1=1, yref=yref, y0=1, y1=1,
                      line={"dash": "dash", "color": "black", "width": 1})
    fig.add_annotation(xref="x2 domain", x=0.5, yref="y2 domain", y=0.5, text="", showarrow=False,
                       font={"size": 12}, align="center", name="no measured rows")
    fig.update_xaxes(title_text="baseline", row=1, col=1)
    fig.update_xaxes(title_text="model · dtype · threads · test", row=1, col=2)
    return fig


def draw_speedups(fig: go.Figure, paper: PaperExperiment, model: str, profile: str, phase: str,
                  run: BenchRun | None = None) -> go.Figure:
    """Fill :func:`figure_skeleton`'s panels for (model, profile, phase); traces and shapes updated in place."""
    x = [BASELINE_NAMES[b] for b in BASELINES]
    routings = {routing_name(r): r for r in paper.routings(model, profile)}
    shown: list[float] = [1.0]
    for name, color in ROUTING_COLORS.items():
        routing = routings.get(name)
        y = [paper.speedup(model, profile, routing, b, phase) if routing else None for b in BASELINES]
        shown += [v for v in y if v]
        why = [("" if v else (paper.why_not(model, profile, routing, b) or "no figure") if routing else "")
               for v, b in zip(y, BASELINES, strict=True)]
        ts = [f"scheinfer {_ts(paper.tokens_per_s(model, profile, routing, 'scheinfer', phase))} t/s, "
              f"{BASELINE_NAMES[b]} {_ts(paper.tokens_per_s(model, profile, routing, b, phase))} t/s"
              if routing else "" for b in BASELINES]
        put_trace(fig, f"simulated:{name}", go.Bar, row=1, col=1, x=x, y=y, marker_color=color,
             name=f"simulated · routing {routing or name}", visible=routing is not None, legendgroup="simulated",
             legendgrouptitle_text=f"simulated on {profile}", text=[f"{v:.2f}×" if v else "cannot run" if routing
                                                                     else "" for v in y],
             textposition="outside", cliponaxis=False, hovertext=[f"{t}<br>{w}" for t, w in zip(ts, why, strict=True)],
             hovertemplate="%{y:.2f}× (simulated)<br>%{hovertext}<extra>" + name + "</extra>")
    cannot = [[(routing_name(r), paper.why_not(model, profile, r, b) or "no figure") for r in routings.values()
               if paper.speedup(model, profile, r, b, phase) is None] for b in BASELINES]
    put_trace(fig, "cannot run", go.Scatter, row=1, col=1, x=x, y=[0.0 if c else None for c in cannot],
         mode="markers+text", marker={"symbol": "x", "size": 10, "color": "black"}, name="cannot run (simulated)",
         text=[f"cannot run ({', '.join(n for n, _ in c)})" if c else "" for c in cannot], textposition="top center",
         showlegend=False, hovertext=["<br>".join(f"{n}: {w[:160]}" for n, w in c) for c in cannot],
         hovertemplate="%{hovertext}<extra>cannot run</extra>")
    band = paper.paper_range(phase)
    for shape in fig.layout.shapes:
        if shape.legendgroup == "paper":
            shape.update(y0=band[0] if band else 1, y1=band[1] if band else 1, visible=band is not None,
                         name=f"the paper's reported {phase} speedup, {band[0]:.2f}–{band[1]:.2f}× over llama.cpp "
                              "and Fiddler" if band else "the paper's range")
    if band:
        shown.append(band[1])
    measured = measured_speedups(run, phase)
    one_model = run is not None and len({r.model for r in run.rows}) == 1
    put_trace(fig, "measured", go.Bar, row=1, col=2,
         x=[_short(m.label, one_model) for m in measured],
         y=[m.mean for m in measured], error_y={"type": "data", "array": [m.sd for m in measured], "visible": True},
         marker={"color": MEASURED_COLOR, "pattern": {"shape": "/", "fgcolor": "white"}},
         name=f"measured on {run.machine}: offloadkit / llama.cpp" if run else "measured",
         showlegend=bool(measured), legendgroup="measured", legendgrouptitle_text="measured",
         text=[f"{m.mean:.2f} ± {m.sd:.2f}×" for m in measured], textposition="inside", insidetextanchor="middle",
         textfont={"color": "white"}, textangle=0,
         hovertext=[f"offloadkit {m.offloadkit_ts:.3g} t/s, llama.cpp {m.llamacpp_ts:.3g} t/s (means)<br>"
                    f"{len(m.ratios)} alternated rounds" for m in measured],
         hovertemplate="%{y:.2f} ± %{error_y.array:.2f}× (measured)<br>%{hovertext}<extra></extra>")
    note = "" if measured else _no_measured(run, phase)
    for a in fig.layout.annotations:
        if a.name == "no measured rows":
            a.update(text=note)
    top_m = max([m.mean + m.sd for m in measured] + [1.0])
    fig.update_yaxes(title_text=f"{phase} speedup (×), simulated",
                     range=[0, max(shown) * 1.15], row=1, col=1)
    fig.update_yaxes(title_text=f"{phase}: offloadkit / llama.cpp, measured", range=[0, top_m * 1.2],
                     showticklabels=bool(measured), row=1, col=2)
    fig.update_xaxes(showticklabels=bool(measured), tickangle=0, row=1, col=2,
                     title_text=("" if one_model else "model · ") + "dtype · threads · test"
                     + (f" ({next(iter({r.model for r in run.rows}))})" if one_model and run else ""))
    fig.update_layout(
        title=f"Speedups in {phase}: {model} on {profile} (simulated, pp512+tg128) · the machine at hand "
              f"(measured)<br><sup>solid bars: <b>simulated</b> by offloadkit's cost model on the catalog profile; "
              f"hatched bars: <b>measured</b> here, mean ± sd of alternated rounds</sup>",
        barmode="group", height=520, margin={"t": 130, "b": 60},
        legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom", "x": 0,
                "groupclick": "toggleitem"})
    return fig


def _short(label: str, one_model: bool) -> str:
    """``"bench-moe · bf16 · 2 t · pp64"`` as a two-line category (without the model where the run has one)."""
    model, dtype, threads, test = label.split(" · ")
    return (f"{dtype} · {threads}" if one_model else f"{model}<br>{dtype} · {threads}") + f"<br>{test}"


def _ts(v: float | None) -> str:
    return f"{v:.3g}" if v else "–"


def _no_measured(run: BenchRun | None, phase: str) -> str:
    if run is None:
        return "no measured rows here:<br>run offloadkit bench (notebook 09, §1)<br>and pass its BenchRun"
    if not any(r.engine == "llama.cpp" for r in run.rows):
        return "no llama.cpp rows in this run:<br>build llama.cpp with <b>make bench</b>,<br>then measure both engines"
    return f"no {phase} test in this run<br>(prefill: pp tests, decode: tg tests,<br>overall: pp and tg together)"


# ---- the widget -------------------------------------------------------------------------------------

class SpeedupExplorer(ControlPanel):
    """The speedup panel of chapter 09; see the module docstring.

    ``paper`` is the simulated experiment (default: the repository's ``data/results`` file); ``run``
    an optional measured :class:`BenchRun` of this machine. ``controls`` maps ``model``, ``profile``,
    ``phase`` to their ipywidgets.
    """

    def __init__(self, paper: PaperExperiment | str | Path | None = None, run: BenchRun | None = None, *,
                 model: str | None = None, profile: str | None = None, phase: str = "overall") -> None:
        self.paper = paper if isinstance(paper, PaperExperiment) else PaperExperiment.load(paper)
        self.run = run
        models, profiles = self.paper.models(), self.paper.profiles()
        if not models:
            raise OffloadkitError(f"{self.paper.path}: the paper experiment holds no rows")
        style = {"description_width": "110px"}
        self.controls: dict[str, widgets.ValueWidget] = {
            "model": widgets.Dropdown(options=models, value=model or models[0], description="model (simulated)",
                                      style=style, layout=widgets.Layout(width="380px")),
            "profile": widgets.Dropdown(options=profiles, value=profile or profiles[0],
                                        description="profile (simulated)", style=style,
                                        layout=widgets.Layout(width="380px")),
            "phase": widgets.ToggleButtons(options=list(PHASES), value=phase, description="phase", style=style),
        }
        self.fig = go.FigureWidget(figure_skeleton(run.machine if run else None))
        self.status = widgets.HTML()
        self.last_redraw_s: float | None = None
        self._watch_controls()
        self._update()

    def _update(self) -> None:
        t0 = time.perf_counter()
        v = self.values()
        with self.fig.batch_update():
            draw_speedups(self.fig, self.paper, v["model"], v["profile"], v["phase"], self.run)
        self.last_redraw_s = time.perf_counter() - t0
        routings = self.paper.routings(v["model"], v["profile"])
        missing = sorted({BASELINE_NAMES[b] for r in routings for b in BASELINES
                          if self.paper.speedup(v["model"], v["profile"], r, b, v["phase"]) is None})
        self.status.value = (
            f"<b>simulated</b> on {v['profile']} ({self.paper.meta.get('workload', {}).get('label', '')}, "
            f"routings: {', '.join(routings) or 'none'})"
            + (f" · cannot run (does not fit or does not apply): {', '.join(missing)}" if missing else "")
            + (f" · <b>measured</b> on {self.run.machine}" if self.run else " · no measured rows")
            + f" · redrawn in {self.last_redraw_s * 1e3:.0f} ms (measured here)")

    def widget(self) -> widgets.VBox:
        return widgets.VBox([widgets.HBox([self.controls["model"], self.controls["profile"]]),
                             self.controls["phase"], self.status, self.fig])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget())


__all__ = ["BASELINES", "BASELINE_NAMES", "MeasuredSpeedup", "PHASES", "PaperExperiment", "SpeedupExplorer",
           "draw_speedups", "figure_skeleton", "measured_speedups", "routing_name", "trace"]
