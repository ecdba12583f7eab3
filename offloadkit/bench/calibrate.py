"""Hold the simulator to the real CPU engine: simulated and measured seconds of the same work, phase by phase.

Every speedup offloadkit shows for GPU machines is **simulated**, so the simulator must be held against a
**measurement** where one can be taken: offloadkit's CPU engine (:mod:`offloadkit.runtime.cpu_engine`) on
this machine, priced on a profile measured here (``offloadkit profile``, whose ``[cpu_lane]`` prices the
engine task by task: docs/DESIGN.md, "Calibration").

- :func:`predict_engine` is the simulator's side: the seconds of llama-bench's tests under a policy
  (``cpu-only``: offloadkit's CPU engine; ``llamacpp``: llama.cpp's CPU backend), with llama-bench's
  protocol: ``pp`` is one forward of ``n_prompt`` tokens on an empty KV cache, ``tg`` is ``n_gen``
  one-token forwards starting from an empty context (with both, the generation follows the prompt).
  ``offloadkit bench`` prints it as the ``sim_ts`` column.
- :func:`hold` measures the engine on the same work (same prompt lengths, same routing: the engine's own
  expert choices replayed into the simulation) and returns simulated / measured per phase and per task
  kind (:class:`Holding`), so a mispriced kind shows by name. The work the engine does between its
  recorded tasks is the kind ``outside`` (a forward's wall time minus its tasks).

It refuses nothing of its own; a profile without ``[cpu_lane]`` prices the engine with the plain
roofline (and says so in the rows' label), and a profile without a GPU refuses a plan that uses one
(:class:`~offloadkit.errors.PlanError`).
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offloadkit.model.spec import ModelSpec
from offloadkit.plan.plans import Plan, Workload, all_cpu, first_n_layers_on_gpu

#: Task kinds of the simulated timeline that stand for the engine's work between recorded tasks.
OUTSIDE = "outside"
HOST = ("host_step", "host_layer", "host_moe_layer")
PHASES = ("pp", "tg")


# ---- the simulator's side ---------------------------------------------------------------------------------

def engine_plan(spec: ModelSpec, policy: str = "cpu-only", logits: str = "last", profile: Any = None) -> Plan:
    """The plan of an engine running ``spec`` alone on this machine's CPU, with the engine's conventions in
    ``meta``: offloadkit's CPU engine keeps its KV cache in float32; llama.cpp's in float16 (its default),
    its CPU lane is not offloadkit's, and it evaluates the prompt in 512-token chunks one op after another."""
    if policy == "cpu-only":
        return replace(all_cpu(spec), meta={"kv_dtype": "float32", "logits": logits, "cpu_engine": True})
    if policy == "llamacpp":
        gpu = profile is not None and getattr(profile, "gpu", None) is not None
        base = first_n_layers_on_gpu(spec, 0, op_offload=gpu)
        return replace(base, ubatch=512, serial=True, pinned=False,
                       meta={"kv_dtype": "float16", "logits": "last", "cpu_engine": False})
    from offloadkit.errors import PlanError

    raise PlanError(f"no engine plan for policy {policy!r}: use 'cpu-only' (offloadkit's CPU engine) or 'llamacpp'")


class CountsRouting:
    """A routing that replays given per-step counts [steps, layers, experts] (the engine's own choices)."""

    label = "measured"

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = np.asarray(counts)

    def step_counts(self, spec: ModelSpec, step_tokens: Sequence[int]) -> np.ndarray:
        return self.counts[:len(step_tokens)]


def _workloads(n_prompt: int, n_gen: int) -> dict[str, Workload]:
    """llama-bench's tests as workloads: pp alone; tg from an empty context (its first step is a 1-token
    'prompt'); with both, the generation after the prompt (simulated as one workload)."""
    if n_prompt and n_gen:
        return {"pg": Workload(n_prompt, n_gen)}
    out = {}
    if n_prompt:
        out["pp"] = Workload(n_prompt, 0)
    if n_gen:
        out["tg"] = Workload(1, n_gen - 1)
    return out


def simulate_test(spec: ModelSpec, profile: Any, n_prompt: int, n_gen: int, *, policy: str = "cpu-only",
                  logits: str = "last", routing: Any = None, record: bool = False) -> dict[str, Any]:
    """The :class:`~offloadkit.runtime.simresult.SimResult` of each phase of a test (``pp``, ``tg``, or ``pg``)."""
    from offloadkit.runtime.sim import simulate

    plan = engine_plan(spec, policy, logits, profile)
    return {phase: simulate(spec, profile, plan, w, routing.get(phase) if isinstance(routing, dict) else routing,
                            record=record)
            for phase, w in _workloads(n_prompt, n_gen).items()}


def predict_engine(spec: ModelSpec, profile: Any, n_prompt: int, n_gen: int, *, policy: str = "cpu-only",
                   logits: str = "last", routing: Any = None) -> float:
    """**Simulated** seconds of one llama-bench test on ``profile``: a forward of ``n_prompt`` tokens on an
    empty cache, then ``n_gen`` one-token forwards (each from an empty context when ``n_prompt`` is 0).

    ``policy``: ``"cpu-only"`` (offloadkit's CPU engine, priced from the profile's ``[cpu_lane]``) or
    ``"llamacpp"`` (llama.cpp's CPU backend, ``-ngl 0``). ``logits``: ``"last"`` (what llama-bench asks,
    and what ``offloadkit bench`` asks of the engine) or ``"all"`` (every prompt position). ``routing``:
    default uniform. Tokens per second are ``(n_prompt + n_gen) / predict_engine(...)``.
    """
    return sum(r.total_s for r in simulate_test(spec, profile, n_prompt, n_gen, policy=policy, logits=logits,
                                                routing=routing).values())


# ---- the measured side ----------------------------------------------------------------------------------

@dataclass
class Measured:
    """Median wall seconds of a phase over its repetitions, and the median seconds per task kind in it."""

    wall_s: float
    kinds_s: dict[str, float]
    samples_s: list[float]
    counts: np.ndarray | None = None  # the engine's routing, [steps, layers, experts]


def _forward_kwargs(engine: Any, logits: str) -> dict[str, Any]:
    return {"logits": logits} if "logits" in inspect.signature(engine.forward).parameters else {}


def _run(engine: Any, ids: list[torch.Tensor], logits: str) -> tuple[float, dict[str, float], np.ndarray]:
    """One repetition: forwards of ``ids`` in turn on a fresh cache; wall seconds, seconds per kind (with
    ``outside``: wall minus tasks), and the routing counts per forward."""
    spec = engine.spec
    cache = engine.new_cache(1, sum(x.shape[1] for x in ids))
    kw = _forward_kwargs(engine, logits)
    kinds: dict[str, float] = defaultdict(float)
    counts = np.zeros((len(ids), spec.n_layers, max(spec.n_experts, 1)), dtype=np.int64)
    wall = 0.0
    for i, x in enumerate(ids):
        routing: dict[int, torch.Tensor] = {}
        t0 = time.perf_counter()
        engine.forward(x, cache, routing=routing, **kw)
        dt = time.perf_counter() - t0
        wall += dt
        step = engine.timeline.steps()[-1]
        tasks = 0.0
        for r in engine.timeline.select(step=step):
            kinds[r.kind] += r.end_s - r.start_s
            tasks += r.end_s - r.start_s
        kinds[OUTSIDE] += dt - tasks
        for layer, experts in routing.items():
            counts[i, layer] = np.bincount(experts.reshape(-1).numpy(), minlength=spec.n_experts)
    return wall, dict(kinds), counts


def measure_phase(engine: Any, n_prompt: int, n_gen: int, reps: int = 3, logits: str = "last",
                  seed: int = 0) -> Measured:
    """**Measured**: ``reps`` repetitions (after one warm-up) of a pp (``n_gen == 0``) or tg (``n_prompt == 0``)
    test on ``engine``, each on a fresh cache with fresh random token ids."""
    rng = np.random.default_rng(seed)
    vocab = engine.spec.vocab_size

    def ids() -> list[torch.Tensor]:
        sizes = ([n_prompt] if n_prompt else []) + [1] * n_gen
        return [torch.from_numpy(rng.integers(3, vocab, size=(1, n), dtype=np.int64)) for n in sizes]

    _run(engine, ids(), logits)
    runs = [_run(engine, ids(), logits) for _ in range(reps)]
    walls = [r[0] for r in runs]
    mid = sorted(range(reps), key=lambda i: walls[i])[reps // 2]
    kinds = {k: statistics.median(r[1].get(k, 0.0) for r in runs) for k in runs[0][1]}
    return Measured(statistics.median(walls), kinds, walls, runs[mid][2])


# ---- holding one against the other ------------------------------------------------------------------------

@dataclass
class Holding:
    """Simulated against measured for one model: per phase, the wall seconds and the seconds of each task kind."""

    model: str
    profile: str
    machine: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # phase, kind, simulated_s, measured_s

    def ratio(self, phase: str, kind: str = "total") -> float:
        """simulated / measured of a phase (``kind="total"``) or of one task kind in it."""
        row = next(r for r in self.rows if r["phase"] == phase and r["kind"] == kind)
        return row["simulated_s"] / row["measured_s"] if row["measured_s"] else float("inf")

    def table(self) -> str:
        """A markdown table: one row per (phase, kind), simulated / measured."""
        out = [f"simulated on profile {self.profile}; measured on {self.machine}; model {self.model}", "",
               "| phase | kind | simulated ms | measured ms | sim/meas |", "|---|---|---:|---:|---:|"]
        for r in self.rows:
            ratio = f"{r['simulated_s'] / r['measured_s']:.2f}" if r["measured_s"] > 0 else "-"
            out.append(f"| {r['phase']} | {r['kind']} | {r['simulated_s'] * 1e3:.2f} | {r['measured_s'] * 1e3:.2f} "
                       f"| {ratio} |")
        return "\n".join(out)


def _sim_kinds(result: Any) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for r in result.timeline.records:
        out[OUTSIDE if r.kind in HOST else r.kind] += r.end_s - r.start_s
    return dict(out)


def open_engine(model: Any) -> Any:
    """A :class:`~offloadkit.runtime.cpu_engine.CpuEngine` from an engine, a benchmark model's name
    (``"bench-moe-small"``, bf16), or a checkpoint folder."""
    from offloadkit.runtime.cpu_engine import CpuEngine

    if isinstance(model, CpuEngine):
        return model
    from offloadkit.bench.models import bench_model, is_bench_model
    from offloadkit.model.checkpoint import open_checkpoint

    folder = bench_model(str(model)) if is_bench_model(str(model)) else Path(model)
    ckpt = open_checkpoint(folder)
    return CpuEngine(ckpt.spec, ckpt)


def hold(model: Any, profile: Any, n_prompt: int = 128, n_gen: int = 32, *, reps: int = 3,
         logits: str = "last", seed: int = 0) -> Holding:
    """Measure the CPU engine on llama-bench's ``pp<n_prompt>`` and ``tg<n_gen>`` (``reps`` repetitions each,
    medians) and simulate the same work on ``profile`` (the engine's own routing replayed); returns the
    :class:`Holding` with a total row and one row per task kind for each phase."""
    engine = open_engine(model)
    spec = engine.spec
    out = Holding(spec.name or spec.arch, getattr(profile, "name", str(profile)), engine.machine)
    for phase, (p, g) in (("pp", (n_prompt, 0)), ("tg", (0, n_gen))):
        if not (p or g):
            continue
        measured = measure_phase(engine, p, g, reps, logits, seed)
        routing = CountsRouting(measured.counts) if spec.is_moe else None
        sim = simulate_test(spec, profile, p, g, logits=logits, routing=routing, record=True)[phase]
        out.rows.append({"phase": phase, "kind": "total", "simulated_s": sim.total_s, "measured_s": measured.wall_s})
        simulated = _sim_kinds(sim)
        for kind in sorted(set(simulated) | set(measured.kinds_s)):
            out.rows.append({"phase": phase, "kind": kind, "simulated_s": simulated.get(kind, 0.0),
                             "measured_s": measured.kinds_s.get(kind, 0.0)})
    return out


__all__ = ["OUTSIDE", "CountsRouting", "Holding", "Measured", "engine_plan", "hold", "measure_phase",
           "open_engine", "predict_engine", "simulate_test"]
