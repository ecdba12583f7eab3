"""Figures of token assignment (chapter 07): how one step's rows split into GG, CG and CC, and why.

A plan fixes the GG rows of every block; at each step :class:`~offloadkit.plan.assign.TokenAssigner`
splits the rest of each block the step uses between the CPU (CC) and streaming (CG). This module turns
those decisions into data (:func:`step_assignment`, :func:`balance_curve`, :func:`trace_counts`) and
draws them:

- :func:`balance_figure` — one expert, no GG rows, ``n = 1 … 512`` tokens: CPU only, stream all, and
  the balanced split (decode leans on the CPU, prefill on streaming);
- :func:`expert_counts_figure` — tokens per expert and layer (a heatmap), e.g. from a recorded trace;
- :func:`assignment_figure` — one step, per layer: the weight bytes it uses, stacked GG / CG / CC;
- :func:`layer_assignment_figure` — one layer of one step, per block (per expert): rows GG / CG / CC;
- :class:`StepScrubber` — an ``IntSlider`` over a simulated generation's steps that redraws the step's
  assignment and its timeline in place.

It draws and prices through the package's planner; it never measures. Titles say **simulated on**
the profile, or **measured** for a recorded trace (where and by whom the trace says).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from offloadkit.hardware.profile import HardwareProfile
from offloadkit.model.spec import ModelSpec
from offloadkit.plan.assign import TokenAssigner
from offloadkit.plan.costmodel import CostModel
from offloadkit.plan.plans import Plan, Workload
from offloadkit.plan.routing import Routing, RoutingTrace, counts_from_choices, parse_routing
from offloadkit.plan.split_search import balance, lane_loads
from offloadkit.runtime.sim import simulate, step_shapes
from offloadkit.runtime.timeline import Timeline
from offloadkit.viz.controls import ControlPanel
from offloadkit.viz.timeline import sync_figure, timeline_figure

PARTS = ("gg", "cg", "cc")
PART_LABELS = {"gg": "GG (resident, GPU)", "cg": "CG (streamed, GPU)", "cc": "CC (CPU)"}
PART_COLORS = {"gg": "#2ca02c", "cg": "#d62728", "cc": "#1f77b4"}
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIB = 2**20


# ---- the data ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockSplit:
    """One block a step uses: its rows as GG (resident), CG (streamed) and CC (CPU), for ``tokens`` tokens."""

    layer: int | None
    name: str
    kind: str
    tokens: int
    gg: int
    cg: int
    cc: int
    bytes_per_row: float

    @property
    def rows(self) -> int:
        return self.gg + self.cg + self.cc


def step_assignment(spec: ModelSpec, plan: Plan, profile: HardwareProfile, tokens: int,
                    counts: Sequence[Sequence[int]] | np.ndarray, batch: int = 1,
                    assigner: TokenAssigner | None = None) -> list[BlockSplit]:
    """The split of every block a step of ``tokens`` tokens uses, per the plan's rule; ``counts`` [L, E]
    are the tokens of each expert (from the routing); the lm_head samples ``batch`` positions."""
    a = assigner or TokenAssigner(spec, plan, CostModel(profile, spec, pinned=plan.pinned))
    wb = a.cost.weight_bytes
    out: list[BlockSplit] = []

    def add(block: Any, n: int, streamed: int) -> None:
        gg = min(plan.resident(block), block.rows)
        cg = min(streamed, block.rows - gg)
        out.append(BlockSplit(block.layer, block.name, block.kind, n, gg, cg, block.rows - gg - cg,
                              block.params * wb / block.rows))

    for layer in range(spec.n_layers):
        barriers, shared, experts = a.layers[layer]
        dense = a.dense(layer, tokens)
        for b in barriers:
            add(b, tokens, dense.get(b.name, 0))
        if experts or shared is not None:
            row = [int(x) for x in counts[layer]] if experts else []
            s_shared, cg = a.moe(layer, tokens, row) if experts else (0, [])
            if shared is not None:
                add(shared, tokens, s_shared)
            for e, k in enumerate(row):
                if k:
                    add(experts[e], k, cg[e])
    add(a.head_block, batch, a.head(batch))
    return out


@dataclass(frozen=True)
class BalanceCurve:
    """One block with no GG rows at several token counts: seconds (busiest lane) of three ways to run it."""

    block: str
    tokens: list[int]
    cpu_only_s: list[float]  # all rows CC
    stream_all_s: list[float]  # all rows CG: copied, then computed by the GPU
    balanced_s: list[float]  # the token assignment's split
    streamed_share: list[float]  # of the rows, in the balanced split


def balance_curve(spec: ModelSpec, profile: HardwareProfile, tokens: Sequence[int] = TOKENS,
                  kind: str = "expert") -> BalanceCurve:
    """The first block of ``kind`` (default: a routed expert) with no GG rows, balanced on its own at each
    token count by :func:`~offloadkit.plan.split_search.balance` (the ``balance`` rule's split)."""
    block = next(b for b in spec.blocks() if b.kind == kind)
    plan = Plan("balance-demo", {}, (True,) * spec.n_layers, assign="balance")
    a = TokenAssigner(spec, plan, CostModel(profile, spec))
    zero = (0.0, 0.0, 0.0)
    cpu, stream, best, share = [], [], [], []
    for n in tokens:
        it = a.item(block, n)
        s = balance([it])[0]
        cpu.append(max(lane_loads([it], [0], zero)))
        stream.append(max(lane_loads([it], [it.host], zero)))
        best.append(max(lane_loads([it], [s], zero)))
        share.append(s / it.host)
    return BalanceCurve(block.name, list(tokens), cpu, stream, best, share)


def trace_counts(trace: RoutingTrace, steps: slice | None = None) -> np.ndarray:
    """Tokens routed to each expert per MoE layer [L_moe, E] over the trace's ``steps`` (all by default;
    ``slice(0, 1)`` is the prefill, ``slice(1, None)`` the decode steps)."""
    edges = np.concatenate(([0], np.cumsum(trace.step_tokens)))
    lo, hi, _ = (steps or slice(None)).indices(len(trace.step_tokens))
    return counts_from_choices(trace.experts[:, edges[lo]:edges[max(hi, lo)]], trace.n_experts)


# ---- the figures ------------------------------------------------------------------------------------

def balance_figure(curve: BalanceCurve, where: str) -> go.Figure:
    """Left: ms per token count for CPU only, stream all, balanced; right: the streamed share of the rows."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.14,
                        subplot_titles=("time of the block (busiest lane)", "rows streamed (CG) by balance"))
    x = curve.tokens
    for key, label, color, dash in (("cpu_only_s", "CPU only (all CC)", PART_COLORS["cc"], "dot"),
                                    ("stream_all_s", "stream all (all CG)", PART_COLORS["cg"], "dot"),
                                    ("balanced_s", "balanced CC/CG split", "black", "solid")):
        fig.add_scatter(x=x, y=[v * 1e3 for v in getattr(curve, key)], mode="lines+markers", name=label,
                        line={"color": color, "dash": dash}, row=1, col=1,
                        hovertemplate="%{x} tokens: %{y:.2f} ms<extra>" + label + "</extra>")
    fig.add_scatter(x=x, y=[100 * v for v in curve.streamed_share], mode="lines+markers", showlegend=False,
                    line={"color": PART_COLORS["cg"]}, row=1, col=2, name="streamed share",
                    hovertemplate="%{x} tokens: %{y:.0f} % streamed<extra></extra>")
    fig.update_xaxes(type="log", title_text="tokens using the block (decode ← → prefill)",
                     tickvals=[t for t in x if t in (1, 4, 16, 64, 256)] or None)
    fig.update_yaxes(type="log", dtick=1, title_text="ms (simulated, log scale)", row=1, col=1)
    fig.update_yaxes(title_text="% of its rows streamed", range=[-3, 103], row=1, col=2)
    fig.update_layout(title=f"One {curve.block} with no GG rows: CPU, stream, or both<br><sup>simulated "
                            f"(cost model) on {where}</sup>", height=430, margin={"t": 100},
                      legend={"orientation": "h", "y": -0.25, "x": 0})
    return fig


def expert_counts_figure(counts: np.ndarray, title: str, layers: Sequence[int] | None = None) -> go.Figure:
    """A heatmap of tokens per expert (x) and layer (y), the counts written in the cells."""
    counts = np.asarray(counts)
    layers = list(layers) if layers is not None else list(range(counts.shape[0]))
    fig = go.Figure(go.Heatmap(z=counts, x=[f"E{e}" for e in range(counts.shape[1])], y=[f"L{i}" for i in layers],
                               colorscale="Blues", text=counts, texttemplate="%{text}",
                               colorbar={"title": {"text": "tokens"}},
                               hovertemplate="layer %{y}, expert %{x}: %{z} tokens<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="expert", yaxis={"title": "MoE layer", "autorange": "reversed"},
                      height=170 + 32 * len(layers), margin={"t": 90})
    return fig


def _title(what: str, where: str) -> str:
    return f"{what}<br><sup>simulated on {where}</sup>"


def assignment_data(splits: list[BlockSplit]) -> tuple[list[str], dict[str, list[float]]]:
    """x labels (``0`` … ``head``) and MiB of weights per part per layer of a step's splits."""
    labels: list[str] = []
    sums: dict[str, dict[str, float]] = {p: {} for p in PARTS}
    for s in splits:
        lab = "head" if s.layer is None else str(s.layer)
        if lab not in labels:
            labels.append(lab)
        for p in PARTS:
            sums[p][lab] = sums[p].get(lab, 0.0) + getattr(s, p) * s.bytes_per_row / MIB
    return labels, {p: [sums[p].get(lab, 0.0) for lab in labels] for p in PARTS}


def assignment_figure(splits: list[BlockSplit], what: str, where: str) -> go.Figure:
    """Per layer, the MiB of weights a step uses, stacked by where they are computed (GG / CG / CC)."""
    fig = go.Figure()
    draw_assignment(fig, splits, what, where)
    return fig


def draw_assignment(fig: go.Figure, splits: list[BlockSplit], what: str, where: str) -> go.Figure:
    """Fill (or update in place) the traces of :func:`assignment_figure`."""
    labels, mib = assignment_data(splits)
    for p in PARTS:
        total = sum(mib[p])
        props = {"x": labels, "y": mib[p], "name": f"{PART_LABELS[p]}: {total / 1024:.2f} GiB"}
        t = next((t for t in fig.data if t.meta == p), None)
        if t is None:
            fig.add_bar(meta=p, marker_color=PART_COLORS[p], hovertemplate="%{x}: %{y:.0f} MiB<extra>"
                        + PART_LABELS[p] + "</extra>", **props)
        else:
            t.update(**props)
    fig.update_layout(title=_title(what, where), barmode="stack", height=440, margin={"t": 90},
                      xaxis={"title": "layer (head: the lm_head)", "tickangle": 0, "type": "category"},
                      yaxis_title="weights the step uses (MiB)",
                      legend={"orientation": "h", "y": -0.22, "x": 0, "traceorder": "normal"})
    return fig


def layer_assignment_figure(splits: list[BlockSplit], layer: int, what: str, where: str) -> go.Figure:
    """One layer of a step: rows of each block it uses (attention, each chosen expert), GG / CG / CC."""
    mine = [s for s in splits if s.layer == layer]
    x = [f"{s.name.split('.', 1)[1]}<br>{s.tokens} tok" for s in mine]
    fig = go.Figure()
    for p in PARTS:
        fig.add_bar(x=x, y=[getattr(s, p) for s in mine], name=PART_LABELS[p], marker_color=PART_COLORS[p],
                    hovertemplate="%{x}: %{y} rows<extra>" + PART_LABELS[p] + "</extra>")
    fig.update_layout(title=f"Layer {layer}, per block<br><sup>{what}<br>simulated on {where}</sup>", barmode="stack",
                      xaxis_title="block (tokens it gets at this step)", yaxis_title="rows", height=440,
                      margin={"t": 110}, legend={"orientation": "h", "y": -0.25, "x": 0, "traceorder": "normal"})
    return fig


# ---- the scrubber -----------------------------------------------------------------------------------


class StepScrubber:
    """An ``IntSlider`` over the steps of a simulated generation (0 = the prefill, then each decode step);
    moving it redraws that step's assignment (:func:`assignment_figure`) and its timeline in place.

    The generation is simulated once, with its timeline, in the constructor; :meth:`show` (the
    slider's callback) only selects. With a prefill in several ``ubatch`` chunks, step 0 draws the
    first chunk's assignment (the timeline shows them all).
    """

    def __init__(self, spec: ModelSpec, profile: HardwareProfile, plan: Plan, workload: Workload,
                 routing: Routing | str | None = None, seed: int = 0) -> None:
        self.spec, self.profile, self.plan, self.workload = spec, profile, plan, workload
        self.routing = parse_routing(routing, seed) if routing is None or isinstance(routing, str) else routing
        self.result = simulate(spec, profile, plan, workload, self.routing)
        shapes = step_shapes(workload, plan)
        counts = (self.routing.step_counts(spec, [s.n for s in shapes]) if spec.is_moe
                  else np.zeros((len(shapes), spec.n_layers, 0), dtype=np.int64))
        self.steps: dict[int, tuple[int, np.ndarray]] = {}
        for shape, c in zip(shapes, counts, strict=True):
            self.steps.setdefault(shape.step, (shape.n, c))
        by_step: dict[int, list] = {}
        for r in self.result.timeline.records:
            by_step.setdefault(r.step, []).append(r)
        tl = self.result.timeline
        self.timelines = {s: Timeline(tl.source, tl.machine, recs, dict(tl.meta)) for s, recs in by_step.items()}
        self.assigner = TokenAssigner(spec, plan, CostModel(profile, spec, pinned=plan.pinned))
        self.slider = widgets.IntSlider(value=0, min=0, max=max(self.steps), description="step",
                                        continuous_update=False, layout=widgets.Layout(width="500px"))
        self.fig_assignment = go.FigureWidget()
        self.fig_timeline = go.FigureWidget(timeline_figure(self.timelines[0], step=0))
        self.fig_timeline.update_layout(margin={"t": 90})
        self.where = profile.name
        self.slider.observe(lambda change: self.show(change["new"]), names="value")
        self.show(0)

    def splits(self, step: int) -> list[BlockSplit]:
        """The assignment of ``step`` (0: the prefill's first chunk)."""
        n, counts = self.steps[step]
        return step_assignment(self.spec, self.plan, self.profile, n, counts, self.workload.batch, self.assigner)

    def label(self, step: int) -> str:
        n = self.steps[step][0]
        what = "prefill" if step == 0 else f"decode step {step}"
        return f"{self.spec.name or self.spec.arch} · {self.plan.name} · {what} ({n} token{'' if n == 1 else 's'})"

    def show(self, step: int) -> None:
        """Redraw both figures for ``step`` (the slider's callback; call it directly in tests)."""
        if self.slider.value != step:
            self.slider.value = step  # observe calls back into show
            return
        with self.fig_assignment.batch_update():
            draw_assignment(self.fig_assignment, self.splits(step), f"Token assignment · {self.label(step)}",
                            self.where)
        new = timeline_figure(self.timelines[step], step=step, title=f"Timeline · {self.label(step)}<br>"
                                                                     f"<sup>{self.result.timeline.label}</sup>")
        new.update_layout(margin={"t": 90})
        sync_figure(self.fig_timeline, new)

    def widget(self) -> widgets.VBox:
        return widgets.VBox([self.slider, self.fig_assignment, self.fig_timeline])

    _ipython_display_ = ControlPanel._ipython_display_


__all__ = ["PARTS", "BalanceCurve", "BlockSplit", "StepScrubber", "assignment_data", "assignment_figure",
           "balance_curve", "balance_figure", "draw_assignment", "expert_counts_figure", "layer_assignment_figure",
           "step_assignment", "trace_counts"]
