"""Plotly figures of the CPU expert measured against this machine's memory read (notebook 04).

Notebook 04 measures; these functions only draw what it measured, so the figures look the same in
every run and their titles always carry the machine (``machine_label()``) and the word **measured**.
Every measured read they draw is a :class:`~offloadkit.hardware.stream.ReadMeasurement`, so the
dashed "memory read" line carries the spread of its samples, not just one number.

:func:`vline` exists because plotly's ``add_vline(annotation_text=...)`` places the annotation at
``x`` in *axis* units, which on a log axis are log10 units: a line at 56 tokens put its label at
10^56 and stretched the axis out to it, crushing the data into one corner. It refuses nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from offloadkit.hardware.stream import ReadMeasurement
from offloadkit.runtime.timeline import Timeline


def vline(fig: go.Figure, x: float, text: str, **line: object) -> go.Figure:
    """A dotted vertical line at data value ``x`` with ``text`` above the plot, on a linear or a log x axis."""
    fig.add_vline(x=x, line_dash=line.pop("dash", "dot"), line_color=line.pop("color", "gray"), **line)
    at = math.log10(x) if fig.layout.xaxis.type == "log" else x  # annotations speak axis units
    fig.add_annotation(x=at, xref="x", y=1, yref="y domain", yanchor="bottom", text=text, showarrow=False)
    return fig


def _read_label(read: ReadMeasurement) -> str:
    lo, _, hi = read.spread
    return f"memory read {read.gbps:.1f} GB/s (best of {len(read.samples_s)}; samples {lo:.0f}-{hi:.0f})"


def steps_figure(steps: Sequence[dict], read: ReadMeasurement, machine: str, what: str) -> go.Figure:
    """Bars of GB/s per kernel step (``{"step", "gbps", "ms"}`` each) under the measured memory read."""
    fig = go.Figure(go.Bar(x=[s["step"] for s in steps], y=[s["gbps"] for s in steps], name="kernel step",
                           text=[f"{s['gbps']:.1f} GB/s<br>{s['ms']:.2f} ms" for s in steps],
                           textposition="outside"))
    fig.add_hline(y=read.gbps, line_dash="dash", annotation_text=_read_label(read),
                  annotation_position="top left")
    top = max([read.gbps, *(s["gbps"] for s in steps)])
    fig.update_layout(title=f"{what} — measured on {machine}", yaxis_title="weight bytes read per second (GB/s)",
                      yaxis_range=[0, top * 1.25], height=440, margin={"t": 60})
    return fig


def roofline_figure(points: Sequence[dict], peak_gflops: float, read: ReadMeasurement, bytes_per_weight: int,
                    switch_at: int, machine: str, what: str) -> go.Figure:
    """Measured GFLOP/s per kernel path (``{"n", "path", "gflops"}`` each) under the roof of this machine.

    The roof is ``min(peak_gflops, read x 2 n / bytes_per_weight)``: below the ridge a kernel that reads
    each weight once for all ``n`` tokens can go no faster than the memory read; above it, no faster than
    the best GEMM measured in the same run.
    """
    ns = [p["n"] for p in points]
    dense = np.logspace(0, math.log10(max(ns)), 60)
    roof = np.minimum(peak_gflops, read.gbps * 2 * dense / bytes_per_weight)
    fig = go.Figure()
    fig.add_scatter(x=dense, y=roof, name=f"roof: min(GEMM {peak_gflops:.0f} GFLOP/s, {_read_label(read)} x 2n / "
                                          f"{bytes_per_weight} B)", line={"dash": "dash", "color": "gray"},
                    hoverinfo="skip")
    for path, color in (("decode", "#1f77b4"), ("prefill", "#d62728")):
        pts = [p for p in points if p["path"] == path]
        fig.add_scatter(x=[p["n"] for p in pts], y=[p["gflops"] for p in pts], mode="lines+markers",
                        name=f"{path} kernel", line={"color": color})
    fig.update_layout(title=f"{what} — measured on {machine}", height=480, margin={"t": 70},
                      xaxis={"type": "log", "title": "tokens n"}, yaxis={"type": "log", "title": "GFLOP/s"},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0})
    return vline(fig, switch_at, f"path='auto' switches at n = {switch_at}")


def task_kinds_figure(timeline: Timeline, what: str) -> go.Figure:
    """Microseconds per decode step (steps after the prefill) by task kind, from a measured timeline."""
    decode = [r for r in timeline if r.step > 0]
    steps = {r.step for r in decode}
    per_kind: dict[str, float] = {}
    for r in decode:
        per_kind[r.kind] = per_kind.get(r.kind, 0.0) + r.duration_s * 1e6 / len(steps)
    kinds = sorted(per_kind, key=per_kind.get, reverse=True)
    fig = go.Figure(go.Bar(x=kinds, y=[per_kind[k] for k in kinds]))
    fig.update_layout(title=f"{what}: µs per decode step by task kind (mean of {len(steps)} steps)<br>"
                            f"{timeline.label}", yaxis_title="µs per decode step", height=420, margin={"t": 90})
    return fig


__all__ = ["roofline_figure", "steps_figure", "task_kinds_figure", "vline"]
