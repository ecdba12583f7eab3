"""The timeline explorer: one step's four lanes for a model, profile, policy, phase and step.

Pure functions first (tests and notebooks call them without widgets):

- :func:`step_timeline` — the **simulated** timeline of one step only (the prefill's chunks, or one
  decode step), built from that step's recorded graph; the same records ``simulate(record=True)``
  gives for the step, shifted to start at 0, without simulating the steps before it;
- :func:`lane_utilisation`, :func:`step_figures` — per lane: busy seconds over the step's time, the
  bounding (busiest) lane;
- :func:`explorer_figure` — the lanes of the simulated step (row 1) and of a measured one (row 2,
  titled **measured** on its machine; the loopback device's says its lanes are CPU threads), each with
  its lanes' utilisation beside it, and the phase's bound per step as a dashed line;

Saved traces are read, and what is shown is written as one Perfetto trace, by
:mod:`offloadkit.runtime.timeline` (``timeline_from_file``, ``chrome_trace``).

:class:`TimelineExplorer` wires them to ipywidgets. A redraw caches plans, bounds and step timelines
per (model, profile, policy, prompt, gen, routing), so moving back to a state seen before is a lookup.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from offloadkit.errors import OffloadkitError, PlanError
from offloadkit.hardware.profile import HardwareProfile
from offloadkit.model.spec import ModelSpec
from offloadkit.plan.costmodel import CostModel, engine_options
from offloadkit.plan.plans import Plan, Workload, check_fits
from offloadkit.plan.routing import Routing, parse_routing
from offloadkit.runtime.sim import schedule, step_shapes
from offloadkit.runtime.stepgraph import StepBuilder, layer_blocks
from offloadkit.runtime.timeline import (
    LANES,
    TaskRecord,
    Timeline,
    chrome_trace,
    timeline_from_chrome_trace,
    timeline_from_file,
)
from offloadkit.viz.controls import ControlPanel, progress
from offloadkit.viz.timeline import LEGEND_PER_ROW, sync_figure, timeline_traces

PROMPTS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
PHASES = ("prefill", "decode")
BOUND_COLOR, LANE_COLOR = "#d62728", "#7f7f7f"


# ---- data -------------------------------------------------------------------------------------------

def step_timeline(spec: ModelSpec, profile: HardwareProfile, plan: Plan, workload: Workload,
                  routing: Routing | str | None, step: int, seed: int = 0) -> Timeline:
    """The simulated records of ``step`` alone (0: every prefill chunk), times from the step's start.

    Builds only that step's graph (its token counts from the routing, its KV length from the workload)
    and schedules it as :func:`~offloadkit.runtime.sim.simulate` does."""
    routing = parse_routing(routing, seed) if routing is None or isinstance(routing, str) else routing
    shapes = step_shapes(workload, plan)
    if not any(s.step == step for s in shapes):
        raise OffloadkitError(f"{workload.label} has no step {step} (0: the prefill, 1..{workload.gen_tokens})")
    cost = CostModel(profile, spec, pinned=plan.pinned, **engine_options(plan))
    if plan.uses_gpu and not cost.has_gpu:
        raise PlanError(f"plan {plan.name} uses a GPU but profile {profile.name!r} has none")
    counts = (routing.step_counts(spec, [s.n for s in shapes]).tolist() if spec.is_moe
              else [[[]] * spec.n_layers] * len(shapes))
    blocks = layer_blocks(spec)
    meta = {"model": spec.name or spec.arch, "plan": plan.name, "policy": plan.policy, "workload": workload.label,
            "routing": getattr(routing, "label", type(routing).__name__), "numerics": False}
    tl = Timeline("simulated", profile.name, [], meta)
    t0 = 0.0
    for shape, c in zip(shapes, counts, strict=True):
        if shape.step != step:
            continue
        graph = StepBuilder(spec, plan, cost, shape, blocks=blocks).build(lambda layer, c=c: c[layer])
        start, end = schedule(graph, t0)
        tl.records.extend(TaskRecord(t.lane, t.name, s, e, t.layer, t.kind, t.bytes_, t.flops, step)
                          for t, s, e in zip(graph.tasks, start, end, strict=True))
        t0 = max(end) if end else t0
    return tl


def rebased(timeline: Timeline, step: int | None = None) -> Timeline:
    """``timeline`` (only ``step`` if given) with times from its first start (a measured step starts at 0)."""
    return timeline.rebased(step)


def lane_utilisation(timeline: Timeline) -> dict[str, float]:
    """Per lane (the four, then any other): busy seconds over the timeline's makespan (0..1)."""
    span = timeline.makespan_s
    lanes = list(LANES) + [lane for lane in timeline.lanes() if lane not in LANES]
    return {lane: timeline.busy_s(lane) / span if span else 0.0 for lane in lanes}


def step_figures(timeline: Timeline) -> dict[str, Any]:
    """Step time, busy seconds and utilisation per lane, the bounding (busiest) lane, the source and machine."""
    busy = {lane: timeline.busy_s(lane) for lane in lane_utilisation(timeline)}
    return {"source": timeline.source, "machine": timeline.machine, "step_s": timeline.makespan_s, "busy_s": busy,
            "utilisation": lane_utilisation(timeline),
            "bounding_lane": max(busy, key=busy.__getitem__) if timeline.records else None}


def is_loopback(timeline: Timeline) -> bool:
    """A measured timeline of the loopback device: its gpu / h2d / d2h lanes are CPU threads."""
    m = timeline.meta
    return m.get("device") == "loopback" or "CPU threads" in str(m.get("lanes", "")) \
        or "loopback" in timeline.machine.lower()


# ---- the figure -------------------------------------------------------------------------------------

def fmt_s(seconds: float) -> str:
    """``"221 ms"``, ``"19.3 s"``: three significant figures, in ms below a second."""
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def step_name(step: int) -> str:
    return "prefill" if step == 0 else f"decode step {step}"


@dataclass
class Bound:
    """The phase's bound (no placement beats it, simulated) per step, and the lane that sets it."""

    seconds: float
    lane: str


def _panel(fig: go.Figure, tl: Timeline, row: int, group: str, legend_seen: set[str]) -> None:
    for t in timeline_traces(tl, legendgroup=group):
        t.showlegend = t.name not in legend_seen
        legend_seen.add(t.name)
        fig.add_trace(t, row=row, col=1)
    f = step_figures(tl)
    lanes = list(f["utilisation"])
    u = [100 * f["utilisation"][lane] for lane in lanes]
    fig.add_trace(go.Bar(x=u, y=lanes, orientation="h", meta=f"{group}utilisation", showlegend=False,
                         marker_color=[BOUND_COLOR if lane == f["bounding_lane"] else LANE_COLOR for lane in lanes],
                         text=[f"{v:.0f} %" for v in u], textposition="outside", cliponaxis=False,
                         hovertemplate="%{y}: busy %{x:.1f} % of the step<extra>" + tl.source + "</extra>"),
                  row=row, col=2)
    cats = list(reversed(lanes))
    fig.update_yaxes(categoryorder="array", categoryarray=cats, row=row, col=1, title_text="lane")
    fig.update_yaxes(categoryorder="array", categoryarray=cats, row=row, col=2, showticklabels=False)
    fig.update_xaxes(title_text=f"time from the step's start (ms, {tl.source})", row=row, col=1, rangemode="tozero")
    fig.update_xaxes(title_text="busy (% of the step)", range=[0, 125], row=row, col=2)


def explorer_figure(sim: Timeline | None, measured: Timeline | None = None, *, step: int = 1,
                    bound: Bound | None = None, case: str = "", profile: str = "", error: str | None = None,
                    measured_steps: list[int] | None = None) -> go.Figure:
    """The simulated step's lanes (row 1) and a measured step's (row 2, if given), utilisation beside each.

    ``sim`` and ``measured`` hold one step each, rebased to 0; ``bound`` the phase's bound per step
    (a dashed line on the simulated lanes); ``error`` replaces the simulated panel with why there is none;
    ``measured_steps``: the steps the whole measured timeline has (said where it lacks ``step``).
    """
    rows = 2 if measured is not None else 1
    where = profile or (sim.machine if sim else "?")
    titles = []
    if sim is not None and sim.records:
        f = step_figures(sim)
        gap = (f" · {f['step_s'] / bound.seconds:.2f}× the bound ({fmt_s(bound.seconds)}, set by {bound.lane})"
               if bound else " · no bound (the profile has no GPU)")
        titles.append(f"<b>simulated</b> on {where}: {step_name(step)}, {fmt_s(f['step_s'])}, "
                      f"busiest lane {f['bounding_lane']}{gap}")
    else:
        titles.append(f"<b>simulated</b> on {where}: no timeline")
    titles.append("lane utilisation")
    if measured is not None:
        what = f"{step_name(step)}, {fmt_s(measured.makespan_s)}" if measured.records else \
            f"no {step_name(step)} in it"
        loop = ("<br>loopback device: the gpu, h2d and d2h lanes are CPU threads, not GPU figures"
                if is_loopback(measured) else "")
        titles += [f"<b>measured</b> on {measured.machine}: {what}{loop}", "lane utilisation"]
    fig = make_subplots(rows=rows, cols=2, column_widths=[0.8, 0.2], horizontal_spacing=0.03,
                        vertical_spacing=0.3 if rows == 2 else 0.1, subplot_titles=titles)
    seen: set[str] = set()
    if sim is not None and sim.records:
        _panel(fig, sim, 1, "simulated:", seen)
        if bound is not None:
            fig.add_vline(x=bound.seconds * 1e3, row=1, col=1, line={"dash": "dash", "color": "black", "width": 1.5},
                          annotation_text="bound", annotation_position="top right")
    elif error:
        fig.add_annotation(text=f"cannot simulate: {error[:200]}", xref="x domain", yref="y domain", x=0.5, y=0.5,
                           showarrow=False)
    if measured is not None:
        if measured.records:
            _panel(fig, measured, 2, "measured:", seen)
        else:
            steps = measured_steps if measured_steps is not None else measured.steps()
            fig.add_annotation(text=f"the measured timeline has steps {steps[0]}–{steps[-1]}" if steps else
                               "the measured timeline is empty", xref="x3 domain", yref="y3 domain", x=0.5, y=0.5,
                               showarrow=False)
    head = f"<b>simulated</b> on {where}" + (f" · <b>measured</b> on {measured.machine}" if measured else "")
    kinds = len(seen)
    fig.update_layout(title=f"Timeline explorer: {case}<br><sup>{head}</sup>", barmode="overlay", bargap=0.25,
                      height=170 + rows * 260 + 24 * -(-kinds // LEGEND_PER_ROW), margin={"t": 110},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.12 if rows == 2 else -0.25, "x": 0,
                              "title": {"text": "task kind"}, "traceorder": "normal",
                              "entrywidth": 1 / LEGEND_PER_ROW - 0.01, "entrywidthmode": "fraction"})
    for a in fig.layout.annotations[:len(titles)]:
        a.font = {"size": 12}
    return fig


# ---- the widget -------------------------------------------------------------------------------------

class TimelineExplorer(ControlPanel):
    """Model, profile, policy, phase, step, prompt and generation → one step's lanes, utilisation and bound.

    ``model`` / ``profile``: names or objects (e.g. a measured profile of this machine); ``measured``: a
    measured :class:`Timeline` (``HybridEngine.timeline``) or a saved trace's path, drawn beside the
    simulated step (the same step). ``quick`` plans scheinfer by the partition alone (no search from the
    baselines' placements), as the plan tuner does; ``quick=False`` uses :func:`make_plan` in full.
    """

    def __init__(self, model: str | ModelSpec = "mixtral-8x7b", profile: str | HardwareProfile = "rtx4090-desktop",
                 policy: str = "scheinfer", phase: str = "decode", step: int = 1, prompt: int = 512, gen: int = 128,
                 measured: Timeline | dict | str | Path | None = None, *, routing: str = "uniform", quick: bool = True
                 ) -> None:
        from offloadkit.hardware.catalog import catalog_names
        from offloadkit.model.zoo import zoo_names
        from offloadkit.plan.policies import POLICIES

        self._specs: dict[str, ModelSpec | None] = dict.fromkeys(zoo_names())
        self._profiles: dict[str, HardwareProfile | None] = dict.fromkeys(catalog_names())
        model = self._register(self._specs, model)
        profile = self._register(self._profiles, profile)
        self.routing, self.quick = routing, quick
        self._plans: dict[tuple, Plan | str] = {}
        self._bounds: dict[tuple, Any] = {}
        self._steps: dict[tuple, Timeline] = {}
        style = {"description_width": "70px"}
        self.controls: dict[str, widgets.ValueWidget] = {
            "model": widgets.Dropdown(options=list(self._specs), value=model, description="model", style=style),
            "profile": widgets.Dropdown(options=list(self._profiles), value=profile, description="profile",
                                        style=style),
            "policy": widgets.Dropdown(options=list(POLICIES), value=policy, description="policy", style=style),
            "phase": widgets.ToggleButtons(options=list(PHASES), value=phase, description="phase", style=style),
            "step": widgets.IntSlider(value=step, min=1, max=max(gen, 1), description="decode step", style=style,
                                      continuous_update=False),
            "prompt": widgets.SelectionSlider(options=sorted({*PROMPTS, int(prompt)}), value=int(prompt),
                                              description="prompt", style=style, continuous_update=False),
            "gen": widgets.IntSlider(value=gen, min=1, max=1024, description="generate", style=style,
                                     continuous_update=False),
        }
        self.measured: Timeline | None = None
        self.figure = go.FigureWidget()
        self.status = widgets.HTML()
        self.export_dir = widgets.Text(value=".", description="folder", style=style,
                                       layout=widgets.Layout(width="260px"))
        self.export_button = widgets.Button(description="Export Perfetto trace", icon="download",
                                            layout=widgets.Layout(width="200px"))
        self.sweep_button = widgets.Button(description="Precompute every prompt", icon="forward",
                                           layout=widgets.Layout(width="200px"))
        self.export_status = widgets.HTML()
        self.export_button.on_click(lambda _: self._export_clicked())
        self.sweep_button.on_click(lambda _: self.precompute())
        c = self.controls
        self.widget = widgets.VBox([
            widgets.HBox([c["model"], c["profile"], c["policy"]]), widgets.HBox([c["phase"], c["step"]]),
            widgets.HBox([c["prompt"], c["gen"]]), self.status, self.figure,
            widgets.HBox([self.export_dir, self.export_button, self.sweep_button]), self.export_status])
        self.shown: list[Timeline] = []
        self._summary: dict[str, Any] = {}
        self.last_redraw_s: float | None = None
        self._watch_controls()
        if measured is not None:
            self.measured = (measured if isinstance(measured, Timeline) else Timeline.from_dict(measured)
                             if isinstance(measured, dict) else timeline_from_file(measured))
        self._update()

    @staticmethod
    def _register(table: dict, obj: Any) -> str:
        if isinstance(obj, str):
            if obj not in table:
                table[obj] = None  # a path or another name the loaders accept
            return obj
        name = getattr(obj, "name", None) or getattr(obj, "arch", "custom")
        table[name] = obj
        return name

    # ---- state ---------------------------------------------------------------------------------------

    def spec(self) -> ModelSpec:
        name = self.controls["model"].value
        if self._specs.get(name) is None:
            from offloadkit.model.zoo import load_spec

            self._specs[name] = load_spec(name)
        return self._specs[name]  # type: ignore[return-value]

    def profile(self) -> HardwareProfile:
        name = self.controls["profile"].value
        if self._profiles.get(name) is None:
            from offloadkit.hardware.catalog import load_profile

            self._profiles[name] = load_profile(name)
        return self._profiles[name]  # type: ignore[return-value]

    def workload(self) -> Workload:
        v = self.values()
        return Workload(int(v["prompt"]), int(v["gen"]))

    def step(self) -> int:
        """The step shown: 0 in prefill, the step slider's value in decode."""
        v = self.values()
        return 0 if v["phase"] == "prefill" else int(v["step"])

    def _case(self, prompt: int | None = None) -> tuple:
        v = self.values()
        return (v["model"], v["profile"], v["policy"], int(prompt or v["prompt"]), int(v["gen"]), self.routing)

    def plan(self, prompt: int | None = None) -> Plan:
        """The policy's plan for the controls' case (cached); raises PlanError where it cannot run."""
        key = self._case(prompt)
        if key not in self._plans:
            spec, profile = self.spec(), self.profile()
            w = Workload(key[3], key[4])
            try:
                if self.quick and key[2] == "scheinfer":
                    from offloadkit.plan.host_memory import check_host_fits
                    from offloadkit.plan.partition import partition

                    plan = partition(spec, profile, w, self.routing, polish_evals=0)
                    check_fits(plan, spec, profile, w)
                    check_host_fits(plan, spec, profile, w)
                else:
                    from offloadkit.plan.policies import make_plan

                    plan = make_plan(key[2], spec, profile, w, self.routing)
                self._plans[key] = plan
            except PlanError as e:
                self._plans[key] = str(e)
        plan = self._plans[key]
        if isinstance(plan, str):
            raise PlanError(plan)
        return plan

    def bound(self, prompt: int | None = None) -> Bound | None:
        """The shown phase's bound per step (cached per model, profile, prompt, gen, phase); None without a GPU."""
        model, prof, _, p, g, routing = self._case(prompt)
        phase = "prefill" if self.step() == 0 else "decode"
        key = (model, prof, p, g, routing, phase)
        if key not in self._bounds:
            profile, spec, w = self.profile(), self.spec(), Workload(p, g)
            if profile.gpu is None or profile.link is None:
                self._bounds[key] = None
            else:
                from offloadkit.plan.bounds import phase_bound, weight_budget
                from offloadkit.plan.estimate import WorkloadCounts

                counts = WorkloadCounts.of(spec, w, parse_routing(routing, 0), [p])
                self._bounds[key] = phase_bound(spec, profile, w, counts, phase, weight_budget(spec, profile, w))
        b = self._bounds[key]
        return Bound(b.seconds / (1 if phase == "prefill" else g), b.bounding_lane) if b is not None else None

    def simulated(self, prompt: int | None = None) -> Timeline:
        """The shown step, simulated (cached)."""
        key = (*self._case(prompt), self.step())
        if key not in self._steps:
            w = Workload(key[3], key[4])
            self._steps[key] = step_timeline(self.spec(), self.profile(), self.plan(prompt), w, self.routing, key[-1])
        return self._steps[key]

    # ---- actions -------------------------------------------------------------------------------------

    def set(self, **values: Any) -> None:
        """As :meth:`ControlPanel.set`, the generation length first (it bounds the step slider)."""
        if "prompt" in values and values["prompt"] not in self.controls["prompt"].options:
            self.controls["prompt"].options = sorted({*self.controls["prompt"].options, int(values["prompt"])})
        if "gen" in values:
            self.controls["step"].max = max(int(values["gen"]), 1)
            values = {"gen": values.pop("gen"), **values}
        super().set(**values)

    def load_measured(self, timeline: Timeline | dict | str | Path | None) -> Timeline | None:
        """Show a measured timeline beside the simulated step: a :class:`Timeline`, its ``to_dict()`` (as a
        BenchRun's ``timelines`` hold them), or a saved trace's path; None removes it."""
        if isinstance(timeline, dict):
            timeline = Timeline.from_dict(timeline)
        self.measured = timeline if timeline is None or isinstance(timeline, Timeline) else timeline_from_file(timeline)
        self._update()
        return self.measured

    def precompute(self, prompts: tuple[int, ...] | None = None) -> None:
        """Plan, bound and simulate the shown step for every prompt length (a progress bar), so the slider
        answers from the cache."""
        for p in progress(prompts or tuple(self.controls["prompt"].options), "prompt lengths"):
            try:
                self.simulated(p)
                self.bound(p)
            except PlanError:
                pass
        self.status.value += " · every prompt length precomputed"

    def summary(self) -> dict[str, Any]:
        """What the figure shows: per-lane utilisation, bounding lane, step time, the bound and the gap."""
        return dict(self._summary)

    def export_trace(self, path: str | Path = ".") -> Path:
        """Write what is shown (the simulated step, and the measured one) as one Chrome / Perfetto trace;
        ``path`` a file, or a folder to write a named file into. Returns the file's path."""
        p = Path(path)
        if p.is_dir() or not p.suffix:
            p.mkdir(parents=True, exist_ok=True)
            v = self.values()
            p = p / f"offloadkit-{v['model']}-{v['policy']}-{step_name(self.step()).replace(' ', '')}.trace.json"
        p.write_text(json.dumps(chrome_trace(self.shown)))
        return p.resolve()

    def _export_clicked(self) -> None:
        try:
            p = self.export_trace(self.export_dir.value or ".")
            self.export_status.value = f"wrote <code>{p}</code> (open it in ui.perfetto.dev)"
        except OSError as e:
            self.export_status.value = f"could not write the trace: {e}"

    # ---- redraw --------------------------------------------------------------------------------------

    def _update(self) -> None:
        t0 = time.perf_counter()
        v = self.values()
        self.controls["step"].disabled = v["phase"] == "prefill"
        step = self.step()
        sim, error, bound = None, None, None
        try:
            sim = self.simulated()
            bound = self.bound()
        except (PlanError, OffloadkitError) as e:
            error = str(e)
        measured = rebased(self.measured, step) if self.measured is not None else None
        plan = self._plans.get(self._case())
        plan_name = plan.name if isinstance(plan, Plan) else v["policy"]
        case = f"{v['model']} · {plan_name} · {step_name(step)} · pp{v['prompt']}+tg{v['gen']} · {self.routing}"
        fig = explorer_figure(sim, measured, step=step, bound=bound, case=case, profile=v["profile"], error=error,
                              measured_steps=self.measured.steps() if self.measured is not None else None)
        sync_figure(self.figure, fig)
        self.shown = [t for t in (sim, measured) if t is not None and t.records]
        s: dict[str, Any] = {"model": v["model"], "profile": v["profile"], "policy": v["policy"], "plan": plan_name,
                             "phase": v["phase"], "step": step, "workload": f"pp{v['prompt']}+tg{v['gen']}",
                             "routing": self.routing, "error": error}
        if sim is not None:
            s.update(step_figures(sim))
            s["bound_s"] = bound.seconds if bound else None
            s["bound_lane"] = bound.lane if bound else None
            s["gap_s"] = s["step_s"] - bound.seconds if bound else None
            s["fraction_of_bound"] = bound.seconds / s["step_s"] if bound and s["step_s"] else None
        s["measured"] = step_figures(measured) if measured is not None and measured.records else None
        self._summary = s
        self.last_redraw_s = time.perf_counter() - t0
        note = " · scheinfer planned by the partition alone (quick)" if self.quick and v["policy"] == "scheinfer" \
            else ""
        frac = s.get("fraction_of_bound")
        self.status.value = (f"<b>simulated</b> on {v['profile']}" + (f" · at {100 * frac:.0f} % of the bound"
                                                                       if frac and math.isfinite(frac) else "")
                             + (f" · cannot run: {error}" if error else "") + note
                             + (f" · <b>measured</b> on {self.measured.machine}" if self.measured else "")
                             + f" · redrawn in {self.last_redraw_s * 1e3:.0f} ms (measured here)")


__all__ = ["PROMPTS", "Bound", "TimelineExplorer", "chrome_trace", "explorer_figure", "is_loopback",
           "lane_utilisation", "rebased", "step_figures", "step_timeline", "timeline_from_chrome_trace",
           "timeline_from_file"]
