"""The whole engine in a few calls, for notebooks 00 (quickstart) and 08 (the engine assembled).

What the notebooks need that the package did not have as one call:

- :func:`hybrid_profile`: a profile of *this* machine's CPU (measured, e.g. by ``offloadkit profile --quick``)
  with a catalog GPU and PCIe link attached, its GPU memory capped by
  :func:`~offloadkit.hardware.whatif.what_if` so that even the 7.4 MiB demo model does not fit and the
  plan really splits. Its name says all of that (``"<measured> + <catalog GPU> (catalog) (what-if: ...)"``):
  nothing measured the GPU half.
- :func:`run_hybrid`: one policy's plan of a checkpoint on such a profile, a greedy generation on the hybrid
  engine (the :class:`~offloadkit.runtime.devices.LoopbackDevice` throttled to the profile's link where there
  is no GPU, ``CudaDevice`` where there is one), the reference model's tokens beside it, and the simulator's
  run of the same plan, prompt and weights: a :class:`HybridRun`.
- :func:`speedup_rows` / :func:`speedup_table`: ScheInfer's speedup over llama.cpp, Fiddler and KTransformers
  from measured hybrid runs and from simulations, every row saying which it is and where.
- :data:`ENGINE_PARTS` / :func:`engine_parts`: the chapters' parts the engine is assembled from (module, chapter,
  where each enters), and what each is in an open engine.
- :func:`prompt_sweep` / :func:`prompt_sweep_figure` / :class:`PromptExplorer`: how the lanes' work of one
  prefill changes with the prompt under one plan (simulated); the explorer is that figure with a prompt slider
  and the chosen prompt's timeline (notebook 08; the dashboards' ``TimelineExplorer`` replans per prompt).

What it refuses to be: a benchmark. Loopback times are CPU threads standing in for a GPU, and every row and
figure made from them says so.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from offloadkit.errors import ProfileError
from offloadkit.hardware.catalog import load_profile
from offloadkit.hardware.machine import machine_label
from offloadkit.hardware.profile import HardwareProfile
from offloadkit.hardware.whatif import what_if
from offloadkit.plan.plans import Plan, Workload
from offloadkit.plan.policies import make_plan
from offloadkit.runtime.engine import GenerationRun, HybridEngine, measure_generation
from offloadkit.runtime.simresult import SimResult
from offloadkit.runtime.timeline import Timeline

#: ScheInfer and the systems it is compared with (offloadkit's plans of them).
TOUR_POLICIES = ("scheinfer", "llamacpp", "fiddler", "ktransformers")
LANES = ("cpu", "gpu", "h2d", "d2h")


def hybrid_profile(here: HardwareProfile, gpu_from: str | HardwareProfile = "rtx4090-desktop",
                   gpu_gib: float | None = None) -> HardwareProfile:
    """``here`` (a CPU-only profile, usually measured) with the GPU and PCIe link of ``gpu_from`` (a catalog
    profile), the GPU's usable memory set to ``gpu_gib`` GiB when given. The name says the GPU is catalog
    figures and the memory a what-if."""
    base = load_profile(gpu_from) if isinstance(gpu_from, str) else gpu_from
    if base.gpu is None or base.link is None:
        raise ProfileError(f"profile {base.name!r} has no GPU to lend")
    if here.gpu is not None:
        raise ProfileError(f"profile {here.name!r} has its own GPU ({here.gpu.name}): plan for it as it is")
    sources = dict(here.sources)
    lent = ("gpu.", "link.")
    sources.update({k: f"{base.name} (catalog): {v}" for k, v in base.sources.items() if k.startswith(lent)})
    derivations = dict(here.derivations)
    derivations.update({k: v for k, v in base.derivations.items() if k.startswith(lent)})
    joined = replace(here, name=f"{here.name} + {base.gpu.name} (catalog)", gpu=base.gpu, link=base.link,
                     sources=sources, derivations=derivations, path=None,
                     description=f"{here.description}; GPU and link: {base.name} (catalog figures, not measured)")
    return what_if(joined, gpu_gib=gpu_gib) if gpu_gib is not None else joined


def open_device(profile: HardwareProfile, device: str = "auto") -> Any:
    """``"cuda"`` where a CUDA GPU is present (or asked), else the loopback device with copies throttled to
    ``profile``'s link and its memory capped at the profile's usable GPU memory."""
    from offloadkit.runtime.device_open import open_device as _open
    from offloadkit.runtime.devices import LoopbackDevice

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "loopback"
    if device == "loopback":
        memory = int(profile.gpu.usable_memory_gib * 2**30) if profile.gpu is not None else None
        return LoopbackDevice.throttled(profile.link, memory_bytes=memory)
    return _open(device)


@dataclass
class HybridRun:
    """A greedy generation on the hybrid engine (**measured**) beside the reference and the simulator."""

    plan: Plan
    profile: HardwareProfile
    prompt_ids: torch.Tensor
    measured: GenerationRun
    reference_tokens: list[int]
    simulated: SimResult
    device_label: str
    device_kind: str = "loopback"

    @property
    def tokens(self) -> list[int]:
        return self.measured.tokens

    @property
    def simulated_tokens(self) -> list[int]:
        return torch.cat(self.simulated.tokens, dim=1)[0].tolist()

    def step(self, step: int) -> tuple[Timeline, Timeline]:
        """(measured, simulated) timelines of one step (0: the prefill), each rebased to start at 0."""
        from offloadkit.viz.streaming import rebase

        return rebase(self.measured.timeline, step), rebase(self.simulated.timeline, step)

    @property
    def measured_s(self) -> float:
        """Wall-clock seconds of the prompt and the continuation (measured)."""
        return self.measured.prefill_s + self.measured.decode_s

    @property
    def simulated_s(self) -> float:
        return self.simulated.prefill_s + self.simulated.decode_s


def run_hybrid(spec: Any, weights: Any, profile: HardwareProfile, prompt_ids: torch.Tensor, n_new: int, *,
               policy: str = "scheinfer", plan: Plan | None = None, device: str = "auto", warmup: bool = True,
               reference: Any = None) -> HybridRun:
    """Plan ``spec`` for ``profile`` under ``policy`` (or take ``plan``), generate ``n_new`` greedy tokens after
    ``prompt_ids`` [1, P] on the hybrid engine (a warm-up run first, so Numba's compilation is not timed),
    and run the reference model and the simulator (numerics on, the model's own routing) on the same."""
    from offloadkit.model.reference import ReferenceModel
    from offloadkit.runtime.sim import simulate

    p = prompt_ids.shape[1]
    workload = Workload(prompt_tokens=p, gen_tokens=n_new)
    plan = plan or make_plan(policy, spec, profile, workload)
    dev = open_device(profile, device)
    with HybridEngine(spec, weights, plan, profile, dev, workload=workload) as engine:
        if warmup:
            measure_generation(engine, prompt_ids, min(n_new, 2))
        measured = measure_generation(engine, prompt_ids, n_new)
        label, kind = dev.label, dev.kind
    reference = reference or ReferenceModel(spec, weights)
    ref = reference.greedy(prompt_ids, n_new)[0].tolist()
    sim = simulate(spec, profile, plan, Workload(p, n_new - 1), weights=reference,
                   prompt_ids=prompt_ids)
    return HybridRun(plan, profile, prompt_ids, measured, ref, sim, label, kind)


# ---- speedups, measured and simulated ---------------------------------------------------------------------

@dataclass
class SpeedupRow:
    """ScheInfer's speedup over one baseline on one case; ``source`` is "measured" or "simulated"."""

    source: str
    model: str
    where: str
    phase: str
    baseline: str
    speedup: float | None
    note: str = ""


def rows_from_runs(runs: dict[str, HybridRun], model: str) -> list[SpeedupRow]:
    """Measured and simulated rows from :func:`run_hybrid` runs of each policy on one profile (key: policy).
    Phases: prefill (the prompt's seconds) and decode (the continuation's)."""
    s = runs["scheinfer"]
    out: list[SpeedupRow] = []
    for name, r in runs.items():
        if name == "scheinfer":
            continue
        for phase, m_of, s_of in (("prefill", lambda x: x.measured.prefill_s, lambda x: x.simulated.prefill_s),
                                  ("decode", lambda x: x.measured.decode_s, lambda x: x.simulated.decode_s)):
            where = (f"{s.device_kind} device on {machine_label()}"
                     + (" (gpu/h2d/d2h lanes: CPU threads)" if s.device_kind == "loopback" else ""))
            out.append(SpeedupRow("measured", model, where, phase, name, m_of(r) / m_of(s)))
            out.append(SpeedupRow("simulated", model, s.simulated.profile, phase, name, s_of(r) / s_of(s)))
    return out


def rows_from_comparison(comparison: Any) -> list[SpeedupRow]:
    """Simulated rows from a :class:`~offloadkit.runtime.compare.Comparison` (prefill, decode)."""
    out = []
    for name in comparison.runs:
        if name == "scheinfer":
            continue
        for phase in ("prefill", "decode"):
            run = comparison.runs[name]
            out.append(SpeedupRow("simulated", comparison.model, comparison.profile, phase, name,
                                  comparison.speedup(name, phase), run.error or ""))
    return out


def speedup_table(rows: Sequence[SpeedupRow]) -> str:
    """A plain-text table, one line per row, its source (measured / simulated) first."""
    head = f"{'source':<10} {'model':<14} {'phase':<8} {'over':<14} {'speedup':>8}   where"
    lines = [head, "-" * len(head)]
    for r in rows:
        sp = f"{r.speedup:7.2f}x" if r.speedup else f"{'-':>8}"
        note = f"  [{r.note[:60]}]" if r.note else ""
        lines.append(f"{r.source:<10} {r.model:<14} {r.phase:<8} {r.baseline:<14} {sp}   {r.where}{note}")
    lines.append("speedup: the baseline's time / scheinfer's time for the phase (> 1: scheinfer is faster).")
    return "\n".join(lines)


def speedup_figure(rows: Sequence[SpeedupRow], title: str = "ScheInfer's speedup") -> go.Figure:
    """Grouped bars: one bar per row, grouped by case (source, model, where) and phase; y is the speedup."""
    cases = list(dict.fromkeys((r.source, r.model, r.where) for r in rows))
    fig = make_subplots(rows=len(cases), cols=1, vertical_spacing=0.5 / max(len(cases), 1),
                        subplot_titles=[f"<b>{s}</b>: {m} on {w}"[:150] for s, m, w in cases])
    colors = {"llamacpp": "#1f77b4", "fiddler": "#ff7f0e", "ktransformers": "#2ca02c"}
    shown: set[str] = set()
    for i, case in enumerate(cases, start=1):
        for base in dict.fromkeys(r.baseline for r in rows):
            sel = [r for r in rows if (r.source, r.model, r.where) == case and r.baseline == base]
            fig.add_trace(go.Bar(x=[r.phase for r in sel], y=[r.speedup or 0 for r in sel], name=f"over {base}",
                                 marker_color=colors.get(base), legendgroup=base, showlegend=base not in shown,
                                 text=[f"{r.speedup:.2f}x" if r.speedup else "n/a" for r in sel],
                                 textposition="outside"), row=i, col=1)
            shown.add(base)
        fig.add_hline(y=1, line_dash="dot", line_color="grey", row=i, col=1)
        fig.update_yaxes(title_text="speedup (x)", row=i, col=1, rangemode="tozero")
    fig.update_layout(title=title, barmode="group", height=260 * len(cases) + 120,
                      legend={"orientation": "h", "y": -0.08, "x": 0})
    for a in fig.layout.annotations:
        a.font.size = 12
    return fig


# ---- the engine's parts -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EnginePart:
    """One chapter's part of the hybrid engine: its module, its chapter, where it enters the engine."""

    part: str
    module: str
    chapter: str
    enters: str

    def load(self) -> Any:
        return importlib.import_module(self.module)


ENGINE_PARTS: tuple[EnginePart, ...] = (
    EnginePart("GPU kernels", "offloadkit.kernels.cuda.ops", "03_cuda_kernels",
               "device.ops: the gpu lane's GG and CG slices (CudaDevice); the loopback device runs their torch "
               "twins, offloadkit.kernels.cuda.twins, same signatures"),
    EnginePart("CPU experts", "offloadkit.kernels.cpu.experts", "04_cpu_experts",
               "expert_rows, called by the cpu lane's LaneMath: the CC rows, computed in host memory"),
    EnginePart("PCIe streaming", "offloadkit.runtime.streaming", "05_pcie_streaming",
               "executor.streamer (WeightStreamer): resident rows uploaded once, CG rows staged through "
               "pinned memory into plan.staging_buffers device buffers"),
    EnginePart("Adaptive partition", "offloadkit.plan.partition", "06_partitioning",
               "make_plan('scheinfer', ...) -> plan.gg_rows: the rows of every block resident on the GPU"),
    EnginePart("Token assignment", "offloadkit.plan.assign", "07_token_assignment",
               "executor.assigner (TokenAssigner): at every step, each block's host rows split into CC and CG"),
    EnginePart("Step graph + executor", "offloadkit.runtime.executor", "08_engine",
               "engine.executor (HybridExecutor): the step graph (StepBuilder, shared with the simulator) run "
               "on four lane threads, dependencies as device events"),
)


def engine_parts(engine: HybridEngine) -> list[tuple[EnginePart, str]]:
    """Each part of :data:`ENGINE_PARTS` with what it is in the open ``engine`` (the object, its figures)."""
    ex, plan, spec = engine.executor, engine.plan, engine.spec
    from offloadkit.plan.plans import gpu_bytes_breakdown

    gg = gpu_bytes_breakdown(plan, spec, engine.workload)["weights"]
    cpu_math = ex.math["cpu"]
    found = {
        "offloadkit.kernels.cuda.ops": f"device.ops = {engine.device.ops.__name__} on {engine.device.kind}",
        "offloadkit.kernels.cpu.experts": f"{type(cpu_math).__name__} on the cpu lane, calling "
                                          f"expert_rows ({cpu_math.side} side)",
        "offloadkit.runtime.streaming": f"{type(ex.streamer).__name__}, mode {ex.streamer.mode!r}, "
                                        f"{plan.staging_buffers} staging buffer(s)",
        "offloadkit.plan.partition": f"plan {plan.name}: {gg / 2**20:.2f} MiB of weights resident (GG, "
                                     f"{gg / spec.total_bytes:.0%} of the model)",
        "offloadkit.plan.assign": f"{type(ex.assigner).__name__}, rule {plan.assign!r}",
        "offloadkit.runtime.executor": f"{type(ex).__name__} on {engine.device.label.split(' (')[0]}",
    }
    return [(p, found[p.module]) for p in ENGINE_PARTS]


# ---- how a prefill changes with the prompt (simulated) ---------------------------------------------------

@dataclass
class SweepPoint:
    prompt: int
    plan: str
    step_s: float
    busy_s: dict[str, float]
    timeline: Timeline | None


def prompt_sweep(spec: Any, profile: HardwareProfile, prompts: Sequence[int], *, policy: str = "scheinfer",
                 routing: str = "zipf:1.2", gen: int = 128, record: bool = False, plan: Plan | None = None
                 ) -> list[SweepPoint]:
    """Simulated prefill of each prompt length: step time and each lane's busy time. One plan (for
    ``prompts``' largest prompt plus ``gen``, or ``plan``) for all, as an engine holds one placement; its
    token assignment still decides per step."""
    from offloadkit.runtime.sim import simulate

    plan = plan or make_plan(policy, spec, profile, Workload(max(prompts), gen), routing)
    out = []
    for p in prompts:
        r = simulate(spec, profile, plan, Workload(p, 0), routing, record=record, check_memory=False)
        busy = dict(r.busy_prefill_s)
        out.append(SweepPoint(p, plan.name, r.prefill_s, {k: busy.get(k, 0.0) for k in LANES},
                              r.timeline if record else None))
    return out


def prompt_sweep_figure(points: Sequence[SweepPoint], what: str, where: str, mark: int | None = None) -> go.Figure:
    """Two panels against the prompt (log axis): the prefill's tokens/s, and each lane's busy share of the
    step; ``mark`` draws a vertical line at that prompt. Labelled simulated on ``where``."""
    x = [p.prompt for p in points]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.14,
                        subplot_titles=("prefill throughput", "lane busy / step time"))
    fig.add_trace(go.Scatter(x=x, y=[p.prompt / p.step_s for p in points], mode="lines+markers",
                             name="prefill tok/s", line_color="black"), row=1, col=1)
    colors = {"cpu": "#1f77b4", "gpu": "#ff7f0e", "h2d": "#d62728", "d2h": "#2ca02c"}
    for lane in LANES:
        fig.add_trace(go.Scatter(x=x, y=[p.busy_s[lane] / p.step_s for p in points], mode="lines+markers",
                                 name=f"{lane} busy", line_color=colors[lane]), row=1, col=2)
    for c in (1, 2):
        fig.update_xaxes(type="log", title_text="prompt tokens (log)", row=1, col=c)
        if mark is not None:
            fig.add_vline(x=mark, line_dash="dot", line_color="grey", row=1, col=c)
    fig.update_yaxes(title_text="tokens/s (simulated)", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="fraction of the step", range=[0, 1.05], row=1, col=2)
    fig.update_layout(title=f"{what}<br><sup><b>simulated</b> on {where}</sup>", height=450,
                      legend={"orientation": "h", "y": -0.25, "x": 0})
    return fig


class PromptExplorer:
    """A slider over the prompt (``prompts``, e.g. 16 ... 4096) on one simulated case: the sweep figure with the
    chosen prompt marked, and that prompt's prefill drawn as a timeline. ``set(prompt=...)`` / ``values()``
    drive it from code (what tests and nbval call); it displays itself. Everything it draws is **simulated**."""

    def __init__(self, spec: Any, profile: HardwareProfile, prompts: Sequence[int] = (16, 64, 256, 1024, 4096), *,
                 prompt: int = 512, policy: str = "scheinfer", routing: str = "zipf:1.2", gen: int = 128) -> None:
        import ipywidgets as widgets

        from offloadkit.viz.timeline import timeline_figure

        self.spec, self.profile, self.routing = spec, profile, routing
        options = sorted(set(prompts) | {prompt})
        self.plan = make_plan(policy, spec, profile, Workload(max(options), gen), routing)
        self.points = prompt_sweep(spec, profile, options, routing=routing, plan=self.plan)
        self.what = f"{spec.name} prefill, {self.plan.name} plan (made for pp{max(options)}+tg{gen})"
        self.slider = widgets.SelectionSlider(options=options, value=prompt, description="prompt",
                                              continuous_update=False)
        self.sweep = go.FigureWidget(prompt_sweep_figure(self.points, self.what, profile.name, mark=prompt))
        self.timeline = go.FigureWidget()
        self._timeline_figure = timeline_figure
        self.status = widgets.HTML()
        self.slider.observe(lambda _: self._update(), names="value")
        self._update()

    def values(self) -> dict[str, int]:
        return {"prompt": self.slider.value}

    def set(self, prompt: int) -> None:
        self.slider.value = prompt  # observe -> _update

    def _update(self) -> None:
        from offloadkit.runtime.sim import simulate

        p = self.slider.value
        r = simulate(self.spec, self.profile, self.plan, Workload(p, 0), self.routing, check_memory=False)
        new = self._timeline_figure(r.timeline, step=0, title=f"{self.spec.name} prefill of {p} tokens, "
                                    f"{self.plan.name} plan — simulated on {self.profile.name}")
        with self.sweep.batch_update():
            for shape in self.sweep.layout.shapes:
                if shape.type == "line":
                    shape.x0 = shape.x1 = p
        with self.timeline.batch_update():
            self.timeline.data = []
            self.timeline.add_traces(list(new.data))
            self.timeline.layout = new.layout
        point = next(q for q in self.points if q.prompt == p)
        busiest = max(LANES, key=lambda lane: point.busy_s[lane])
        self.status.value = (f"<b>simulated</b> on {self.profile.name}: prefill of {p} tokens in "
                             f"{point.step_s * 1e3:.1f} ms ({p / point.step_s:.0f} tok/s); busiest lane "
                             f"<b>{busiest}</b> ({point.busy_s[busiest] / point.step_s:.0%} of the step)")
        self.last = r

    @property
    def widget(self) -> Any:
        import ipywidgets as widgets

        return widgets.VBox([self.slider, self.status, self.sweep, self.timeline])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


__all__ = ["ENGINE_PARTS", "LANES", "TOUR_POLICIES", "EnginePart", "HybridRun", "PromptExplorer", "SpeedupRow",
           "SweepPoint", "engine_parts", "hybrid_profile", "open_device", "prompt_sweep",
           "prompt_sweep_figure", "rows_from_comparison", "rows_from_runs", "run_hybrid", "speedup_figure",
           "speedup_table"]
