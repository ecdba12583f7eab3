"""Plotly drawing of a :class:`~offloadkit.runtime.timeline.Timeline`: one row per lane, one bar per task.

Horizontal ``go.Bar`` traces with ``base=`` (the start) and ``x=`` (the duration) on a linear
millisecond axis, one row per lane (cpu, gpu, h2d, d2h, top to bottom), ``barmode="overlay"``, colored by
task kind, with the task's name, layer, bytes and duration on hover. One trace per *kind*, not per
task, so ten thousand bars stay one quick figure. The legend lies below the lanes, in rows, and the
figure grows by a row for every :data:`LEGEND_PER_ROW` kinds, so every kind stays visible (a legend
beside a short figure cuts off what does not fit).

It refuses ``px.timeline`` (it forces a date axis onto what are seconds) and never drops the
timeline's provenance: the title says "simulated on <profile>" or "measured on <machine>".
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from offloadkit.runtime.timeline import Timeline

#: A fixed color per task kind, so figures of different plans compare at a glance.
KIND_COLORS = {
    "embed": "#8c564b", "attn_norm": "#c7c7c7", "ffn_norm": "#c7c7c7", "final_norm": "#c7c7c7",
    "attn_qkv": "#1f77b4", "attention": "#17becf", "attn_o": "#aec7e8", "router": "#bcbd22",
    "expert": "#ff7f0e", "shared_expert": "#ffbb78", "shared_gate": "#dbdb8d", "ffn": "#ff7f0e",
    "lm_head": "#9467bd", "activation": "#2ca02c", "weights": "#d62728",
}


LEGEND_PER_ROW = 5  # legend entries per row, at plotly's default width (700 px)
LANE_PX, LEGEND_ROW_PX, FRAME_PX = 45, 24, 170  # a lane, a legend row, the title + axis + margins


def figure_height(lanes: int, kinds: int) -> int:
    """Pixels for ``lanes`` rows of bars and a legend of ``kinds`` entries below them (never clipped)."""
    return FRAME_PX + LANE_PX * max(lanes, 1) + LEGEND_ROW_PX * -(-kinds // LEGEND_PER_ROW)


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def timeline_traces(timeline: Timeline, *, legendgroup: str = "", showlegend: bool = True) -> list[go.Bar]:
    """One horizontal ``go.Bar`` per task kind of ``timeline`` (start as ``base``, duration as ``x``, in ms).

    The building block of :func:`timeline_figure` and of the dashboards' subplots
    (:mod:`offloadkit.viz.dashboards`): each trace's ``meta`` is its kind (``legendgroup`` + kind if
    given), so a figure drawing two timelines keeps one legend entry per kind.
    """
    by_kind: dict[str, list] = {}
    for r in timeline.records:
        by_kind.setdefault(r.kind or r.lane, []).append(r)
    known = list(KIND_COLORS)  # the legend in one fixed order, so figures of two plans read alike
    kinds = sorted(by_kind, key=lambda k: (known.index(k) if k in known else len(known), k))
    out = []
    for kind in kinds:
        recs = by_kind[kind]
        # numpy arrays: plotly validates them in one go instead of element by element
        custom = np.empty((len(recs), 4), dtype=object)
        custom[:] = [(r.name, "" if r.layer is None else r.layer, _fmt_bytes(r.bytes_), r.duration_s * 1e3)
                     for r in recs]
        out.append(go.Bar(
            name=kind, orientation="h", y=np.array([r.lane for r in recs], dtype=object),
            x=np.fromiter((r.duration_s * 1e3 for r in recs), float, len(recs)),
            base=np.fromiter((r.start_s * 1e3 for r in recs), float, len(recs)),
            marker_color=KIND_COLORS.get(kind), marker_line_width=0, customdata=custom,
            legendgroup=kind, showlegend=showlegend, meta=f"{legendgroup}{kind}",
            hovertemplate="%{customdata[0]}<br>layer %{customdata[1]}<br>%{customdata[2]}"
                          "<br>%{customdata[3]:.4f} ms<extra>" + kind + "</extra>",
        ))
    return out


def timeline_figure(timeline: Timeline, *, step: int | None = None, title: str | None = None,
                    height: int | None = None) -> go.Figure:
    """The lanes of ``timeline`` (only ``step`` if given: 0 is the prefill) as a plotly figure, times in ms.

    ``height`` defaults to :func:`figure_height`: room for every lane and every legend row.
    """
    tl = timeline.select(step=step) if step is not None else timeline
    lanes = tl.lanes()
    fig = go.Figure(timeline_traces(tl))
    what = " · ".join(str(timeline.meta[k]) for k in ("model", "plan", "workload") if k in timeline.meta)
    where = "" if step is None else (" · prefill" if step == 0 else f" · decode step {step}")
    fig.update_layout(
        title=title or f"{what}{where} — {timeline.label}", barmode="overlay",
        height=height or figure_height(len(lanes), len(fig.data)), bargap=0.25,
        xaxis_title=f"time (ms, {timeline.source})",
        yaxis={"categoryorder": "array", "categoryarray": list(reversed(lanes)), "title": "lane"},
        legend={"orientation": "h", "yanchor": "top", "y": -0.25, "x": 0, "title": {"text": "task kind"},
                "traceorder": "normal", "entrywidth": 1 / LEGEND_PER_ROW - 0.01, "entrywidthmode": "fraction"},
    )
    return fig


def sync_figure(widget: go.FigureWidget, new: go.Figure) -> go.FigureWidget:
    """Make ``widget`` show ``new``: its traces and layout replaced in one batched update (one message to
    the browser). Quicker than updating trace by trace when a redraw changes most of the data (measured:
    ~25 ms against ~35 ms for a Mixtral step's timeline). Returns ``widget``."""
    with widget.batch_update():
        widget.data = []
        widget.add_traces(list(new.data))
        widget.layout = new.layout
    return widget


def write_timeline_html(timeline: Timeline, path: str, *, offline: bool = True, **kwargs: object) -> str:
    """Write :func:`timeline_figure` as one HTML file; ``offline`` embeds plotly.js (else it loads from a CDN)."""
    fig = timeline_figure(timeline, **kwargs)  # type: ignore[arg-type]
    fig.write_html(path, include_plotlyjs=True if offline else "cdn")
    return path


__all__ = ["KIND_COLORS", "figure_height", "sync_figure", "timeline_figure", "timeline_traces",
           "write_timeline_html"]
