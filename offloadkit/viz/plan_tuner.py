"""The plan tuner: change the machine or the workload, see the ScheInfer plan and the baselines move.

:class:`PlanTuner` is an ipywidgets panel for chapter 06. Six controls (usable GPU memory, PCIe
generation, DRAM bandwidth, prompt length, generation length, routing skew) define a what-if profile
(:func:`~offloadkit.hardware.whatif.what_if` of a catalog profile) and a workload; every change
re-plans ``scheinfer`` and the baselines (``llamacpp``, ``fiddler``, ``ktransformers``) with
:func:`~offloadkit.runtime.compare.compare_policies` and redraws three plotly ``FigureWidget`` s in
place (``fig.batch_update()``, the traces updated, never rebuilt):

(a) predicted tokens/s per phase and policy, with the phase's lower bound as a marker;
(b) the speedup of scheinfer over each baseline per phase;
(c) scheinfer's plan: the GG share of each layer's bytes by block kind, and every policy's GPU memory by use.

Each control's callback is the plain method :meth:`PlanTuner._update`, so tests drive the tuner
without a browser (``tuner.set(gpu_gib=16)`` or ``tuner.controls["gpu_gib"].value = 16``). The
figures are drawn by plain functions (:func:`draw_speed`, :func:`draw_speedup`, :func:`draw_plan`) that
fill a ``go.Figure`` or a ``FigureWidget`` alike, so a notebook can show one state without widgets.
Every title says **simulated on** the (what-if) profile: the tuner measures nothing but its own
redraw time (``last_redraw_s``, on this machine).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence

import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from offloadkit.hardware.catalog import load_profile
from offloadkit.hardware.profile import HardwareProfile
from offloadkit.hardware.whatif import PCIE_LANE_GBPS, link_shape, what_if
from offloadkit.model.spec import ModelSpec
from offloadkit.plan.plans import Plan, Workload, gpu_bytes_breakdown, plan_blocks, units
from offloadkit.runtime.compare import Comparison, compare_policies
from offloadkit.viz.controls import ControlPanel, trace
from offloadkit.viz.controls import put_trace as _put

TUNED_POLICIES = ("scheinfer", "llamacpp", "fiddler", "ktransformers")
BASELINES = TUNED_POLICIES[1:]
POLICY_COLORS = {"scheinfer": "#d62728", "llamacpp": "#1f77b4", "fiddler": "#2ca02c", "ktransformers": "#9467bd"}
PHASE_COLORS = {"prefill": "#ff7f0e", "decode": "#17becf", "overall": "#7f7f7f"}
#: Block kinds grouped as the plan figure draws them.
KIND_GROUPS = {"attn_qkv": "attention", "attn_o": "attention", "expert": "routed experts",
               "shared_expert": "shared expert", "ffn": "dense FFN"}
MEMORY_PARTS = {"weights": "resident weights (GG)", "kv_cache": "KV cache", "activations": "activations",
                "staging": "staging buffers (CG)"}
MEMORY_COLORS = {"weights": "#d62728", "kv_cache": "#1f77b4", "activations": "#bcbd22", "staging": "#ff7f0e"}
GIB = 2**30
#: compare_policies' ``quick`` mode (a sample of the decode steps, scaled), where this version has it.
HAS_QUICK = "quick" in inspect.signature(compare_policies).parameters


# ---- what the figures show, from a comparison ------------------------------------------------------

def gg_share_by_layer(spec: ModelSpec, plan: Plan) -> dict[str, list[float | None]]:
    """Per kind group (:data:`KIND_GROUPS`), per layer: the share of its bytes that is GG (None: no such block)."""
    held: dict[str, list[float]] = {}
    total: dict[str, list[float]] = {}
    for b in plan_blocks(spec):
        group = KIND_GROUPS.get(b.kind)
        if group is None or b.layer is None:
            continue
        nbytes = spec.bytes_of(b.params)
        held.setdefault(group, [0.0] * spec.n_layers)[b.layer] += nbytes * min(plan.resident(b), units(b)) / units(b)
        total.setdefault(group, [0.0] * spec.n_layers)[b.layer] += nbytes
    return {g: [h / t if t else None for h, t in zip(held[g], total[g], strict=True)] for g in total}


def head_share(spec: ModelSpec, plan: Plan) -> float:
    """Share of the lm_head's rows that are GG."""
    head = next(b for b in plan_blocks(spec) if b.kind == "lm_head")
    return min(plan.resident(head), units(head)) / units(head)


def _tokens_per_s(c: Comparison, policy: str, phase: str) -> float | None:
    run = c.runs.get(policy)
    s = run.seconds(phase) if run is not None else None
    return c.tokens(phase) / s if s else None


def _case(c: Comparison, note: bool = True) -> str:
    """``"mixtral-8x7b · pp512+tg128 · routing zipf:1.2"`` and the comparison's note, if any."""
    return f"{c.model} · {c.workload.label} · routing {c.routing}" + (f" · {c.note}" if c.note and note else "")


def _phases(c: Comparison) -> list[str]:
    return [p for p in ("prefill", "decode") if p in c.phases()]


def draw_speed(fig: go.Figure, c: Comparison) -> go.Figure:
    """(a) tokens/s per phase (x) and policy (bars), the bound of each phase as a black bar-wide marker."""
    phases = _phases(c)
    x = [f"{p}<br>{c.tokens(p)} tokens" for p in phases]
    shown: list[float] = []  # every value drawn, for the axis range (a batch update cannot be read back)
    for policy in TUNED_POLICIES:
        y = [_tokens_per_s(c, policy, p) for p in phases]
        shown += [v for v in y if v]
        run = c.runs.get(policy)
        name = policy if run is None or run.result is not None else f"{policy} (cannot run)"
        _put(fig, policy, go.Bar, x=x, y=y, name=name, marker_color=POLICY_COLORS[policy],
             text=[f"{v:.3g}" if v else "" for v in y], textposition="outside", cliponaxis=False,
             hovertext=[run.error if run and run.error else (run.plan.name if run and run.plan else "")] * len(x),
             hovertemplate="%{y:.3g} tokens/s<br>%{hovertext}<extra>" + policy + "</extra>")
    bound = [c.bounds[p].tokens_per_s if p in c.bounds else None for p in phases]
    shown += [v for v in bound if v]
    _put(fig, "bound", go.Scatter, x=x, y=bound, mode="markers", name="bound (no placement beats it)",
         marker={"symbol": "line-ew", "size": 150, "line": {"width": 3, "color": "black"}},
         hovertemplate="bound: %{y:.3g} tokens/s<extra></extra>")
    lo, hi = (min(shown), max(shown)) if shown else (1.0, 10.0)
    log_range = [math.log10(lo) - 0.5, math.log10(hi) + 0.35]  # room below the shortest bar, above the labels
    fig.update_layout(title=f"(a) Tokens/s per phase and policy<br><sup>simulated on {c.profile}<br>{_case(c)}</sup>",
                      barmode="group", uniformtext={"minsize": 9, "mode": "show"},
                      yaxis={"type": "log", "title": "tokens/s (simulated, log scale)", "range": log_range},
                      xaxis_title="phase (tokens)", legend={"orientation": "h", "y": -0.3, "x": 0}, height=470,
                      margin={"t": 110})
    return fig


def draw_speedup(fig: go.Figure, c: Comparison) -> go.Figure:
    """(b) scheinfer's speedup (the baseline's time / scheinfer's) over each baseline, per phase."""
    x = [c.runs[b].plan.name if b in c.runs and c.runs[b].plan else f"{b} (cannot run)" for b in BASELINES]
    for phase in c.phases():
        y = [c.speedup(b, phase) for b in BASELINES]
        _put(fig, phase, go.Bar, x=x, y=y, name=phase, marker_color=PHASE_COLORS[phase],
             text=[f"{v:.2f}×" if v else "" for v in y], textposition="outside", cliponaxis=False,
             hovertemplate="%{y:.2f}× over %{x}<extra>" + phase + "</extra>")
    for t in fig.data:  # a phase the workload no longer has (gen 0) shows nothing
        if t.meta not in c.phases():
            t.update(y=[None] * len(x), text=[""] * len(x))
    if not fig.layout.shapes:
        fig.add_shape(type="line", xref="paper", x0=0, x1=1, yref="y", y0=1, y1=1,
                      line={"dash": "dash", "color": "black", "width": 1})
        fig.add_annotation(xref="paper", x=1, yref="y", y=1, text="1× (as fast as scheinfer)", showarrow=False,
                           xanchor="right", yanchor="top", font={"size": 11})
    fig.update_layout(title=f"(b) Speedup of scheinfer over each baseline<br><sup>simulated on {c.profile}<br>"
                            f"{_case(c)}</sup>", barmode="group",
                      yaxis={"title": "speedup (× the baseline's time)", "rangemode": "tozero"},
                      xaxis_title="baseline (its plan)", legend={"orientation": "h", "y": -0.25, "x": 0},
                      height=430, margin={"t": 110})
    return fig


def plan_figure_skeleton() -> go.Figure:
    """The two panels of (c): GG share per layer (left), GPU memory by use per policy (right)."""
    return make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.12,
                         subplot_titles=("scheinfer: GG share per layer", "GPU memory by use"))


def draw_plan(fig: go.Figure, c: Comparison, spec: ModelSpec, profile: HardwareProfile) -> go.Figure:
    """(c) scheinfer's GG share per layer and kind (lines), every policy's GPU memory by use (stacked bars)."""
    plan = c.runs["scheinfer"].plan if "scheinfer" in c.runs else None
    layers = list(range(spec.n_layers))
    shares = gg_share_by_layer(spec, plan) if plan is not None else {}
    for group in dict.fromkeys(KIND_GROUPS.values()):
        if group not in shares and not any(t.meta == group for t in fig.data):
            continue
        y = [None if v is None else 100 * v for v in shares.get(group, [None] * len(layers))]
        _put(fig, group, go.Scatter, row=1, col=1, x=layers, y=y, mode="lines+markers", name=f"GG share: {group}",
             legendrank=100 + list(KIND_GROUPS.values()).index(group),
             hovertemplate="layer %{x}: %{y:.1f} % GG<extra>" + group + "</extra>")
    head = f"lm_head {100 * head_share(spec, plan):.0f} %" if plan is not None else "no plan"
    names = [p for p in TUNED_POLICIES if p in c.runs]
    parts = {p: gpu_bytes_breakdown(c.runs[p].plan, spec, c.workload) if c.runs[p].plan else {} for p in names}
    for part, label in MEMORY_PARTS.items():
        _put(fig, part, go.Bar, row=1, col=2, x=names, y=[parts[p].get(part, 0) / GIB for p in names], name=label,
             marker_color=MEMORY_COLORS[part], legendrank=200 + list(MEMORY_PARTS).index(part),
             hovertemplate="%{y:.2f} GiB<extra>" + label + "</extra>")
    usable = profile.gpu.usable_memory_gib if profile.gpu else 0.0
    _put(fig, "usable", go.Scatter, row=1, col=2, x=names, y=[usable] * len(names), mode="lines",
         name=f"usable GPU memory ({usable:g} GiB)", line={"color": "black", "dash": "dash"}, legendrank=300,
         hovertemplate="usable: %{y:.1f} GiB<extra></extra>")
    fig.update_layout(title=f"(c) The plans: where the weights live<br><sup>simulated on {c.profile}<br>"
                            f"{_case(c, note=False)}</sup>", barmode="stack", height=520, margin={"t": 140},
                      legend={"orientation": "h", "y": -0.22, "x": 0, "traceorder": "normal"})
    fig.layout.annotations[0].text = f"scheinfer: GG share per layer ({head})"
    fig.update_xaxes(title_text="layer", row=1, col=1)
    fig.update_yaxes(title_text="GG share (% of the layer's bytes)", range=[-3, 103], row=1, col=1)
    fig.update_xaxes(title_text="policy", row=1, col=2)
    fig.update_yaxes(title_text="GPU memory (GiB)", rangemode="tozero", row=1, col=2)
    return fig


# ---- the widget --------------------------------------------------------------------------------------


class PlanTuner(ControlPanel):
    """The what-if panel of chapter 06; see the module docstring.

    ``spec`` and ``profile`` are the model and the catalog machine the what-ifs start from (names or
    objects). ``controls`` maps each control's name (``gpu_gib``, ``pcie_gen``, ``dram_gbps``,
    ``prompt_tokens``, ``gen_tokens``, ``zipf``) to its ipywidget; ``comparison`` is the last result.
    """

    def __init__(self, spec: ModelSpec | str = "mixtral-8x7b", profile: HardwareProfile | str = "rtx4090-desktop",
                 *, workload: Workload | None = None, zipf: float = 1.2, policies: Sequence[str] = TUNED_POLICIES,
                 quick: bool = True) -> None:
        if isinstance(spec, str):
            from offloadkit.model.zoo import load_spec

            spec = load_spec(spec)
        self.spec = spec
        self.base = load_profile(profile) if isinstance(profile, str) else profile
        if self.base.gpu is None or self.base.link is None:
            from offloadkit.errors import ProfileError

            raise ProfileError(f"the plan tuner needs a profile with a GPU; {self.base.name!r} has none")
        w = workload or Workload(512, 128)
        gen, lanes = link_shape(self.base)
        slider = {"continuous_update": False, "style": {"description_width": "150px"},
                  "layout": widgets.Layout(width="420px")}
        self.controls: dict[str, widgets.ValueWidget] = {
            "gpu_gib": widgets.FloatSlider(value=self.base.gpu.usable_memory_gib, min=4, max=96, step=1,
                                           description="GPU memory (GiB)", **slider),
            "pcie_gen": widgets.Dropdown(options=[(f"PCIe {g}.0 x{lanes}", g) for g in PCIE_LANE_GBPS], value=gen or 4,
                                         description="PCIe generation", style=slider["style"],
                                         layout=widgets.Layout(width="300px")),
            "dram_gbps": widgets.FloatSlider(value=self.base.cpu.dram_bandwidth_gbps, min=10, max=400, step=5,
                                             description="DRAM read (GB/s)", **slider),
            "prompt_tokens": widgets.IntSlider(value=w.prompt_tokens, min=16, max=4096, step=16,
                                               description="prompt (tokens)", **slider),
            "gen_tokens": widgets.IntSlider(value=w.gen_tokens, min=16, max=1024, step=16,
                                            description="generation (tokens)", **slider),
            "zipf": widgets.FloatSlider(value=zipf, min=0, max=2.5, step=0.1, description="routing skew (zipf s)",
                                        **slider),
        }
        self.policies, self.quick, self.batch = tuple(policies), quick and HAS_QUICK, w.batch
        self.fig_speed = go.FigureWidget()
        self.fig_speedup = go.FigureWidget()
        self.fig_plan = go.FigureWidget(plan_figure_skeleton())
        self.status = widgets.HTML()
        self.comparison: Comparison | None = None
        self.profile: HardwareProfile = self.base
        self.last_redraw_s: float | None = None
        self.last_compute_s: float | None = None
        self._watch_controls()
        self._update()

    # ---- state ---------------------------------------------------------------------------------------

    def what_if_profile(self) -> HardwareProfile:
        """The catalog profile with the controls' GPU memory, PCIe generation and DRAM bandwidth."""
        v = self.values()
        return what_if(self.base, gpu_gib=v["gpu_gib"], pcie_gen=v["pcie_gen"], dram_gbps=v["dram_gbps"])

    def workload(self) -> Workload:
        v = self.values()
        return Workload(int(v["prompt_tokens"]), int(v["gen_tokens"]), self.batch)

    def routing(self) -> str:
        """``"uniform"`` at skew 0, else ``"zipf:S"``."""
        s = round(float(self.values()["zipf"]), 3)
        return "uniform" if s == 0 else f"zipf:{s:g}"

    # ---- callbacks -----------------------------------------------------------------------------------

    def _update(self) -> None:
        """Re-plan and re-simulate every policy on the controls' case, then redraw the figures in place."""
        t0 = time.perf_counter()
        self.profile = self.what_if_profile()
        kw = {"quick": True} if self.quick else {}
        c = compare_policies(self.spec, self.profile, self.workload(), self.routing(), policies=self.policies, **kw)
        t1 = time.perf_counter()
        with self.fig_speed.batch_update():
            draw_speed(self.fig_speed, c)
        with self.fig_speedup.batch_update():
            draw_speedup(self.fig_speedup, c)
        with self.fig_plan.batch_update():
            draw_plan(self.fig_plan, c, self.spec, self.profile)
        self.comparison = c
        self.last_compute_s, self.last_redraw_s = t1 - t0, time.perf_counter() - t0
        failed = "; ".join(f"<b>{r.policy}</b> cannot run: {r.error}" for r in c.runs.values() if r.error)
        self.status.value = (f"simulated on <b>{c.profile}</b> · {c.workload.label} · routing {c.routing}"
                             + (f" · {c.note}" if c.note else "") + f" · redrawn in {self.last_redraw_s:.2f} s "
                             f"(measured here)" + (f"<br>{failed}" if failed else ""))

    # ---- display -------------------------------------------------------------------------------------

    def widget(self) -> widgets.VBox:
        """The panel: the controls in two columns, the status line, then figures (a), (b), (c)."""
        names = list(self.controls)
        left = widgets.VBox([self.controls[k] for k in names[:3]])
        right = widgets.VBox([self.controls[k] for k in names[3:]])
        return widgets.VBox([widgets.HBox([left, right]), self.status, self.fig_speed, self.fig_speedup,
                             self.fig_plan])


__all__ = ["BASELINES", "HAS_QUICK", "KIND_GROUPS", "MEMORY_PARTS", "PlanTuner", "TUNED_POLICIES", "draw_plan",
           "draw_speed", "draw_speedup", "gg_share_by_layer", "head_share", "plan_figure_skeleton", "trace"]
