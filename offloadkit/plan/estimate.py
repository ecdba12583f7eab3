"""What a workload asks of each layer, and the planner's estimate of its time under a plan.

:class:`WorkloadCounts` holds the tokens each expert receives at every step of a workload (the
prefill's chunks, then each decode step), from a routing source; :func:`layer_patterns` folds them
into the distinct (tokens, counts) a layer sees, with how often. :func:`expected_time` prices a plan
on them with the token assigner's own barrier-by-barrier loads: the objective the partition's repair
moves lower, and the yardstick the optimality tests hold the partition to.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from offloadkit.model.spec import ModelSpec
from offloadkit.plan.assign import TokenAssigner
from offloadkit.plan.costmodel import CostModel
from offloadkit.plan.plans import Plan, Workload
from offloadkit.plan.routing import Routing


@dataclass
class WorkloadCounts:
    """The tokens per expert of every step of a workload: ``prefill`` [chunks, L, E], ``decode`` [G, L, E]."""

    chunks: list[int]
    batch: int
    prefill: np.ndarray
    decode: np.ndarray

    @classmethod
    def of(cls, spec: ModelSpec, workload: Workload, routing: Routing, chunks: Sequence[int]) -> WorkloadCounts:
        b = workload.batch
        steps = [c * b for c in chunks] + [b] * workload.gen_tokens
        counts = (routing.step_counts(spec, steps) if spec.is_moe
                  else np.zeros((len(steps), spec.n_layers, 0), dtype=np.int64))
        return cls(list(chunks), b, counts[:len(chunks)], counts[len(chunks):])

    def expert_share(self) -> list[list[float]]:
        """Per layer, the expected tokens of each expert per token of a step (a row sums to top_k)."""
        total = np.concatenate([self.prefill, self.decode]).sum(axis=0).astype(np.float64)
        tokens = self.batch * (sum(self.chunks) + len(self.decode))
        return (total / max(tokens, 1)).round(6).tolist()

    def steps(self) -> list[tuple[int, np.ndarray, int]]:
        """Distinct (tokens, counts [L, E], multiplicity) of the workload's steps."""
        seen: dict[tuple, list] = {}
        for n, c in [(c * self.batch, self.prefill[i]) for i, c in enumerate(self.chunks)] + \
                [(self.batch, d) for d in self.decode]:
            key = (n, c.tobytes())
            if key in seen:
                seen[key][2] += 1
            else:
                seen[key] = [n, c, 1]
        return [tuple(v) for v in seen.values()]  # type: ignore[misc]


def layer_patterns(counts: WorkloadCounts, layer: int) -> list[tuple[int, tuple[int, ...], int]]:
    """Distinct (tokens, expert counts of ``layer``, multiplicity) over the workload's steps."""
    seen: dict[tuple[int, tuple[int, ...]], int] = {}
    for n, c, m in counts.steps():
        key = (n, tuple(int(x) for x in c[layer]) if c.shape[1] else ())
        seen[key] = seen.get(key, 0) + m
    return [(n, c, m) for (n, c), m in seen.items()]


def expected_time(spec: ModelSpec, plan: Plan, cost: CostModel, counts: WorkloadCounts,
                  layers: Iterable[int | None] | None = None) -> float:
    """The planner's estimate of the workload's weight time: per step and layer, the busiest lane of the
    token assignment's split (:meth:`TokenAssigner.layer_time`), summed; plus the lm_head per step.
    ``layers`` limits it to some layers (``None`` in it stands for the lm_head); default: all and the head."""
    a = TokenAssigner(spec, plan, cost)
    total = 0.0
    for layer in ([*range(spec.n_layers), None] if layers is None else layers):
        if layer is None:
            total += (len(counts.chunks) + len(counts.decode)) * max(a.head_loads(counts.batch))
            continue
        for n, c, m in layer_patterns(counts, layer):
            total += m * a.layer_time(layer, n, c)
    return total


__all__ = ["WorkloadCounts", "expected_time", "layer_patterns"]
