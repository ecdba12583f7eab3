"""Lower bounds: the time no placement can beat under the cost model, per phase, and the lane that sets it.

For a phase (the prefill, or all decode steps) of a workload, every weight row a step uses must be
read once: by the GPU if it is resident (``bytes / gpu bandwidth`` or its FLOPs), or, if it lives on
the host, either computed by the CPU (``a(n)`` per row, growing with the tokens ``n``) or streamed
over PCIe (``p`` per row) and computed by the GPU. offloadkit's bound is the linear program

    minimise T  subject to  T >= sum over steps of the CPU work,  T >= ... of the copies,
                            T >= ... of the GPU work,  sum of resident bytes <= the weight budget,

over *any* placement (GG rows per block, chosen for this phase alone) and any per-step split, with
the lanes of the whole phase pooled (no layer waits for another, no overheads, no attention or norms):
every real schedule does at least this much on each lane, so its time is at least ``T``. Decode at
batch 1 reduces to the familiar form, host-resident active bytes over the sum of the CPU's DRAM
bandwidth and the PCIe bandwidth (or the resident bytes over the GPU bandwidth, if larger). The weight
budget is the usable GPU memory less the KV cache and the resident norms and routers (activations and
staging are left out, which only loosens the bound).

``bounding_lane`` is the lane of the binding constraint; ``busy_s`` the seconds each lane works in the
bound's solution. :func:`fraction` is a policy's simulated time as a fraction of the bound (1.0: it
reaches what the hardware allows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from offloadkit.errors import PlanError
from offloadkit.model.spec import ModelSpec
from offloadkit.plan.assign import TokenAssigner
from offloadkit.plan.costmodel import CostModel
from offloadkit.plan.estimate import WorkloadCounts
from offloadkit.plan.plans import Plan, Workload, plan_blocks, splittable
from offloadkit.plan.routing import Routing, parse_routing

BOUND_LANES = ("cpu", "h2d", "gpu")


@dataclass(frozen=True)
class PhaseBound:
    """The lower bound of one phase: ``seconds`` for ``tokens`` tokens (simulated, on ``profile``)."""

    phase: str
    seconds: float
    tokens: int
    bounding_lane: str
    busy_s: dict[str, float]
    profile: str

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def fraction(bound: PhaseBound, seconds: float) -> float:
    """How close a run of ``seconds`` comes to the bound: ``bound / seconds`` (1.0 at the bound)."""
    return bound.seconds / seconds if seconds > 0 else 0.0


def _groups(spec: ModelSpec, counts: WorkloadCounts, phase: str) -> list[tuple[int, int, np.ndarray]]:
    """(tokens of the step, multiplicity, counts [L, E]) of the phase's steps."""
    if phase == "prefill":
        return [(c * counts.batch, 1, counts.prefill[i]) for i, c in enumerate(counts.chunks)]
    return [(counts.batch, 1, d) for d in counts.decode]


def phase_bound(spec: ModelSpec, profile: object, workload: Workload, counts: WorkloadCounts, phase: str,
                budget: float) -> PhaseBound:
    """The bound of ``phase`` (``"prefill"`` or ``"decode"``) given the steps' ``counts``."""
    cost = CostModel(profile, spec)  # type: ignore[arg-type]
    prices = TokenAssigner(spec, Plan("bound", {}, (True,) * spec.n_layers, assign="balance"), cost)
    blocks = splittable(spec)
    col = {b.name: i for i, b in enumerate(blocks)}
    h2d = cost.h2d_pinned
    # per block: {tokens: times used} over the phase's steps
    uses: list[dict[int, int]] = [{} for _ in blocks]
    for n, m, c in _groups(spec, counts, phase):
        for b in blocks:
            t = n if b.kind != "expert" else int(c[b.layer, b.expert])
            if b.kind == "lm_head":
                t = counts.batch
            if t:
                uses[col[b.name]][t] = uses[col[b.name]].get(t, 0) + m
    nvar = len(blocks) + 1  # x_b..., T
    t_var = len(blocks)
    obj = [0.0] * nvar
    obj[t_var] = 1.0
    bounds: list[tuple[float, float | None]] = [(0.0, float(b.rows)) for b in blocks] + [(0.0, None)]
    lane_terms: dict[str, list[tuple[int, float]]] = {lane: [] for lane in BOUND_LANES}
    eq_r, eq_c, eq_v, eq_b = [], [], [], []
    for i, b in enumerate(blocks):
        for t, m in uses[i].items():
            a, g = prices.prices(b, t)
            p = b.params * cost.weight_bytes / b.rows / h2d
            c_v, s_v = nvar, nvar + 1
            nvar += 2
            obj += [0.0, 0.0]
            bounds += [(0.0, None), (0.0, None)]
            eq_r += [len(eq_b)] * 3
            eq_c += [c_v, s_v, i]
            eq_v += [1.0, 1.0, 1.0]
            eq_b.append(float(b.rows))
            lane_terms["cpu"].append((c_v, m * a))
            lane_terms["h2d"].append((s_v, m * p))
            lane_terms["gpu"] += [(s_v, m * g), (i, m * g)]
    ub_r, ub_c, ub_v = [], [], []
    for r, lane in enumerate(BOUND_LANES):
        for v, w in lane_terms[lane]:
            ub_r.append(r), ub_c.append(v), ub_v.append(w)
        ub_r.append(r), ub_c.append(t_var), ub_v.append(-1.0)
    for b in blocks:
        ub_r.append(3), ub_c.append(col[b.name]), ub_v.append(spec.bytes_of(b.params) / b.rows)
    a_ub = coo_matrix((ub_v, (ub_r, ub_c)), shape=(4, nvar)).tocsr()
    a_eq = coo_matrix((eq_v, (eq_r, eq_c)), shape=(len(eq_b), nvar)).tocsr() if eq_b else None
    res = linprog(np.asarray(obj), A_ub=a_ub, b_ub=np.asarray([0.0, 0.0, 0.0, max(budget, 0.0)]), A_eq=a_eq,
                  b_eq=np.asarray(eq_b) if eq_b else None, bounds=bounds, method="highs")
    if res.status != 0:
        raise PlanError(f"the {phase} bound's linear program failed: {res.message}")
    busy = {lane: float(sum(w * res.x[v] for v, w in lane_terms[lane])) for lane in BOUND_LANES}
    tokens = workload.batch * (workload.prompt_tokens if phase == "prefill" else workload.gen_tokens)
    return PhaseBound(phase, float(res.x[t_var]), tokens, max(busy, key=busy.__getitem__), busy,
                      getattr(profile, "name", "?"))


def weight_budget(spec: ModelSpec, profile: object, workload: Workload) -> float:
    """Usable GPU memory less the KV cache of the workload and the resident norms and routers."""
    gpu = getattr(profile, "gpu", None)
    if gpu is None:
        return 0.0
    small = sum(spec.bytes_of(b.params) for b in plan_blocks(spec) if not b.rows and b.kind != "embed")
    kv = workload.max_len * workload.batch * spec.kv_bytes_per_token()
    return float(gpu.usable_memory_bytes - small - kv)


def workload_bounds(spec: ModelSpec, profile: object, workload: Workload, routing: Routing | str | None = None,
                    seed: int = 0, chunks: list[int] | None = None) -> dict[str, PhaseBound]:
    """Bounds of ``prefill``, ``decode`` (when the workload generates) and ``overall`` (their sum)."""
    if getattr(profile, "gpu", None) is None or getattr(profile, "link", None) is None:
        raise PlanError(f"profile {getattr(profile, 'name', profile)!r} has no GPU: the bound assumes one")
    routing = parse_routing(routing, seed) if routing is None or isinstance(routing, str) else routing
    counts = WorkloadCounts.of(spec, workload, routing, chunks or [workload.prompt_tokens])
    budget = weight_budget(spec, profile, workload)
    out = {"prefill": phase_bound(spec, profile, workload, counts, "prefill", budget)}
    if workload.gen_tokens:
        out["decode"] = phase_bound(spec, profile, workload, counts, "decode", budget)
    busy = {lane: sum(b.busy_s[lane] for b in out.values()) for lane in BOUND_LANES}
    out["overall"] = PhaseBound("overall", sum(b.seconds for b in out.values()),
                                workload.batch * (workload.prompt_tokens + workload.gen_tokens),
                                max(busy, key=busy.__getitem__), busy, out["prefill"].profile)
    return out


__all__ = ["BOUND_LANES", "PhaseBound", "fraction", "phase_bound", "weight_budget", "workload_bounds"]
