"""Routing for planning and simulation: which experts each token picks, per layer and step.

A step's task graph needs, for every MoE layer, how many tokens each expert receives (an expert with
none does no work). This module produces those counts from two kinds of source:

- **synthetic** (:class:`SyntheticRouting`): each token picks ``top_k`` distinct experts per layer,
  uniformly, or Zipf-skewed (``p(rank r) ~ 1 / r**s``, with each layer's popularity order a seeded
  random permutation). Draws are seeded and vectorized (Gumbel top-k), so 640 tokens x 32 layers
  cost well under a millisecond.
- **traces** (:class:`RoutingTrace`): the expert choices a real run of the reference model made,
  recorded by :func:`record_trace` (prefill and every decode step) and stored as ``.npz`` under
  ``data/traces/``. A trace replays onto any workload by walking its token stream in order, wrapping
  around when the workload asks for more tokens than the trace holds (the wrap is said in ``meta``).

Both give :meth:`step_counts` ``[steps, n_layers, n_experts]`` (dense layers are all-zero rows).
It refuses traces whose layers, experts or top-k do not match the model (:class:`TraceError`).
What a real run of the reference chose, counted and summarized for people (entropy, usage bars), is
:mod:`offloadkit.model.expert_usage`; this module is the routing the planner and the simulator consume.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from offloadkit.errors import PlanError, TraceError
from offloadkit.model.spec import ModelSpec
from offloadkit.paths import data_dir


class Routing(Protocol):
    """Anything that yields per-step, per-layer, per-expert token counts."""

    def step_counts(self, spec: ModelSpec, step_tokens: Sequence[int]) -> np.ndarray: ...


def moe_layers(spec: ModelSpec) -> list[int]:
    return [layer for layer in range(spec.n_layers) if spec.is_moe_layer(layer)]


def counts_from_choices(choices: np.ndarray, n_experts: int) -> np.ndarray:
    """``choices`` [L, N, k] expert ids -> counts [L, E]: ``[[0,1],[1,2]]`` in one layer -> ``[1, 2, 1]``."""
    n_layers = choices.shape[0]
    flat = (choices.reshape(n_layers, -1) + np.arange(n_layers)[:, None] * n_experts).ravel()
    return np.bincount(flat, minlength=n_layers * n_experts).reshape(n_layers, n_experts)


def _per_step(spec: ModelSpec, choices: np.ndarray, step_tokens: Sequence[int]) -> np.ndarray:
    """Split ``choices`` [L_moe, sum(step_tokens), k] by step into counts [S, n_layers, E]."""
    layers = moe_layers(spec)
    out = np.zeros((len(step_tokens), spec.n_layers, spec.n_experts), dtype=np.int64)
    edges = np.concatenate(([0], np.cumsum(step_tokens)))
    for s in range(len(step_tokens)):
        out[s, layers] = counts_from_choices(choices[:, edges[s]:edges[s + 1]], spec.n_experts)
    return out


# ---- synthetic -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticRouting:
    """Seeded synthetic routing: ``zipf_s == 0`` is uniform, ``zipf_s > 0`` skews each layer's popularity."""

    zipf_s: float = 0.0
    seed: int = 0

    @property
    def label(self) -> str:
        return "uniform" if self.zipf_s == 0 else f"zipf:{self.zipf_s:g}"

    def probabilities(self, spec: ModelSpec) -> np.ndarray:
        """Pick probability of each expert, per MoE layer: [L_moe, E] (rows sum to 1)."""
        rng = np.random.default_rng([self.seed, 1])
        ranks = np.arange(1, spec.n_experts + 1, dtype=np.float64)
        p = ranks ** -self.zipf_s
        p /= p.sum()
        return np.stack([p[rng.permutation(spec.n_experts)] for _ in moe_layers(spec)]) if spec.is_moe \
            else np.zeros((0, 0))

    def choices(self, spec: ModelSpec, tokens: int) -> np.ndarray:
        """Expert ids [L_moe, tokens, top_k], distinct per token (Gumbel top-k sampling without replacement)."""
        if not spec.is_moe:
            return np.zeros((0, tokens, 0), dtype=np.int64)
        logp = np.log(self.probabilities(spec))[:, None, :]
        rng = np.random.default_rng([self.seed, 2])
        keys = logp + rng.gumbel(size=(logp.shape[0], tokens, spec.n_experts))
        return np.argsort(-keys, axis=-1)[..., :spec.top_k]

    def step_counts(self, spec: ModelSpec, step_tokens: Sequence[int]) -> np.ndarray:
        return _per_step(spec, self.choices(spec, int(sum(step_tokens))), step_tokens)


# ---- traces ----------------------------------------------------------------------------------------


@dataclass
class RoutingTrace:
    """Recorded expert choices: ``experts`` [L_moe, tokens, top_k] in token order, ``step_tokens`` per step.

    Tokens are in the order the steps ran: the prefill's (batch x prompt, row-major), then each decode
    step's ``batch`` tokens. ``layers`` names the MoE layers the first axis holds.
    """

    model: str
    n_experts: int
    top_k: int
    layers: tuple[int, ...]
    experts: np.ndarray
    step_tokens: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.experts.shape[1])

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        dtype = np.int8 if self.n_experts <= 127 else np.int16
        np.savez_compressed(p, experts=self.experts.astype(dtype), step_tokens=self.step_tokens.astype(np.int32),
                            layers=np.asarray(self.layers, dtype=np.int32),
                            header=np.asarray(json.dumps({"model": self.model, "n_experts": self.n_experts,
                                                          "top_k": self.top_k, "meta": self.meta})))
        return p

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        p = Path(path)
        if not p.exists() and not p.is_absolute() and (data_dir() / "traces" / p).exists():
            p = data_dir() / "traces" / p
        try:
            with np.load(p, allow_pickle=False) as z:
                head = json.loads(str(z["header"]))
                trace = cls(head["model"], int(head["n_experts"]), int(head["top_k"]),
                            tuple(int(x) for x in z["layers"]), z["experts"].astype(np.int64),
                            z["step_tokens"].astype(np.int64), dict(head.get("meta", {})))
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise TraceError(f"cannot read routing trace {p}: {e}; record one with record_trace()") from e
        if trace.experts.ndim != 3 or trace.experts.shape[0] != len(trace.layers) \
                or trace.experts.shape[2] != trace.top_k or int(trace.step_tokens.sum()) != trace.n_tokens:
            raise TraceError(f"routing trace {p} is inconsistent: experts {trace.experts.shape}, "
                             f"{len(trace.layers)} layers, top-{trace.top_k}, {int(trace.step_tokens.sum())} tokens")
        return trace

    def check(self, spec: ModelSpec) -> None:
        if (list(self.layers) != moe_layers(spec) or self.n_experts != spec.n_experts or self.top_k != spec.top_k):
            raise TraceError(f"the trace of {self.model} ({len(self.layers)} MoE layers, {self.n_experts} experts, "
                             f"top-{self.top_k}) does not match {spec.name or spec.arch} ({len(moe_layers(spec))} "
                             f"MoE layers, {spec.n_experts} experts, top-{spec.top_k})")

    def step_counts(self, spec: ModelSpec, step_tokens: Sequence[int]) -> np.ndarray:
        """Counts [S, n_layers, E] of the trace's token stream laid over ``step_tokens`` (wrapping)."""
        self.check(spec)
        idx = np.arange(int(sum(step_tokens))) % self.n_tokens
        return _per_step(spec, self.experts[:, idx], step_tokens)


def record_trace(model: Any, prompt_ids: Sequence[int] | np.ndarray, gen_tokens: int, *,
                 meta: dict[str, Any] | None = None) -> RoutingTrace:
    """Run ``model`` (a :class:`~offloadkit.model.reference.ReferenceModel`) greedily: prefill ``prompt_ids``
    (one sequence) and ``gen_tokens`` decode steps, recording the experts every token picked in every layer."""
    import torch

    spec = model.spec
    if not spec.is_moe:
        raise TraceError(f"{spec.name or spec.arch} has no experts: there is no routing to record")
    ids = torch.as_tensor(np.asarray(prompt_ids), dtype=torch.long).reshape(1, -1)
    steps: list[dict[int, torch.Tensor]] = []
    cache = model.new_cache(1, ids.shape[1] + gen_tokens)
    with torch.no_grad():
        for i in range(gen_tokens + 1):
            routing: dict[int, torch.Tensor] = {}
            logits = model.forward(ids, cache, routing=routing)
            steps.append(routing)
            if i < gen_tokens:
                ids = logits[:, -1].argmax(-1, keepdim=True)
    layers = moe_layers(spec)
    experts = np.stack([np.concatenate([s[layer].numpy() for s in steps]) for layer in layers])
    step_tokens = np.array([s[layers[0]].shape[0] for s in steps], dtype=np.int64)
    return RoutingTrace(spec.name or spec.arch, spec.n_experts, spec.top_k, tuple(layers), experts, step_tokens,
                        dict(meta or {}))


ROUTING_FORMS = ("uniform", "zipf:S", "trace:PATH")


def parse_routing(text: str | None, seed: int = 0) -> Routing:
    """``"uniform"`` | ``"zipf:1.2"`` | ``"trace:PATH"`` -> a routing source (``None``: uniform).

    Only these exact forms are accepted: ``"zipf"`` without its exponent, ``"Uniform"`` or ``"zipf=1.2"``
    are refused, naming the forms, rather than read as something the user may not have meant.
    """
    if text is None or text == "uniform":
        return SyntheticRouting(0.0, seed)
    forms = f"the routings are {', '.join(ROUTING_FORMS)} (e.g. zipf:1.2, trace:demo-mixtral-pydoc.npz)"
    kind, colon, arg = text.partition(":")
    if kind == "zipf" and colon:
        try:
            s = float(arg)
        except ValueError:
            s = math.nan
        if not (math.isfinite(s) and s >= 0):
            raise PlanError(f"zipf routing takes a finite exponent S >= 0, e.g. zipf:1.2, not {text!r}")
        return SyntheticRouting(s, seed)
    if kind == "trace" and colon:
        if not arg:
            raise PlanError(f"routing {text!r} names no file: give trace:PATH (a .npz from record_trace)")
        return RoutingTrace.load(arg)
    if kind == "zipf":
        raise PlanError(f"routing {text!r} needs its exponent: zipf:S with S >= 0, e.g. zipf:1.2")
    raise PlanError(f"unknown routing {text!r}: {forms}")


__all__ = ["ROUTING_FORMS", "Routing", "RoutingTrace", "SyntheticRouting", "counts_from_choices", "moe_layers",
           "parse_routing", "record_trace"]
