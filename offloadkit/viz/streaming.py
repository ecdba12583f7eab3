"""Chapter 05's figures and the small computations behind them: streaming weights over PCIe.

Chapter 05 (``notebooks/05_pcie_streaming``) teaches three things about the ``h2d`` lane: why copies
come from page-locked (pinned) memory, why a streamed weight needs two or more staging buffers on the
GPU to overlap its copy with the compute of the weight before it, and how
:class:`~offloadkit.runtime.streaming.WeightStreamer` gets pinned memory for Mixtral-sized models
without pinning 70 GB. The notebook shows each of them simulated (the cost model on a named profile)
and measured (the hybrid engine on the loopback device, or a real GPU where there is one); this module
holds what it draws and computes, so the notebook stays prose and calls and the tests can check what
every figure says. The figure builders are pure functions of their data (timelines, rates, sizes);
:func:`measured_link_rates`, :func:`prefill_runs` and :func:`staging_runs` measure, and say so:

- :class:`LinkRates`, :func:`catalog_link_rates`, :func:`measured_link_rates` and
  :func:`pinned_vs_pageable_figure`: pinned against pageable copy bandwidth, from the catalog's link
  figures or measured with :func:`offloadkit.hardware.probe_cuda.copy_gbps` on a GPU;
- :func:`streaming_plan`: a plan whose expert rows stream at every step (resident attention, norms,
  routers and lm_head), with a chosen number of staging buffers;
- :func:`rebase`, :func:`step_s`, :func:`overlap_s`, :func:`copy_compute_overlap_s`, :func:`copies_s`,
  :func:`streamed_compute_s`, :func:`copy_gbps`, :func:`prefill_runs`,
  :func:`staging_runs`, :func:`median_run` and :func:`staging_figure`: one step's timeline per
  staging-buffer count, stacked on one time axis;
- :func:`measured_vs_simulated_figure` and :func:`lane_busy_figure`: a measured step beside the
  simulator's prediction of the same step;
- :class:`StreamerSizing`, :func:`streamer_sizing` and :func:`streamer_figure`: the bytes behind
  ``WeightStreamer.mode`` (pin every streamed host row, or a ring of pinned slots).

Every figure's title says **measured** (and the machine, with the loopback device's own warning that
its lanes are CPU threads) or **simulated** / **catalog figures** (and the profile), as
docs/DESIGN.md section 12 asks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from offloadkit.model.spec import ModelSpec
from offloadkit.plan.plans import Plan, plan_blocks, units
from offloadkit.runtime.streaming import StreamerSizing, streamer_sizing
from offloadkit.runtime.timeline import LANES, TaskRecord, Timeline
from offloadkit.viz.timeline import KIND_COLORS

GIB = 2**30
COPY_KINDS = ("h2d pinned", "h2d pageable", "d2h pinned", "d2h pageable")
COPY_COLORS = {"h2d pinned": "#d62728", "h2d pageable": "#ff9896", "d2h pinned": "#1f77b4",
               "d2h pageable": "#aec7e8"}


# ---- 1. pinned vs pageable ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinkRates:
    """Copy bandwidth of one CPU<->GPU link in GB/s, per direction, from pinned and from pageable memory."""

    name: str
    h2d_pinned: float
    h2d_pageable: float
    d2h_pinned: float
    d2h_pageable: float

    def rate(self, kind: str) -> float:
        """GB/s of ``kind`` (one of :data:`COPY_KINDS`, e.g. ``"h2d pinned"``)."""
        return getattr(self, kind.replace(" ", "_"))

    def ratio(self, direction: str = "h2d") -> float:
        """How many times faster a pinned copy is than a pageable one."""
        return self.rate(f"{direction} pinned") / self.rate(f"{direction} pageable")


def catalog_link_rates(profiles: Sequence[Any]) -> list[LinkRates]:
    """The link figures of each profile that has a link (catalog: spec sheets × effective fractions)."""
    return [LinkRates(f"{p.name}<br>({p.link.name})", p.link.h2d_pinned_gbps, p.link.h2d_pageable_gbps,
                      p.link.d2h_pinned_gbps, p.link.d2h_pageable_gbps) for p in profiles if p.link is not None]


def measured_link_rates(name: str, nbytes: int, copy: Callable[[str, bool, int], float] | None = None) -> LinkRates:
    """The four copies measured on this machine's GPU (``copy``: ``probe_cuda.copy_gbps`` by default, which
    needs CUDA); ``name`` labels the bars (the GPU's name)."""
    if copy is None:
        from offloadkit.hardware.probe_cuda import copy_gbps as copy
    return LinkRates(name, copy("h2d", True, nbytes), copy("h2d", False, nbytes), copy("d2h", True, nbytes),
                     copy("d2h", False, nbytes))


def pinned_vs_pageable_figure(rates: Sequence[LinkRates], source: str) -> go.Figure:
    """Grouped bars: GB/s of the four copies per link, the pinned/pageable ratio written over the h2d pair.

    ``source`` ends the title and must say where the figures come from (``"measured on <GPU>, 256 MiB
    copies"`` or ``"simulated/catalog figures: spec sheets × effective fractions"``).
    """
    names = [r.name for r in rates]
    fig = go.Figure()
    for kind in COPY_KINDS:
        fig.add_bar(name=kind, x=names, y=[r.rate(kind) for r in rates], marker_color=COPY_COLORS[kind],
                    text=[f"{r.rate(kind):.1f}" for r in rates], textposition="outside",
                    hovertemplate="%{x}: %{y:.1f} GB/s<extra>" + kind + "</extra>")
    top = max((r.rate(k) for r in rates for k in COPY_KINDS), default=1.0)
    for r in rates:
        fig.add_annotation(x=r.name, y=top * 1.22, text=f"<b>{r.ratio('h2d'):.1f}×</b>", showarrow=False,
                           font={"size": 13})
    title, margin = _title("Copies from pinned vs pageable host memory (over each link: h2d pinned ÷ pageable)",
                           source)
    fig.update_layout(barmode="group", title=title,
                      yaxis={"title": "GB/s", "range": [0, top * 1.35]}, xaxis={"tickangle": 0},
                      height=margin + 370, margin={"t": margin}, legend={"orientation": "h", "y": -0.22, "x": 0})
    return fig


# ---- 2. double buffering ----------------------------------------------------------------------------------

def streaming_plan(spec: ModelSpec, staging_buffers: int, *, expert_share: float = 0.0, stream_min_tokens: int = 1,
                   assign: str | None = None, chunk: int = 128) -> Plan:
    """A plan that streams expert rows: attention, norms, routers and the lm_head resident on the GPU, the
    first ``expert_share`` of each expert's rows resident (rounded down to ``chunk`` rows, or to whole rows
    when the block has fewer), every other row in host memory; the KV cache on the GPU.

    The host rows go by the ``threshold`` rule (all streamed at ``>= stream_min_tokens`` tokens), or by
    ``assign`` (``"balance"``: ScheInfer's per-step CC/CG split) when given.
    """
    gg = {}
    for b in plan_blocks(spec):
        if b.kind in ("expert", "ffn", "shared_expert"):
            rows = int(b.rows * expert_share)
            step = chunk if b.rows >= 4 * chunk else 1
            gg[b.name] = rows // step * step
        elif b.kind != "embed":
            gg[b.name] = units(b)
    gg = {k: v for k, v in gg.items() if v}
    kw: dict[str, Any] = {"assign": assign} if assign else {"stream_min_tokens": stream_min_tokens}
    rule = assign or f"threshold {stream_min_tokens}"
    return Plan("streaming", gg, (True,) * spec.n_layers, label=f"stream experts ({rule}), {staging_buffers} "
                f"staging buffer{'s' if staging_buffers > 1 else ''}", staging_buffers=staging_buffers, **kw)


def rebase(timeline: Timeline, step: int | None = 0) -> Timeline:
    """``step`` of ``timeline`` (all of it with None) with times from that step's first start."""
    return timeline.rebased(step)


def step_s(timeline: Timeline, step: int | None = 0) -> float:
    """Seconds from the first start to the last end of ``step``."""
    return (timeline.select(step=step) if step is not None else timeline).makespan_s


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def overlap_s(timeline: Timeline, first: Callable[[TaskRecord], bool], second: Callable[[TaskRecord], bool]) -> float:
    """Seconds during which a task matching ``first`` and a task matching ``second`` both run."""
    a = _union([(r.start_s, r.end_s) for r in timeline.records if first(r)])
    b = _union([(r.start_s, r.end_s) for r in timeline.records if second(r)])
    total, j = 0.0, 0
    for s0, e0 in a:
        while j < len(b) and b[j][1] <= s0:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e0:
            total += max(0.0, min(e0, b[k][1]) - max(s0, b[k][0]))
            k += 1
    return total


def is_weight_copy(r: TaskRecord) -> bool:
    """A streamed weight's copy (the ``h2d`` lane's ``weights`` tasks, named ``<slice>.w``)."""
    return r.kind == "weights"


def is_streamed_compute(timeline: Timeline) -> Callable[[TaskRecord], bool]:
    """A test for the GPU's compute of a streamed slice in ``timeline``: the task a weight copy's name names
    (``L0.expert3.w`` feeds ``L0.expert3``, ``L0.expert3.cg.w`` feeds ``L0.expert3.cg``)."""
    fed = {r.name.removesuffix(".w") for r in timeline.records if is_weight_copy(r)}
    return lambda r: r.lane == "gpu" and r.name in fed


def copy_compute_overlap_s(timeline: Timeline) -> float:
    """Seconds during which a weight copy ran while the GPU computed a streamed slice."""
    return overlap_s(timeline, is_weight_copy, is_streamed_compute(timeline))


def copies_s(timeline: Timeline) -> float:
    """Seconds the weight copies took, summed."""
    return sum(r.duration_s for r in timeline.records if is_weight_copy(r))


def streamed_compute_s(timeline: Timeline) -> float:
    """Seconds the GPU spent computing streamed slices, summed."""
    test = is_streamed_compute(timeline)
    return sum(r.duration_s for r in timeline.records if test(r))


def copy_gbps(timeline: Timeline) -> float:
    """The rate the weight copies achieved: their bytes over their summed durations, in GB/s (0 without copies)."""
    secs = copies_s(timeline)
    return sum(r.bytes_ for r in timeline.records if is_weight_copy(r)) / secs / 1e9 if secs > 0 else 0.0


def prefill_runs(engine: Any, prompt_ids: torch.Tensor, repeats: int) -> list[Timeline]:
    """``repeats`` prefills of ``prompt_ids`` on a :class:`~offloadkit.runtime.engine.HybridEngine`, each on a
    fresh cache after one warm-up, as measured timelines rebased to 0 (one per prompt chunk, joined)."""
    out = []
    for i in range(repeats + 1):
        engine.forward(prompt_ids, engine.new_cache(prompt_ids.shape[0], prompt_ids.shape[1]))
        if i == 0:
            continue  # the warm-up: first-call allocations and compilation
        origin = min(run.start_s[0] for run in engine.last_steps)
        records = [r for run in engine.last_steps for r in run.records(origin, 0)]
        out.append(Timeline("measured", engine.timeline.machine, records, dict(engine.timeline.meta)))
    return out


def staging_runs(spec: ModelSpec, weights: Mapping[str, torch.Tensor], profile: Any, make_device: Callable[[], Any],
                 prompt_ids: torch.Tensor, buffers: Sequence[int] = (1, 2, 3), repeats: int = 5,
                 **plan_options: Any) -> dict[int, list[Timeline]]:
    """Per staging-buffer count ``k``: :func:`prefill_runs` of ``prompt_ids`` under :func:`streaming_plan` (``k``
    buffers, ``plan_options``) on a fresh device from ``make_device()``, with the engine's checks on (every
    value on the right side before it is read, no staging buffer overwritten while its reader runs)."""
    from offloadkit.plan.plans import Workload
    from offloadkit.runtime.engine import HybridEngine

    out = {}
    for k in buffers:
        plan = streaming_plan(spec, k, **plan_options)
        with HybridEngine(spec, weights, plan, profile, make_device(), workload=Workload(prompt_ids.shape[1], 1),
                          check=True) as engine:
            out[k] = prefill_runs(engine, prompt_ids, repeats)
    return out


def median_run(timelines: Sequence[Timeline]) -> Timeline:
    """The run whose step time is the median (the lower one of an even count)."""
    ordered = sorted(timelines, key=lambda t: t.makespan_s)
    return ordered[(len(ordered) - 1) // 2]


def provenance(timeline: Timeline) -> str:
    """``"simulated on rtx4090-desktop"`` or ``"measured on <machine>"``, with the loopback's warning."""
    lanes = timeline.meta.get("lanes")
    return timeline.label + (f" — {lanes}" if timeline.source == "measured" and lanes else "")


def _lines(text: str, width: int = 125) -> list[str]:
    """``text`` cut into lines of at most ``width`` characters, at spaces."""
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line]


def _title(head: str, *notes: str) -> tuple[str, int]:
    """A title: ``head``, then each note in small type, wrapped; and the top margin (px) it needs."""
    small = [line for note in notes if note for line in _lines(note)]
    return "<br>".join([head, *(f"<sup>{line}</sup>" for line in small)]), 64 + 24 * len(small)


def _lanes_of(timelines: Sequence[Timeline]) -> list[str]:
    used = {r.lane for t in timelines for r in t.records}
    return [lane for lane in LANES if lane in used]


def _add_tasks(fig: go.Figure, tl: Timeline, row: int, shown: set[str], col: int = 1) -> None:
    by_kind: dict[str, list[TaskRecord]] = {}
    for r in tl.records:
        by_kind.setdefault(r.kind or r.lane, []).append(r)
    known = list(KIND_COLORS)
    for kind in sorted(by_kind, key=lambda k: (known.index(k) if k in known else len(known), k)):
        recs = by_kind[kind]
        fig.add_bar(orientation="h", y=[r.lane for r in recs], x=[r.duration_s * 1e3 for r in recs],
                    base=[r.start_s * 1e3 for r in recs], name=kind, legendgroup=kind, showlegend=kind not in shown,
                    marker_color=KIND_COLORS.get(kind, "#7f7f7f"),
                    # copies run back to back: a white edge keeps each one visible (other tasks are too short)
                    marker_line={"width": 1 if kind == "weights" else 0, "color": "white"},
                    customdata=[[r.name, r.duration_s * 1e3] for r in recs],
                    hovertemplate="%{customdata[0]}<br>%{customdata[1]:.3f} ms<extra>" + kind + "</extra>",
                    row=row, col=col)
        shown.add(kind)


def staging_figure(timelines: Mapping[int, Timeline], *, layers: tuple[int, int] | None = None,
                   what: str = "") -> go.Figure:
    """One step per staging-buffer count (``{k: timeline}``, each rebased to 0), stacked on one time axis,
    lanes as rows, each panel titled with its step time and how long weight copies overlapped streamed
    compute. ``layers=(a, b)`` keeps the tasks of layers ``a..b`` only (a window into a long step)."""
    ks = sorted(timelines)
    shown_tl = {k: timelines[k] if layers is None else
                Timeline(timelines[k].source, timelines[k].machine,
                         [r for r in timelines[k].records if r.layer is not None and layers[0] <= r.layer <= layers[1]],
                         dict(timelines[k].meta)) for k in ks}
    titles = []
    for k in ks:
        tl = timelines[k]
        ov = copy_compute_overlap_s(tl)
        titles.append(f"<b>{k} staging buffer{'s' if k > 1 else ''}</b>: whole step {step_s(tl, None) * 1e3:.1f} ms · "
                      f"copies {copies_s(tl) * 1e3:.1f} ms · streamed compute {streamed_compute_s(tl) * 1e3:.1f} ms · "
                      f"both at once {ov * 1e3:.1f} ms")
    lanes = _lanes_of(list(shown_tl.values()))
    fig = make_subplots(rows=len(ks), cols=1, shared_xaxes=True, subplot_titles=titles, vertical_spacing=0.1)
    shown: set[str] = set()
    for a in fig.layout.annotations:
        a.font.size = 13
    for i, k in enumerate(ks, start=1):
        _add_tasks(fig, shown_tl[k], i, shown)
        fig.update_yaxes(categoryorder="array", categoryarray=list(reversed(lanes)), row=i, col=1)
    first = timelines[ks[0]]
    window = "" if layers is None else (f", layer {layers[0]}" if layers[0] == layers[1]
                                        else f", layers {layers[0]}–{layers[1]}")
    fig.update_xaxes(title_text=f"ms from the step's start ({first.source})", row=len(ks), col=1)
    title, top = _title(f"{what}{window}", provenance(first))
    fig.update_layout(barmode="overlay", bargap=0.25, height=top + 100 + len(ks) * (40 * len(lanes) + 70),
                      title=title, margin={"t": top + 30},
                      legend={"orientation": "h", "y": -0.12 if len(ks) > 2 else -0.2, "x": 0,
                              "title": {"text": "task kind"}})
    return fig


# ---- 3. measured beside simulated -------------------------------------------------------------------------

def measured_vs_simulated_figure(measured: Timeline, simulated: Timeline, what: str = "") -> go.Figure:
    """The same step measured (top) and simulated (bottom), each on its own time axis (they differ by orders
    of magnitude on the loopback device), both rebased to 0."""
    if measured.source != "measured" or simulated.source != "simulated":
        raise ValueError(f"want a measured and a simulated timeline, got {measured.source} and {simulated.source}")
    lanes = _lanes_of([measured, simulated])
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.22, subplot_titles=(
        "<br>".join(_lines(f"<b>measured</b>: {measured.makespan_s * 1e3:.2f} ms on {measured.machine}", 120)),
        f"<b>simulated</b>: {simulated.makespan_s * 1e3:.3f} ms on {simulated.machine}"))
    shown: set[str] = set()
    for i, tl in enumerate((measured, simulated), start=1):
        _add_tasks(fig, tl, i, shown)
        fig.update_yaxes(categoryorder="array", categoryarray=list(reversed(lanes)), row=i, col=1)
        fig.update_xaxes(title_text=f"ms ({tl.source})", row=i, col=1)
    title, top = _title(f"{what}: measured vs simulated", measured.meta.get("lanes", ""))
    fig.update_layout(barmode="overlay", bargap=0.25, height=top + 200 + 2 * (40 * len(lanes) + 60),
                      margin={"t": top + 45}, title=title,
                      legend={"orientation": "h", "y": -0.18, "x": 0, "title": {"text": "task kind"}})
    for a in fig.layout.annotations:
        a.font.size = 12
    return fig


def lane_busy_figure(measured: Timeline, simulated: Timeline, what: str = "") -> go.Figure:
    """Per lane, the time it spent running tasks, measured vs simulated (log scale: they differ a lot)."""
    lanes = _lanes_of([measured, simulated])
    fig = go.Figure()
    for tl, color in ((measured, "#636efa"), (simulated, "#00cc96")):
        busy = [tl.busy_s(lane) * 1e3 for lane in lanes]
        fig.add_bar(name=f"{tl.source}", x=lanes, y=busy, marker_color=color, text=[f"{v:.3g}" for v in busy],
                    textposition="outside", hovertemplate="%{x}: %{y:.3f} ms busy<extra>" + tl.source + "</extra>")
    ratio = measured.makespan_s / simulated.makespan_s if simulated.makespan_s else float("nan")
    title, top = _title(f"{what}: busy time per lane; the whole step {ratio:.0f}× longer measured",
                        f"measured on {measured.machine}", f"simulated on {simulated.machine}")
    busy_ms = [tl.busy_s(lane) * 1e3 for tl in (measured, simulated) for lane in lanes]
    lo, hi = min((v for v in busy_ms if v > 0), default=1e-3), max(busy_ms, default=1.0)
    fig.update_layout(barmode="group", yaxis={"type": "log", "title": "ms the lane was busy (log scale)", "dtick": 1,
                                              "range": [math.floor(math.log10(lo)) - 0.2, math.log10(hi * 3)]},
                      xaxis_title="lane", height=top + 330, margin={"t": top},
                      title=title,
                      legend={"orientation": "h", "y": -0.18, "x": 0})
    return fig


# ---- 4. the pinned ring -----------------------------------------------------------------------------------

def streamer_figure(sizing: StreamerSizing, what: str, where: str) -> go.Figure:
    """Horizontal bars (GiB): the host rows that may stream, the pinned budget, and the ring the streamer
    pins instead when the rows exceed the budget. ``where`` says how the numbers were obtained."""
    items = [("host rows that may stream<br>(pinned mode would lock all)", sizing.host_bytes, "#d62728"),
             ("pinned budget", sizing.budget_bytes, "#7f7f7f"),
             (f"ring: {sizing.staging_buffers} pinned slot{'s' if sizing.staging_buffers > 1 else ''}"
              f" × the largest slice", sizing.ring_bytes, "#2ca02c")]
    gib = [v / GIB for _, v, _ in items]
    fig = go.Figure(go.Bar(orientation="h", y=[n for n, _, _ in items], x=gib, marker_color=[c for _, _, c in items],
                           text=[f"{g:.2f} GiB" for g in gib], textposition="outside",
                           hovertemplate="%{y}: %{x:.3f} GiB<extra></extra>"))
    title, top = _title(f"{what}: WeightStreamer chooses <b>{sizing.mode}</b> mode", where)
    fig.update_layout(title=title,
                      xaxis={"title": "GiB of host memory", "range": [0, max(gib) * 1.25]},
                      yaxis={"autorange": "reversed"}, height=top + 250, margin={"t": top, "l": 250})
    return fig


__all__ = ["COPY_KINDS", "LinkRates", "StreamerSizing", "catalog_link_rates", "copies_s", "copy_compute_overlap_s",
           "copy_gbps", "is_streamed_compute", "is_weight_copy", "lane_busy_figure", "measured_link_rates",
           "measured_vs_simulated_figure", "median_run", "overlap_s", "pinned_vs_pageable_figure", "prefill_runs",
           "provenance", "rebase", "staging_figure", "staging_runs", "step_s", "streamed_compute_s", "streamer_figure",
           "streamer_sizing", "streaming_plan"]
