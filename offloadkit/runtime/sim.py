"""The simulator: run a plan's task graphs in virtual time on a hardware profile (docs/DESIGN.md section 9).

Discrete-event execution without threads or waiting. Each lane runs its tasks one at a time in
issue order; a task starts when its lane is free and all its dependencies have finished. Because
lanes are FIFO in issue order and issue order is topological, this is one pass over the tasks:
``start = max(lane free, deps' ends)`` (:func:`schedule`). Steps run back to back: a decode step
needs the token its predecessor sampled.

Two modes:

- **shapes only** (full-size models, no weights): without a timeline to record, steps are stitched
  from layer fragments (:mod:`offloadkit.runtime.fragments`): each distinct layer is built once and
  reused, attention re-priced per step. Mixtral-8x7B pp512 + tg128 under a ScheInfer plan (whose
  decode steps never repeat as a whole) simulates in about 0.17 s on a 2-core VM
  (``benchmarks/plan_speed.py``). Recording a timeline builds each distinct *step* once (a step's
  graph is reused when the token counts and the experts' resident rows repeat) and names every task.
- **with numerics** (tiny models, ``weights=...``): every task is also executed on real tensors by
  :class:`~offloadkit.runtime.numerics.NumericsExecutor`, the router's real choices decide the expert
  tasks, and the schedule is checked for data flow (each value on the right device before use). The
  logits must equal the reference forward.

Every timeline it returns is labelled ``simulated`` on the profile's name; a simulated figure is
never a measurement. It refuses plans that do not fit the profile's GPU (``check_memory=False`` to
study them anyway) and GPU plans on profiles without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from typing import Any

import torch

from offloadkit.errors import PlanError
from offloadkit.model.spec import ModelSpec
from offloadkit.plan.assign import TokenAssigner
from offloadkit.plan.costmodel import CostModel, engine_options
from offloadkit.plan.plans import Plan, Workload, check_fits, parse_plan, plan_blocks
from offloadkit.plan.routing import Routing, parse_routing
from offloadkit.runtime.fragments import EntryPart, FragmentCache, StepLists
from offloadkit.runtime.simresult import SimResult
from offloadkit.runtime.stepgraph import LAUNCHES, StepBuilder, StepShape, layer_blocks
from offloadkit.runtime.tasks import TaskGraph, check_dataflow
from offloadkit.runtime.timeline import LANES, TaskRecord, Timeline

LANE_INDEX = {lane: i for i, lane in enumerate(LANES)}


def schedule(graph: TaskGraph, t0: float = 0.0) -> tuple[list[float], list[float]]:
    """Start and end times (indexed like ``graph.tasks``) of the one-pass FIFO-lane schedule."""
    deps = graph.dep_indices()
    tasks = graph.tasks
    start, end = [0.0] * len(tasks), [0.0] * len(tasks)
    free = dict.fromkeys(LANES, t0)
    for i in graph.issue_order():
        t = tasks[i]
        s = free[t.lane]
        for d in deps[i]:
            if end[d] > s:
                s = end[d]
        start[i], end[i] = s, s + t.duration_s
        free[t.lane] = end[i]
    return start, end


def _run(lanes: Sequence[int], durs: Sequence[float], deps: Sequence[tuple[int, ...]], t0: float) -> tuple[list, list]:
    """:func:`schedule` on plain lists of a graph in topological issue order (the hot loop)."""
    free = [t0, t0, t0, t0]
    n = len(durs)
    start, end = [0.0] * n, [0.0] * n
    for i in range(n):
        ln = lanes[i]
        s = free[ln]
        for d in deps[i]:
            e = end[d]
            if e > s:
                s = e
        start[i] = s
        end[i] = free[ln] = s + durs[i]
    return start, end


class _Template:
    """A compiled step graph: parallel lists, with the attention tasks and expert names left open."""

    def __init__(self, graph: TaskGraph, active: list[list[int]]) -> None:
        tasks = graph.tasks
        self.lanes = [LANE_INDEX[t.lane] for t in tasks]
        self.lane_names = [t.lane for t in tasks]
        self.durs = [t.duration_s for t in tasks]
        self.deps = graph.dep_indices()
        self.kinds = [t.kind for t in tasks]
        self.layers = [t.layer for t in tasks]
        self.bytes_ = [t.bytes_ for t in tasks]
        self.flops = [t.flops for t in tasks]
        self.names = [t.name for t in tasks]
        #: expert tasks: (position, layer, rank of the expert among the layer's active experts, name format)
        self.experts = [(i, t.layer, active[t.layer].index(t.expert),
                         t.name.replace(f"expert{t.expert}", "expert{e}", 1))
                        for i, t in enumerate(tasks) if t.expert is not None and t.layer is not None]
        self.attention = [(i, t.lane) for i, t in enumerate(tasks) if t.kind == "attention"]
        attn = {i for i, _ in self.attention}
        #: busy seconds per lane of the tasks whose price does not change from step to step
        self.fixed_busy = [0.0] * len(LANES)
        for i, (ln, d) in enumerate(zip(self.lanes, self.durs, strict=True)):
            if i not in attn:
                self.fixed_busy[ln] += d


def _resolve(spec: ModelSpec | str, profile: Any, plan: Plan | str) -> tuple[ModelSpec, Any, Plan]:
    if isinstance(spec, str):
        from offloadkit.model.zoo import load_spec

        spec = load_spec(spec)
    if isinstance(profile, str):
        from offloadkit.hardware.catalog import load_profile

        profile = load_profile(profile)
    if isinstance(plan, str):
        plan = parse_plan(plan, spec)
    if len(plan.kv_on_gpu) != spec.n_layers:
        raise PlanError(f"plan {plan.name} places {len(plan.kv_on_gpu)} layers, the model has {spec.n_layers}")
    return spec, profile, plan


def step_shapes(workload: Workload, plan: Plan | None = None) -> list[StepShape]:
    """The prefill (in the plan's ``ubatch`` chunks, all numbered step 0), then one step per generated token
    (each with the KV cache one longer)."""
    p, b = workload.prompt_tokens, workload.batch
    chunks = plan.prefill_chunks(p) if plan is not None else [p]
    past = [sum(chunks[:i]) for i in range(len(chunks))]
    return ([StepShape(0, c, q, b) for c, q in zip(chunks, past, strict=True)]
            + [StepShape(i, 1, p + i - 1, b) for i in range(1, workload.gen_tokens + 1)])


def simulate(spec: ModelSpec | str, profile: Any, plan: Plan | str, workload: Workload | None = None,
             routing: Routing | str | None = None, *, weights: Mapping[str, torch.Tensor] | Any = None,
             prompt_ids: torch.Tensor | None = None, check_memory: bool = True, record: bool = True,
             seed: int = 0) -> SimResult:
    """Simulate ``workload`` (prefill + decode steps) of ``spec`` under ``plan`` on ``profile``.

    ``spec``, ``profile`` and ``plan`` may be given by name (``"mixtral-8x7b"``, ``"rtx4090-desktop"``,
    ``"ngl:8"``). ``routing`` (shapes only): a :class:`Routing`, or ``"uniform"`` / ``"zipf:1.2"`` /
    ``"trace:PATH"``; default uniform. ``weights`` (a mapping of tensors or a ``ReferenceModel``) turns
    on numerics: ``prompt_ids`` [B, P] (default: seeded random ids), greedy decoding, logits per step
    in the result. ``record=False`` skips the per-task timeline (for search loops).
    """
    spec, profile, plan = _resolve(spec, profile, plan)
    workload = workload or Workload()
    if check_memory:
        check_fits(plan, spec, profile, workload)
    cost = CostModel(profile, spec, pinned=plan.pinned, **engine_options(plan))
    if plan.uses_gpu and not cost.has_gpu:
        raise PlanError(f"plan {plan.name} uses a GPU but profile {profile.name!r} has none")
    routing = parse_routing(routing, seed) if routing is None or isinstance(routing, str) else routing
    meta = {"model": spec.name or spec.arch, "plan": plan.name, "policy": plan.policy, "workload": workload.label,
            "routing": getattr(routing, "label", type(routing).__name__) if weights is None else "model router",
            "numerics": weights is not None}
    timeline = Timeline("simulated", profile.name, [], meta)
    result = SimResult(timeline, workload, spec.name or spec.arch, plan.name, profile.name)
    if weights is not None:
        _simulate_numerics(spec, plan, cost, workload, weights, prompt_ids, seed, result, record)
    else:
        _simulate_shapes(spec, plan, cost, workload, routing, result, record)
    return result


def _simulate_shapes(spec: ModelSpec, plan: Plan, cost: CostModel, workload: Workload, routing: Routing,
                     result: SimResult, record: bool) -> None:
    shapes = step_shapes(workload, plan)
    n_exp = spec.n_experts
    assigner = TokenAssigner(spec, plan, cost)
    if spec.is_moe:
        counts = routing.step_counts(spec, [s.n for s in shapes]).tolist()
    else:
        counts = [[[]] * spec.n_layers] * len(shapes)
    blocks = layer_blocks(spec)
    gg = [[plan.gg_rows.get(f"L{layer}.expert{e}", 0) for e in range(n_exp)] for layer in range(spec.n_layers)]
    if not record:
        _simulate_fragments(spec, plan, cost, shapes, counts, gg, blocks, assigner, result)
        return
    templates: dict[tuple, tuple[_Template, list[list[int]]]] = {}
    records = result.timeline.records
    t0 = 0.0
    for shape, step_counts in zip(shapes, counts, strict=True):
        key = (shape.tokens, shape.batch, shape.step == 0,
               tuple(tuple((c, g) for c, g in zip(row, gl, strict=False) if c) for row, gl in zip(step_counts, gg,
                                                                                                   strict=True)))
        active = [[e for e, c in enumerate(row) if c] for row in step_counts]
        hit = templates.get(key)
        if hit is None:
            graph = StepBuilder(spec, plan, cost, shape, blocks=blocks, assigner=assigner).build(
                lambda layer, c=step_counts: c[layer])
            hit = templates[key] = (_Template(graph, active), active)
        tpl = hit[0]
        durs, bytes_, flops = tpl.durs, tpl.bytes_, tpl.flops
        busy = list(tpl.fixed_busy)
        if tpl.attention:
            durs, bytes_, flops = list(durs), list(bytes_), list(flops)
            b, f = cost.attention_cost(shape.tokens, shape.past, shape.batch)
            priced = {lane: cost.attention_s(lane, shape.tokens, shape.past, shape.batch, LAUNCHES["attention"])
                      for lane in {x[1] for x in tpl.attention}}
            b, f = int(b), int(f)
            for i, lane in tpl.attention:
                durs[i], bytes_[i], flops[i] = priced[lane], b, f
                busy[LANE_INDEX[lane]] += priced[lane]
        start, end = _run(tpl.lanes, durs, tpl.deps, t0)
        t1 = max(end) if end else t0
        result.add_step_busy(shape.step, t1 - t0, busy)
        if record:
            names = tpl.names
            if tpl.experts:
                names = list(names)
                for i, layer, rank, fmt in tpl.experts:
                    names[i] = fmt.format(e=active[layer][rank])
            records.extend(map(TaskRecord, tpl.lane_names, names, start, end, tpl.layers, tpl.kinds, bytes_, flops,
                               repeat(shape.step, len(durs))))
        t0 = t1


def _prologue(b: StepBuilder) -> list[str]:
    """A fragment body: the step's embedding lookup."""
    return [b.prologue()]


def _epilogue(b: StepBuilder) -> list[str]:
    """A fragment body: the final norm, the lm_head and the logits' copy, reading ``resid`` and ``delta``."""
    b.epilogue("resid", "delta")
    return []


def _layer_body(layer: int, row: list[int], has_delta: bool) -> Callable[[StepBuilder], list[str]]:
    """A fragment body that emits one layer, reading its inputs as ``resid`` and ``delta``."""
    return lambda b: list(b.layer(layer, "resid", "delta" if has_delta else None, lambda _: row))


def _simulate_fragments(spec: ModelSpec, plan: Plan, cost: CostModel, shapes: list[StepShape], counts: list,
                        gg: list[list[int]], blocks: list, assigner: TokenAssigner, result: SimResult) -> None:
    """The fast path of shape-only simulation without a timeline: steps stitched from layer fragments
    (:mod:`offloadkit.runtime.fragments`), the same graphs as the builder's."""
    current: list[StepShape] = [shapes[0]]
    cache = FragmentCache(lambda: StepBuilder(spec, plan, cost, current[0], blocks=blocks, assigner=assigner))
    static = [(plan.kv_on_gpu[layer], tuple((b.kind, plan.gg_rows.get(b.name, 0)) for b in spec.layer_blocks(layer)
                                            if b.kind != "expert")) for layer in range(spec.n_layers)]
    head = tuple(plan.gg_rows.get(b.name, 0) for b in plan_blocks(spec) if b.layer is None)
    serial, staging = plan.serial, plan.staging_buffers
    t0 = 0.0
    for shape, step_counts in zip(shapes, counts, strict=True):
        current[0] = shape
        step = StepLists.empty()
        base = (shape.tokens, shape.batch)
        state = cache.add(step, ("pro", *base), {"ids": [EntryPart("cpu", 8 * shape.n, [])]}, _prologue, serial,
                          staging, ["resid"])
        for layer in range(spec.n_layers):
            row = step_counts[layer]
            key = ("layer", *base, static[layer], tuple((c, g) for c, g in zip(row, gg[layer], strict=False) if c))
            state = cache.add(step, key, state, _layer_body(layer, row, "delta" in state), serial, staging,
                              ["resid", "delta"])
        cache.add(step, ("epi", *base, head), state, _epilogue, serial, staging, [])
        durs = step.durs
        if step.attention:
            priced = {lane: cost.attention_s(lane, shape.tokens, shape.past, shape.batch, LAUNCHES["attention"])
                      for lane in ("cpu", "gpu") if lane == "cpu" or cost.has_gpu}
            for i, lane in step.attention:
                durs[i] = priced[lane]
        busy = [0.0] * len(LANES)
        for ln, d in zip(step.lanes, durs, strict=True):
            busy[ln] += d
        start, end = _run(step.lanes, durs, step.deps, t0)
        t1 = max(end) if end else t0
        result.add_step_busy(shape.step, t1 - t0, busy)
        t0 = t1


def _simulate_numerics(spec: ModelSpec, plan: Plan, cost: CostModel, workload: Workload, weights: Any,
                       prompt_ids: torch.Tensor | None, seed: int, result: SimResult, record: bool) -> None:
    from offloadkit.model.reference import ReferenceModel
    from offloadkit.runtime.numerics import NumericsExecutor

    model = weights if isinstance(weights, ReferenceModel) else ReferenceModel(spec, weights)
    b, p = workload.batch, workload.prompt_tokens
    if prompt_ids is None:
        prompt_ids = torch.randint(0, spec.vocab_size, (b, p), generator=torch.Generator().manual_seed(seed))
    if tuple(prompt_ids.shape) != (b, p):
        raise PlanError(f"prompt_ids has shape {tuple(prompt_ids.shape)}, the workload asks for ({b}, {p})")
    executor = NumericsExecutor(model, b, workload.max_len)
    blocks = layer_blocks(spec)
    assigner = TokenAssigner(spec, plan, cost)
    shapes = step_shapes(workload, plan)
    n_prefill = sum(1 for s in shapes if s.step == 0)
    ids, t0 = prompt_ids, 0.0
    with torch.no_grad():
        for i, shape in enumerate(shapes):
            if shape.step == 0:
                ids = prompt_ids[:, shape.past:shape.past + shape.tokens]
            executor.begin_step(ids)
            graph = StepBuilder(spec, plan, cost, shape, on_task=executor.run, blocks=blocks,
                                assigner=assigner).build(executor.expert_counts)
            start, end = schedule(graph, t0)
            check_dataflow(graph, start, end)
            logits = executor.end_step()
            if i >= n_prefill - 1:  # a prefill chunk before the last samples nothing
                result.logits.append(logits)
                ids = logits.argmax(-1, keepdim=True)
                result.tokens.append(ids)
            t1 = max(end)
            result.add_step(shape.step, t1 - t0, [LANE_INDEX[t.lane] for t in graph.tasks],
                            [t.duration_s for t in graph.tasks])
            if record:
                result.timeline.records.extend(
                    TaskRecord(t.lane, t.name, s, e, t.layer, t.kind, t.bytes_, t.flops, shape.step)
                    for t, s, e in zip(graph.tasks, start, end, strict=True))
            t0 = t1


__all__ = ["SimResult", "schedule", "simulate", "step_shapes"]
