"""The adaptive partition: how many rows of every block live on the GPU (GG), sized to the machine.

``partition(spec, profile, workload, routing)`` returns a :class:`~offloadkit.plan.plans.Plan` of the
``balance`` rule (ScheInfer's token assignment, :mod:`offloadkit.plan.assign`) that minimises the
expected time of the whole workload (the prefill in ``ubatch`` chunks and every decode step) under
the cost model, subject to GPU memory (docs/DESIGN.md section 5). offloadkit's formulation:

1. **Fixed state first.** Norms and routers are resident; the embedding table stays on the host (a
   lookup). The KV cache of every layer goes on the GPU if it fits beside the activations of one
   chunk and ``staging_buffers`` buffers for the largest streamed slice; otherwise the last layers
   keep theirs on the host (their attention runs on the CPU). If not even that state fits, the
   model cannot run on the GPU: :class:`PlanError` says what is over and by how much.
2. **A linear program** (SciPy's HiGHS): variables ``x_b`` (GG rows of block ``b``) and, for every
   *scenario* (a prefill chunk size; the average decode step) and layer, the rows each block runs on
   the CPU (``c``) and streams (``s``), with ``c + s + x_b = rows_b``; the layer's time ``T`` bounds
   each lane (``cpu: sum u a(n) c``, ``h2d: sum u p s``, ``gpu: sum u g(n) (s + x)``, ``u`` the
   chance a block is used at such a step, from the routing statistics); minimise the weighted sum of
   the ``T`` subject to ``sum bytes_per_row x <= budget``. Hot experts have larger ``u`` and so
   earn GG rows first. This is the token assignment's own model, relaxed to continuous rows.
3. **Rounding and repair**: ``x`` rounded down to the row chunk, the memory left filled chunk by
   chunk in the order of what the LP wanted, then one-chunk moves kept while they lower
   :func:`expected_time` (the assigner run on the workload's actual routing, layer by layer), within
   ``polish_evals`` layer-step estimates (a count, not a clock: the plan does not depend on the
   machine's load). Tests hold the result within 2% of exhaustive search on small instances.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from offloadkit.errors import PlanError
from offloadkit.model.spec import Block, ModelSpec
from offloadkit.plan.assign import DEFAULT_CHUNK, TokenAssigner
from offloadkit.plan.costmodel import CostModel
from offloadkit.plan.estimate import WorkloadCounts
from offloadkit.plan.plans import (
    Plan,
    Workload,
    check_fits,
    gpu_bytes_breakdown,
    head_block,
    plan_blocks,
    splittable,
    units,
)
from offloadkit.plan.repair import repair
from offloadkit.plan.routing import Routing, parse_routing


@dataclass(frozen=True)
class Fixed:
    """The GPU memory a plan needs before any GG row: what the LP's weight budget is left from."""

    usable: int
    kv_layers: int
    breakdown: dict[str, int]

    @property
    def budget(self) -> int:
        return self.usable - sum(self.breakdown.values())


def fixed_state(spec: ModelSpec, profile: object, workload: Workload, ubatch: int | None,
                staging_buffers: int) -> tuple[Plan, Fixed]:
    """The plan with no GG rows (norms and routers resident, as much KV as fits) and its memory."""
    gpu = getattr(profile, "gpu", None)
    if gpu is None or getattr(profile, "link", None) is None:
        raise PlanError(f"profile {getattr(profile, 'name', profile)!r} has no GPU: the scheinfer partition "
                        f"needs one; use the cpu-only policy")
    small = {b.name: 1 for b in plan_blocks(spec) if not b.rows and b.kind != "embed"}
    usable = int(gpu.usable_memory_bytes)
    for kv_layers in range(spec.n_layers, -1, -1):
        plan = Plan("scheinfer", small, tuple(i < kv_layers for i in range(spec.n_layers)), assign="balance",
                    staging_buffers=staging_buffers, ubatch=ubatch)
        parts = gpu_bytes_breakdown(plan, spec, workload)
        # staging as the largest whole block (an upper bound for any GG choice)
        parts["staging"] = staging_buffers * max(spec.bytes_of(b.params) for b in splittable(spec))
        parts["resident small blocks"] = parts.pop("weights")
        if sum(parts.values()) <= usable:
            return plan, Fixed(usable, kv_layers, parts)
    over = sum(parts.values()) - usable
    detail = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in parts.items() if v)
    raise PlanError(f"{spec.name or spec.arch} cannot run on {profile.name} (usable {usable / 2**30:.2f} GiB) "  # type: ignore[attr-defined]
                    f"even with zero GG rows and no KV cache on the GPU: {detail} is over by {over / 2**30:.2f} GiB; "
                    f"shorten the prompt (activations of one chunk) or use a larger GPU")


def _scenarios(counts: WorkloadCounts, spec: ModelSpec) -> list[tuple[float, int, list[list[tuple[float, int]]]]]:
    """(weight, tokens, per layer per expert (usage probability, tokens when used)) of each LP scenario."""
    out = []
    groups: dict[int, list[np.ndarray]] = {}
    for i, c in enumerate(counts.chunks):
        groups.setdefault(c, []).append(counts.prefill[i])
    phases = [(len(v), k * counts.batch, np.stack(v)) for k, v in groups.items()]
    if len(counts.decode):
        phases.append((len(counts.decode), counts.batch, counts.decode))
    for weight, n, arr in phases:
        used = (arr > 0).mean(axis=0) if arr.size else np.zeros((spec.n_layers, 0))
        mean = np.where(arr > 0, arr, 0).sum(axis=0) / np.maximum((arr > 0).sum(axis=0), 1) if arr.size else used
        experts = [[(float(used[lay, e]), max(1, round(float(mean[lay, e]))))
                    for e in range(arr.shape[2])] for lay in range(spec.n_layers)]
        out.append((float(weight), n, experts))
    return out


def solve_lp(spec: ModelSpec, cost: CostModel, base: Plan, counts: WorkloadCounts, budget: float,
             resident: dict[str, int] | None = None) -> dict[str, float]:
    """Step 2 of the module docstring: continuous GG rows per block name (``resident``: blocks held whole)."""
    blocks = splittable(spec)
    col = {b.name: i for i, b in enumerate(blocks)}
    prices = TokenAssigner(spec, base, cost)
    h2d = cost.h2d_pinned if base.pinned else cost.h2d_pageable
    nvar = len(blocks)
    obj: list[float] = [0.0] * nvar
    ub_r, ub_c, ub_v, ub_b = [], [], [], []
    eq_r, eq_c, eq_v, eq_b = [], [], [], []
    bounds = [(float(b.rows) if resident and b.name in resident else 0.0, float(b.rows)) for b in blocks]
    n_ub = n_eq = 0

    def new_var(lo: float = 0.0, hi: float | None = None, c: float = 0.0) -> int:
        nonlocal nvar
        obj.append(c)
        bounds.append((lo, hi))
        nvar += 1
        return nvar - 1

    per_layer = [[b for b in spec.layer_blocks(layer) if b.rows] for layer in range(spec.n_layers)]
    barriers: list[tuple[list[Block], int | None]] = []  # the barriers of a step, as in TokenAssigner.phase_loads
    for lay, bl in enumerate(per_layer):
        barriers += [([b], lay) for b in bl if b.kind in ("attn_qkv", "attn_o", "ffn")]
        moe = [b for b in bl if b.kind in ("expert", "shared_expert")]
        if moe:
            barriers.append((moe, lay))
    barriers.append(([head_block(spec)], None))
    for weight, n, experts in _scenarios(counts, spec):
        for group, lay in barriers:
            t = new_var(c=weight)
            rows = {"cpu": n_ub, "h2d": n_ub + 1, "gpu": n_ub + 2}
            n_ub += 3
            for r in rows.values():
                ub_r.append(r), ub_c.append(t), ub_v.append(-1.0)
            ub_b += [0.0, 0.0, 0.0]
            for b in group:
                u, tok = (experts[lay][b.expert] if b.kind == "expert" and lay is not None
                          else (1.0, counts.batch if lay is None else n))
                if u <= 0:
                    continue
                a, g = prices.prices(b, tok)
                p = b.params * cost.weight_bytes / b.rows / h2d
                c_v, s_v = new_var(), new_var()
                x = col[b.name]
                eq_r += [n_eq, n_eq, n_eq]
                eq_c += [c_v, s_v, x]
                eq_v += [1.0, 1.0, 1.0]
                eq_b.append(float(b.rows))
                n_eq += 1
                for r, v, w in ((rows["cpu"], c_v, u * a), (rows["h2d"], s_v, u * p), (rows["gpu"], s_v, u * g),
                                (rows["gpu"], x, u * g)):
                    ub_r.append(r), ub_c.append(v), ub_v.append(w)
    for b in blocks:  # memory
        ub_r.append(n_ub), ub_c.append(col[b.name]), ub_v.append(spec.bytes_of(b.params) / b.rows)
    ub_b.append(float(budget))
    n_ub += 1
    a_ub = coo_matrix((ub_v, (ub_r, ub_c)), shape=(n_ub, nvar)).tocsr()
    a_eq = coo_matrix((eq_v, (eq_r, eq_c)), shape=(n_eq, nvar)).tocsr()
    res = linprog(np.asarray(obj), A_ub=a_ub, b_ub=np.asarray(ub_b), A_eq=a_eq, b_eq=np.asarray(eq_b),
                  bounds=bounds, method="highs")
    if res.status != 0:
        raise PlanError(f"the partition's linear program failed: {res.message}")
    x = {b.name: float(res.x[col[b.name]]) for b in blocks}
    x["__objective__"] = float(res.fun)
    return x


def _round(spec: ModelSpec, x: dict[str, float], chunk: int, budget: float) -> dict[str, int]:
    """Round down to the chunk, then fill the memory left in the order of the LP's remainders."""
    blocks = {b.name: b for b in splittable(spec)}
    gg: dict[str, int] = {}
    used = 0.0
    for name, v in x.items():
        b = blocks[name]
        r = b.rows if v >= b.rows - 1e-6 else int(v // min(chunk, b.rows)) * min(chunk, b.rows)
        gg[name] = r
        used += spec.bytes_of(b.params) * r / b.rows
    for name in sorted(x, key=lambda k: -(x[k] - gg[k])):
        b = blocks[name]
        while x[name] - gg[name] > 1e-6 and gg[name] < b.rows:
            step = min(min(chunk, b.rows), b.rows - gg[name])
            nbytes = spec.bytes_of(b.params) * step / b.rows
            if used + nbytes > budget:
                break
            gg[name] += step
            used += nbytes
    return gg


def partition(spec: ModelSpec, profile: object, workload: Workload, routing: Routing | str | None = None, *,
              chunk: int = DEFAULT_CHUNK, staging_buffers: int = 2, ubatch: int | None = None,
              polish_evals: int = 3000, seed: int = 0) -> Plan:
    """The ScheInfer plan of ``spec`` on ``profile`` for ``workload``; see the module docstring."""
    routing = parse_routing(routing, seed) if routing is None or isinstance(routing, str) else routing
    cost = CostModel(profile, spec)  # type: ignore[arg-type]
    base, fixed = fixed_state(spec, profile, workload, ubatch, staging_buffers)
    counts = WorkloadCounts.of(spec, workload, routing, base.prefill_chunks(workload.prompt_tokens))
    share = counts.expert_share() if spec.is_moe else None
    meta = {"chunk": chunk, "kv_layers_on_gpu": fixed.kv_layers, "routing": getattr(routing, "label", "trace")}
    if share is not None:
        meta["expert_share"] = share
    base = Plan("scheinfer", base.gg_rows, base.kv_on_gpu, label="scheinfer", assign="balance",
                staging_buffers=staging_buffers, ubatch=ubatch, meta=meta)
    budget = max(0.0, float(fixed.budget))

    def solve(budget: float, resident: dict[str, int] | None = None) -> tuple[Plan, float]:
        x = solve_lp(spec, cost, base, counts, budget, resident)
        objective = x.pop("__objective__")
        gg = {**base.gg_rows, **{k: v for k, v in _round(spec, x, chunk, budget).items() if v}}
        return Plan("scheinfer", gg, base.kv_on_gpu, label="scheinfer", assign="balance",
                    staging_buffers=staging_buffers, ubatch=ubatch, meta=meta), objective

    plan, objective = solve(budget)
    pinned: set[str] = set()
    # The budget kept staging for the largest block. If that is the lm_head (a large vocabulary) and it is
    # kept resident, staging needs only the next size: try that, keep it if the LP finds it faster.
    sizes = sorted({spec.bytes_of(b.params) for b in splittable(spec)}, reverse=True)
    head = head_block(spec)
    if len(sizes) > 1 and spec.bytes_of(head.params) == sizes[0]:
        big = {head.name: head.rows}
        budget2 = budget + staging_buffers * (sizes[0] - sizes[1])
        if len(big) * sizes[0] <= budget2:
            try:
                wider, objective2 = solve(budget2, big)
                check_fits(wider, spec, profile, workload)
                if objective2 < objective:  # the LP's own estimate of the workload's time
                    plan, budget, pinned = wider, budget2, set(big)
            except PlanError:
                pass
    if polish_evals > 0:
        polished = repair(spec, plan, cost, counts, chunk, budget, polish_evals, pinned)
        plan = Plan("scheinfer", {k: v for k, v in polished.items() if v}, base.kv_on_gpu, label="scheinfer",
                    assign="balance", staging_buffers=staging_buffers, ubatch=ubatch, meta=meta)
    check_fits(plan, spec, profile, workload)  # the budget's accounting is gpu_bytes_breakdown's: a bug if not
    return plan


def with_gg(plan: Plan, spec: ModelSpec, gg: dict[str, int]) -> Plan:
    """``plan`` with GG rows ``gg`` (clipped to each block), for seeding the search from another placement."""
    sizes = {b.name: units(b) for b in plan_blocks(spec)}
    return Plan(plan.policy, {k: min(v, sizes[k]) for k, v in gg.items() if v and k in sizes}, plan.kv_on_gpu,
                label=plan.label, assign=plan.assign, staging_buffers=plan.staging_buffers, ubatch=plan.ubatch,
                meta=plan.meta)


__all__ = ["Fixed", "fixed_state", "partition", "solve_lp", "with_gg"]
