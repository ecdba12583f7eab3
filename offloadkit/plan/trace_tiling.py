"""A recorded routing trace replayed onto a larger model by tiling its layers.

The only measured routing offloadkit ships (``data/traces/demo-mixtral-pydoc.npz``) comes from the small
demo model: 4 MoE layers, 8 experts, top-2. A :class:`~offloadkit.plan.routing.RoutingTrace` refuses a
model whose layers differ, so on its own it cannot drive Mixtral-8x7B's 32 layers. :class:`TiledTrace`
bridges that gap, keeping what is real about the trace (how skewed each layer's choices are, how they
change from token to token, which experts are picked together) and saying plainly what is made up:

- model MoE layer ``j`` (counted among the MoE layers) replays trace layer ``j mod L_trace``;
- so that the tiles are not identical copies (a planner would otherwise see the same hot experts in
  every fourth layer), every model layer relabels the expert ids through its own fixed permutation,
  drawn from ``np.random.default_rng([seed, j])``: a layer's permutation does not depend on how many
  layers the model has. The per-layer popularity histogram is the trace layer's, permuted.

The token stream is then walked exactly as :meth:`RoutingTrace.step_counts` walks it (wrapping when the
workload asks for more tokens than the trace holds): the tiled choices are a ``RoutingTrace`` of the
model's own layers, so the counting, the wrap and the shape checks are that class's, not copies of them.
A model whose number of experts or top-k differs from the trace's is refused (:class:`TraceError`): a
permutation cannot invent experts the trace never had, nor drop choices it made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from offloadkit.errors import TraceError
from offloadkit.model.spec import ModelSpec
from offloadkit.plan.routing import RoutingTrace, moe_layers


def layer_permutation(n_experts: int, layer: int, seed: int = 0) -> np.ndarray:
    """The expert relabelling of model MoE layer ``layer``: trace expert ``e`` becomes ``perm[e]``."""
    return np.random.default_rng([seed, layer]).permutation(n_experts)


@dataclass(eq=False)
class TiledTrace:
    """``trace`` tiled onto ``spec``'s MoE layers (see the module docstring); a ``Routing``.

    Build it for one model (``TiledTrace(trace, spec)`` or :meth:`load`); :meth:`step_counts` refuses
    any other model with a different layer count, expert count or top-k.
    """

    trace: RoutingTrace = field(repr=False)
    spec: ModelSpec = field(repr=False)
    seed: int = 0
    name: str = ""  # the trace's name in the label (the file's stem when loaded), else the trace's model
    tiled: RoutingTrace = field(init=False, repr=False)

    def __post_init__(self) -> None:
        spec, trace = self.spec, self.trace
        model = spec.name or spec.arch
        if not spec.is_moe:
            raise TraceError(f"{model} has no experts: a routing trace cannot be tiled onto it")
        if spec.n_experts != trace.n_experts or spec.top_k != trace.top_k:
            raise TraceError(f"cannot tile the trace of {trace.model} ({trace.n_experts} experts, top-{trace.top_k}) "
                             f"onto {model} ({spec.n_experts} experts, top-{spec.top_k}): tiling replays the "
                             f"trace's layers, so the number of experts and top-k must be the trace's")
        layers = moe_layers(spec)
        source = np.arange(len(layers)) % len(trace.layers)
        perms = np.stack([layer_permutation(spec.n_experts, j, self.seed) for j in range(len(layers))])
        experts = perms[np.arange(len(layers))[:, None, None], trace.experts[source]]  # [L_moe, tokens, top_k]
        self.tiled = RoutingTrace(f"{trace.model} tiled onto {model}", trace.n_experts, trace.top_k, tuple(layers),
                                  experts, trace.step_tokens.copy(),
                                  {**trace.meta, "tiled_from_layers": list(trace.layers), "tiling_seed": self.seed})

    @classmethod
    def load(cls, path: str | Path, spec: ModelSpec, seed: int = 0) -> TiledTrace:
        """The trace at ``path`` (as :meth:`RoutingTrace.load` finds it) tiled onto ``spec``."""
        stem = Path(path).name.removesuffix(".npz")
        return cls(RoutingTrace.load(path), spec, seed, stem)

    @property
    def label(self) -> str:
        """``"trace:demo-mixtral-pydoc tiled 4→32 layers"``."""
        return f"trace:{self.name or self.trace.model} tiled {len(self.trace.layers)}→{len(self.tiled.layers)} layers"

    def source_layer(self, j: int) -> int:
        """The trace layer (index along the trace's first axis) that model MoE layer ``j`` replays."""
        return j % len(self.trace.layers)

    def permutation(self, j: int) -> np.ndarray:
        """The expert relabelling of model MoE layer ``j``."""
        return layer_permutation(self.trace.n_experts, j, self.seed)

    def choices(self) -> np.ndarray:
        """The tiled expert ids [L_moe of the model, trace tokens, top_k]."""
        return self.tiled.experts

    def step_counts(self, spec: ModelSpec, step_tokens: Sequence[int]) -> np.ndarray:
        """Counts [S, n_layers, E] of the tiled token stream over ``step_tokens`` (wrapping, as a trace does)."""
        return self.tiled.step_counts(spec, step_tokens)


__all__ = ["TiledTrace", "layer_permutation"]
