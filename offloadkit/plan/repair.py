"""Repair moves for a rounded partition: local search on the planner's own estimate of the workload.

The partition's LP is continuous and leaves out per-slice overheads, so its rounded answer can miss
what chunks and overheads make worth doing: a half-resident block worse than none, a layer whose
experts are all resident (no CPU round trip at all), one large block worth less than two small ones.
:func:`repair` keeps moves that lower :func:`~offloadkit.plan.estimate.expected_time` within the GPU
memory budget, bounded by a count of estimates (:class:`Evals`), not a clock, so a plan never depends
on how busy the machine was.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from offloadkit.model.spec import Block, ModelSpec
from offloadkit.plan.costmodel import CostModel
from offloadkit.plan.estimate import WorkloadCounts, expected_time, layer_patterns
from offloadkit.plan.plans import Plan, splittable


class Evals:
    """A budget of cost evaluations for the repair moves: a count, not a clock, so a plan does not depend
    on how busy the machine was."""

    def __init__(self, n: int) -> None:
        self.left = n

    def spend(self, units: int = 1) -> None:
        self.left -= units

    @property
    def exhausted(self) -> bool:
        return self.left <= 0


def repair(spec: ModelSpec, plan: Plan, cost: CostModel, counts: WorkloadCounts, chunk: int, budget: float,
            evals: int, pinned: set[str] = frozenset()) -> dict[str, int]:
    """Moves kept while they lower :func:`expected_time`, until none does or ``evals`` layer-step estimates
    are spent: a block takes one more chunk or all it lacks, from free memory or from another block
    giving one chunk or all it holds (whole-block moves matter where per-slice overheads make a
    half-resident block worse than none). Blocks in ``pinned`` stay resident: the budget assumed so (a
    resident lm_head needs no staging buffer)."""
    deadline = Evals(evals)
    blocks = splittable(spec)
    gg = dict(plan.gg_rows)
    layer_of = {b.name: b.layer for b in blocks}

    weight = {layer: len(layer_patterns(counts, layer)) for layer in range(spec.n_layers)}
    weight[None] = 1

    def cost_of(layers: set) -> float:
        deadline.spend(sum(weight[x] for x in layers))  # in layer-step estimates: what an estimate costs
        p = Plan(plan.policy, gg, plan.kv_on_gpu, assign=plan.assign, staging_buffers=plan.staging_buffers,
                 ubatch=plan.ubatch, meta=plan.meta)
        return expected_time(spec, p, cost, counts, layers)

    def nbytes(b: Block, rows: int) -> float:
        return spec.bytes_of(b.params) * rows / b.rows

    used = sum(nbytes(b, gg.get(b.name, 0)) for b in blocks)
    improved = True
    while improved and not deadline.exhausted:
        improved = False
        holders = [i for i in blocks if gg.get(i.name, 0) > 0 and i.name not in pinned]
        for j in blocks:
            room = j.rows - gg.get(j.name, 0)
            if room <= 0:
                continue
            # the receiver takes one chunk or all it lacks; a donor gives one chunk or all it holds
            for step_j in sorted({min(min(chunk, j.rows), room), room}):
                for i in [None, *holders]:
                    if deadline.exhausted:
                        break
                    if i is j or (i is not None and gg.get(i.name, 0) <= 0):
                        continue
                    cur = gg.get(i.name, 0) if i is not None else 0
                    gives = [0] if i is None else sorted({cur - ((cur - 1) // min(chunk, i.rows)) * min(chunk, i.rows),
                                                          cur})
                    for step_i in gives:
                        free = budget - used + (nbytes(i, step_i) if i is not None else 0.0)
                        if nbytes(j, step_j) > free + 1e-6:
                            continue
                        layers = {layer_of[j.name]} | ({layer_of[i.name]} if i is not None else set())
                        before = cost_of(layers)
                        gg[j.name] = gg.get(j.name, 0) + step_j
                        if i is not None:
                            gg[i.name] -= step_i
                        after = cost_of(layers)
                        if after < before * (1 - 1e-9):
                            used += nbytes(j, step_j) - (nbytes(i, step_i) if i is not None else 0.0)
                            improved = True
                            break
                        gg[j.name] -= step_j
                        if i is not None:
                            gg[i.name] += step_i
                    if improved:
                        break
                if improved:
                    break
            if improved:
                break
        if not improved and not deadline.exhausted:
            improved, used = _drop_and_refill([b for b in blocks if b.name not in pinned], gg, used, budget, chunk,
                                              nbytes, cost_of, layer_of, deadline)
    return gg


def _drop_and_refill(blocks: list[Block], gg: dict[str, int], used: float, budget: float, chunk: int,
                     nbytes: Callable[[Block, int], float], cost_of: Callable[[set], float],
                     layer_of: dict[str, int | None], deadline: Evals) -> tuple[bool, float]:
    """Empty one resident block (then, if that never helps, two) and refill the memory they free,
    greedily by time saved per byte or outright (a chunk or a whole block at a time); keep the result if
    the workload got faster. Escapes the local optima of single moves: one large block worth less than two
    smaller ones, or a layer whose experts are all resident (no CPU round trip at all)."""
    holders = [b for b in blocks if gg.get(b.name, 0) > 0]
    drops = [(b,) for b in holders] + list(itertools.combinations(holders, 2))
    for dropped in drops:
        for per_byte in (True, False):  # refill by time saved per byte, or by time saved outright
            if deadline.exhausted:
                return False, used
            saved = dict(gg)
            free = budget - used + sum(nbytes(d, gg[d.name]) for d in dropped)
            for d in dropped:
                gg[d.name] = 0
            while True:
                best: tuple[float, Block, int] | None = None
                for j in blocks:
                    room = j.rows - gg.get(j.name, 0)
                    if j in dropped or room <= 0:
                        continue
                    if deadline.exhausted:
                        gg.clear()
                        gg.update(saved)
                        return False, used
                    for step in {min(min(chunk, j.rows), room), room}:
                        if nbytes(j, step) > free + 1e-6:
                            continue
                        lay = {layer_of[j.name]}
                        t0 = cost_of(lay)
                        gg[j.name] = gg.get(j.name, 0) + step
                        gain = (t0 - cost_of(lay)) / (nbytes(j, step) if per_byte else 1.0)
                        gg[j.name] -= step
                        if gain > 0 and (best is None or gain > best[0]):
                            best = (gain, j, step)
                if best is None:
                    break
                _, j, step = best
                gg[j.name] = gg.get(j.name, 0) + step
                free -= nbytes(j, step)
            touched = {layer_of[b.name] for b in blocks if gg.get(b.name, 0) != saved.get(b.name, 0)}
            after = cost_of(touched)
            trial = dict(gg)
            gg.clear()
            gg.update(saved)
            if after < cost_of(touched) * (1 - 1e-9):
                gg.clear()
                gg.update(trial)
                return True, budget - free
            gg.clear()
            gg.update(saved)
    return False, used


__all__ = ["Evals", "repair"]
