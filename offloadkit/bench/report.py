"""The HTML report of ``offloadkit bench --html``: one self-contained page a reader can open offline.

A benchmark's numbers travel further as a page than as a terminal table: the same table
(:func:`~offloadkit.bench.results.table_cells`, the columns ``offloadkit bench`` prints), and beside it

- tokens/s per test, offloadkit beside llama.cpp, mean ± sd as error bars (:func:`speed_figure`);
- offloadkit / llama.cpp per test, the mean ± sd of the per-round ratios (:func:`ratio_figure`);
- the memory read measured before and after each pair (:func:`read_figure`): this machine's read
  bandwidth moves by up to 2× within an hour, so the page says what it was during the run;
- one measured prefill and one measured decode step of offloadkit's engine (:func:`step_figures`,
  drawn by :func:`offloadkit.viz.timeline.timeline_figure`);
- simulated / measured per row, with the ±15 % band the simulator is held to (:func:`sim_figure`).

Every figure says what is **measured** (on :attr:`BenchRun.machine`) and what is **simulated** (on the
profile the row's ``sim_label`` names). plotly.js is inlined once (``include_plotlyjs=True`` on the first
figure), so the page loads no script from anywhere. It reads a :class:`BenchRun` and measures nothing; a
figure without data (no llama.cpp rows, no simulated column, no timelines) is left out with a line
that says why, never drawn empty.
"""

from __future__ import annotations

import html
import statistics
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from offloadkit.bench.results import SHORT_DTYPES, TABLE_HEAD, BenchRow, BenchRun, Ratio, table_cells
from offloadkit.runtime.timeline import TaskRecord, Timeline
from offloadkit.viz.timeline import LEGEND_PER_ROW, LEGEND_ROW_PX, timeline_figure

ENGINE_COLORS = {"offloadkit": "#d62728", "llama.cpp": "#1f77b4"}
SIM_BAND = 0.15  # the simulator's target: within ±15 % of what is measured
READ_NOTE = ("This machine's memory read bandwidth moves by up to 2× within an hour: compare the engines by "
             "the ratios taken within this run (alternated, repeated), not by tokens/s across runs.")


# ---- labels -------------------------------------------------------------------------------------------

def config_label(row: BenchRow | Ratio, *, model: bool = True, test: bool = False) -> str:
    """``"bench-moe<br>bf16 · 2 t"`` (`` · pp512`` with ``test``; no model line without ``model``): an x category."""
    test_name = row.test if test else ""
    line = " · ".join([SHORT_DTYPES.get(row.dtype, row.dtype), f"{row.threads} t"] + ([test_name] if test else []))
    return f"{row.model}<br>{line}" if model else line


def _models(run: BenchRun) -> list[str]:
    return list(dict.fromkeys([r.model for r in run.rows] + [r.model for r in run.ratios]))


def _of(run: BenchRun) -> str:
    """`` · model bench-moe`` where the run has one model (then the x labels leave it out)."""
    models = _models(run)
    return f" · model {models[0]}" if len(models) == 1 else ""


def _reps(run: BenchRun) -> str:
    n = run.meta.get("repetitions") or max((len(r.samples_ts) for r in run.rows), default=0)
    return f"{n} repetition{'s' if n != 1 else ''}"


def sim_where(run: BenchRun) -> str:
    """What the simulated column was simulated on (the rows' ``sim_label`` s), or "" where there is none."""
    return "; ".join(sorted({r.sim_label for r in run.rows if r.sim_ts and r.sim_label})) or (
        "simulated (profile not named)" if any(r.sim_ts for r in run.rows) else "")


# ---- the figures ------------------------------------------------------------------------------------

def speed_figure(run: BenchRun) -> go.Figure | None:
    """Tokens/s (measured) per test: one panel per test, one bar per engine and configuration, ± sd."""
    rows = [r for r in run.rows if r.samples_ts]
    if not rows:
        return None
    tests = list(dict.fromkeys(r.test for r in rows))
    cols = min(len(tests), 3)
    nrows = -(-len(tests) // cols)
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=[f"{t} (measured)" for t in tests],
                        horizontal_spacing=0.08, vertical_spacing=0.25)
    multi = len(_models(run)) > 1
    engines = list(dict.fromkeys(r.engine for r in rows))
    ratios = {(r.model, r.dtype, r.threads, r.test): r for r in run.ratios}
    for i, test in enumerate(tests):
        at = {"row": i // cols + 1, "col": i % cols + 1}
        for engine in engines:
            mine = [r for r in rows if r.test == test and r.engine == engine]
            if not mine:
                continue
            hover = []
            for r in mine:
                ratio = ratios.get(r.key()) if engine == "offloadkit" else None
                hover.append(f"{len(r.samples_ts)} samples: " + ", ".join(f"{s:.3g}" for s in r.samples_ts)
                             + (f"<br>offloadkit / llama.cpp {ratio.mean:.2f} ± {ratio.sd:.2f}" if ratio else ""))
            fig.add_trace(go.Bar(
                x=[config_label(r, model=multi) for r in mine], y=[r.avg_ts for r in mine], name=engine,
                legendgroup=engine, showlegend=i == 0, marker_color=ENGINE_COLORS.get(engine),
                error_y={"type": "data", "array": [r.stddev_ts for r in mine], "visible": True},
                text=[f"{r.avg_ts:.3g}" for r in mine], textposition="inside", insidetextanchor="middle",
                textfont={"color": "white"},
                hovertext=hover, hovertemplate="%{y:.3g} ± %{error_y.array:.2g} t/s<br>%{hovertext}<extra>"
                                               + engine + "</extra>"), **at)
        fig.update_yaxes(title_text="tokens/s (measured)" if i % cols == 0 else None, rangemode="tozero", **at)
        fig.update_xaxes(tickangle=0, title_text=("model · " if multi else "") + "dtype · threads", **at)
    fig.update_layout(
        title=f"Tokens/s per test, {' and '.join(engines)} — measured on {run.machine}<br>"
              f"<sup>mean ± sd (error bars) over {_reps(run)}"
              + (", the engines alternated; same weights, same threads" if len(engines) > 1 else
                 " (offloadkit only: no llama.cpp rows in this run)") + f"{_of(run)}</sup>",
        barmode="group", height=400 * nrows + 60, margin={"t": 110, "b": 90},
        legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom", "x": 0,
                "title": {"text": "engine"}})
    return fig


def ratio_figure(run: BenchRun) -> go.Figure | None:
    """offloadkit / llama.cpp (measured) per test: mean ± sd of the per-round ratios; None without llama.cpp."""
    rs = [r for r in run.ratios if r.ratios]
    if not rs:
        return None
    multi = len(_models(run)) > 1
    x = [config_label(r, model=multi, test=True) for r in rs]
    fig = go.Figure(go.Bar(
        x=x, y=[r.mean for r in rs], error_y={"type": "data", "array": [r.sd for r in rs], "visible": True},
        marker_color=ENGINE_COLORS["offloadkit"], name="offloadkit / llama.cpp",
        text=[f"{r.mean:.2f} ± {r.sd:.2f}" for r in rs], textposition="inside", insidetextanchor="middle",
        textfont={"color": "white"}, hovertext=[", ".join(f"{v:.3f}" for v in r.ratios) for r in rs],
        hovertemplate="%{y:.3f}×<br>per round: %{hovertext}<extra></extra>"))
    fig.add_hline(y=1, line={"dash": "dash", "color": "black", "width": 1})
    top = max(r.mean + r.sd for r in rs)
    fig.update_layout(
        title=f"offloadkit / llama.cpp tokens/s per test — measured on {run.machine}<br>"
              f"<sup>mean ± sd of the ratio of each round's two repetitions ({_reps(run)}, alternated){_of(run)}; "
              "dashed: 1× (as fast as llama.cpp), above it offloadkit is faster</sup>",
        yaxis={"title": "offloadkit / llama.cpp (measured)", "range": [0, max(1.2, top) * 1.1]},
        xaxis={"title": ("model · " if multi else "") + "dtype · threads · test", "tickangle": 0},
        height=420, margin={"t": 110}, showlegend=False)
    return fig


def sim_figure(run: BenchRun) -> go.Figure | None:
    """Simulated / measured tokens/s per row with the ±15 % band; None when no row has a simulated figure."""
    rows = [r for r in run.rows if r.sim_ts and r.samples_ts]
    if not rows:
        return None
    multi = len(_models(run)) > 1
    fig = go.Figure()
    fig.add_hrect(y0=1 - SIM_BAND, y1=1 + SIM_BAND, fillcolor="#2ca02c", opacity=0.2, line_width=0, layer="below")
    fig.add_hline(y=1, line={"dash": "dash", "color": "black", "width": 1})
    for engine in dict.fromkeys(r.engine for r in rows):
        mine = [r for r in rows if r.engine == engine]
        y = [r.sim_ts / r.avg_ts for r in mine]
        fig.add_trace(go.Bar(
            x=[config_label(r, model=multi, test=True) for r in mine], y=y, name=engine,
            marker_color=ENGINE_COLORS.get(engine),
            # the measured sd carried into the ratio (the prediction itself has none)
            error_y={"type": "data", "array": [v * r.stddev_ts / r.avg_ts for v, r in zip(y, mine, strict=True)],
                     "visible": True},
            text=[f"{v:.2f}" for v in y], textposition="inside", insidetextanchor="middle",
            textfont={"color": "white"},
            hovertext=[f"simulated {r.sim_ts:.3g} t/s ({r.sim_label or 'simulated'})<br>measured {r.avg_ts:.3g} ± "
                       f"{r.stddev_ts:.2g} t/s" for r in mine],
            hovertemplate="%{y:.2f}<br>%{hovertext}<extra>" + engine + "</extra>"))
    top = max(r.sim_ts / r.avg_ts * (1 + r.stddev_ts / r.avg_ts) for r in rows)
    fig.update_layout(
        title=f"Simulated / measured tokens/s per test{_of(run)}<br>"
              f"<sup>{sim_where(run)}<br>measured on {run.machine}, mean of {_reps(run)}; "
              f"green band: within ±{SIM_BAND:.0%} (the simulator's target)</sup>",
        yaxis={"title": "simulated / measured (1 = exact)", "range": [0, max(1 + SIM_BAND, top) * 1.12]},
        xaxis={"title": ("model · " if multi else "") + "dtype · threads · test", "tickangle": 0},
        barmode="group", height=460, margin={"t": 130, "b": 110},
        legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom", "x": 0,
                "title": {"text": "engine (its measured row, its own prediction)"}})
    return fig


def read_figure(run: BenchRun) -> go.Figure | None:
    """The memory read (GB/s, measured) before and after each alternated pair, in run order; None if none."""
    gbps = run.reads()
    if not gbps:
        return None
    mean = statistics.fmean(gbps)
    fig = go.Figure(go.Scatter(
        x=list(range(1, len(gbps) + 1)), y=gbps, mode="lines+markers", name="memory read",
        marker_color="#7f7f7f", hovertemplate="measurement %{x}: %{y:.1f} GB/s<extra></extra>"))
    fig.add_hline(y=mean, line={"dash": "dot", "color": "black", "width": 1},
                  annotation_text=f"mean {mean:.1f} GB/s", annotation_position="bottom right")
    fig.update_layout(
        title=f"Memory read bandwidth during the run — measured on {run.machine}<br>"
              f"<sup>before and after each alternated pair; min {min(gbps):.1f}, max {max(gbps):.1f} GB/s "
              f"(max / min {max(gbps) / min(gbps):.2f})</sup>",
        xaxis={"title": "measurement (in run order: before, after each pair)", "dtick": 1 if len(gbps) <= 20 else None},
        yaxis={"title": "read bandwidth (GB/s, measured)", "rangemode": "tozero"},
        height=340, margin={"t": 100}, showlegend=False)
    return fig


def from_zero(tl: Timeline) -> Timeline:
    """``tl`` with its first task starting at 0 (a decode step picked out of a run starts late)."""
    t0 = min((r.start_s for r in tl.records), default=0.0)
    recs = [TaskRecord(r.lane, r.name, r.start_s - t0, r.end_s - t0, r.layer, r.kind, r.bytes_, r.flops, r.step)
            for r in tl.records]
    return Timeline(tl.source, tl.machine, recs, dict(tl.meta))


def step_figures(run: BenchRun) -> dict[str, go.Figure]:
    """The measured timeline of each step ``run.timelines`` holds (``"prefill"``, ``"decode"``), drawn from 0."""
    out = {}
    for phase in ("prefill", "decode"):
        if not run.timelines.get(phase):
            continue
        tl = from_zero(Timeline.from_dict(run.timelines[phase]))
        if not tl.records:
            continue
        what = " · ".join(str(tl.meta[k]) for k in ("engine", "model", "dtype") if k in tl.meta)
        step = "one prefill step" if phase == "prefill" else "one decode step (one token)"
        fig = timeline_figure(tl, title=f"offloadkit's engine, {step} — {tl.label}<br><sup>{what} · "
                                        f"{tl.makespan_s * 1e3:.2f} ms, {len(tl)} tasks</sup>")
        # the legend in the bottom margin, under the axis title, whatever the number of lanes
        kinds = len(fig.data)
        legend_px = LEGEND_ROW_PX * -(-kinds // LEGEND_PER_ROW) + 10
        fig.update_layout(height=110 + 60 * len(tl.lanes()) + 60 + legend_px, margin={"t": 90, "b": 60 + legend_px},
                          legend={"yref": "container", "y": 0, "yanchor": "bottom"})
        out[phase] = fig
    return out


# ---- the page ---------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td.text { text-align: left; }
p.note { color: #555; } .missing { color: #a00; }
"""
_TEXT_COLUMNS = {"model", "engine", "backend", "dtype", "policy/ngl", "test"}


def table_html(run: BenchRun) -> str:
    """The table of ``offloadkit bench`` as an HTML ``<table>`` (values escaped)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in TABLE_HEAD)
    body = "".join("<tr>" + "".join(f"<td class=\"{'text' if h in _TEXT_COLUMNS else 'num'}\">{html.escape(c)}</td>"
                                    for h, c in zip(TABLE_HEAD, cells, strict=True)) + "</tr>"
                   for cells in table_cells(run))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _p(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{html.escape(text)}</p>'


def _summary(run: BenchRun) -> str:
    items = [f"measured on: {run.machine}"]
    for key, label in (("date", "date"), ("protocol", "protocol"), ("repetitions", "repetitions per test"),
                       ("engines", "engines"), ("profile", "simulated column on profile"),
                       ("llamacpp_build", "llama.cpp build")):
        value = run.meta.get(key)
        if value not in (None, "", []):
            items.append(f"{label}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
    items += [f"skipped: {s}" for s in run.meta.get("skipped", [])]
    return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


def _read_text(run: BenchRun) -> str:
    gbps = run.reads()
    if not gbps:
        return _p("No memory read was measured during this run. " + READ_NOTE, "missing")
    return _p(f"Memory read during the run (measured before and after each pair, {len(gbps)} measurements): "
              f"{run.read_summary()}. " + READ_NOTE)


def report_html(run: BenchRun) -> str:
    """The whole page as a string; see the module docstring."""
    parts: list[str] = []
    first = True

    def fig_html(fig: go.Figure) -> str:
        nonlocal first
        out = fig.to_html(full_html=False, include_plotlyjs=first, include_mathjax=False,
                          config={"displaylogo": False}, default_width="100%")
        first = False
        return out

    parts += [f"<h1>offloadkit bench — measured on {html.escape(run.machine)}</h1>", _summary(run),
              "<h2>The table</h2>",
              _p("t/s (measured): mean ± sd over the repetitions; offloadkit / llama.cpp: mean ± sd of the "
                 "per-round ratios (the two engines alternated); t/s (simulated): the simulator's prediction"
                 + (f" ({sim_where(run)})" if sim_where(run) else "") + "; sim / meas: simulated / measured."),
              table_html(run) if run.rows else _p("This run holds no rows.", "missing"),
              "<h2>Memory read during the run (measured)</h2>", _read_text(run)]
    figures: list[tuple[str, go.Figure | None, str]] = [
        ("", read_figure(run), ""),
        ("Tokens/s (measured)", speed_figure(run), "This run holds no measured rows."),
        ("offloadkit / llama.cpp (measured)", ratio_figure(run),
         "No llama.cpp rows in this run, so no ratio: build llama.cpp with `make bench` and measure both engines."),
        ("Simulated / measured", sim_figure(run),
         "No row has a simulated figure: give offloadkit bench a profile (e.g. --profile measure)."),
    ]
    for title, fig, missing in figures:
        if title:
            parts.append(f"<h2>{html.escape(title)}</h2>")
        if fig is not None:
            parts.append(fig_html(fig))
        elif missing:
            parts.append(_p(missing, "missing"))
    parts.append("<h2>One prefill and one decode step of offloadkit's engine (measured)</h2>")
    steps = step_figures(run)
    parts += [fig_html(f) for f in steps.values()] or [_p("This run holds no timelines.", "missing")]
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>offloadkit bench — {html.escape(run.machine)}</title><style>{_CSS}</style></head>"
            "<body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_html(run: BenchRun, path: str | Path) -> Path:
    """Write :func:`report_html` of ``run`` to ``path`` (one file, plotly.js inlined); return the path."""
    path = Path(path)
    path.write_text(report_html(run), encoding="utf-8")
    return path


__all__ = ["ENGINE_COLORS", "READ_NOTE", "SIM_BAND", "config_label", "from_zero", "ratio_figure", "read_figure",
           "report_html", "sim_figure", "sim_where", "speed_figure", "step_figures", "table_html", "write_html"]
