"""Policies: ScheInfer and the systems it is measured against, as plans of one engine.

A policy turns (model, profile, workload, routing) into a :class:`~offloadkit.plan.plans.Plan`; the
plan's ``assign`` field is its per-step assignment rule (carried out by
:class:`~offloadkit.plan.assign.TokenAssigner`). Running every policy on the same task graph, cost model
and kernels is the fair comparison (docs/DESIGN.md section 8). Each baseline follows the public code
and documentation of its project; the code here is offloadkit's own:

- ``scheinfer``: the adaptive partition (:func:`~offloadkit.plan.partition.partition`) with ScheInfer's
  token assignment (``balance``). Its plan space contains every baseline's placement, so it is also
  searched from theirs: the baselines' GG sets, run with ``balance``, are candidates, and the one the
  simulator finds fastest is kept (a warm start, not a different rule).
- ``llamacpp``: llama.cpp's defaults (``llama-bench``: ``-ngl`` layers, ``n_ubatch = 512``, mmap): the
  largest ``-ngl`` that fits; CPU layers keep their attention and KV cache on the host; at ops of
  ``>= 32`` tokens their weights are copied to the GPU (``GGML_OP_OFFLOAD_MIN_BATCH`` in ggml-cuda; for
  ``MUL_MAT_ID`` only the experts the step uses, as ggml-backend.cpp's scheduler copies them); one
  split after another, so no two lanes overlap; host weights are memory-mapped, hence pageable copies.
- ``fiddler`` (``src/fiddler/mixtral.py`` of efeslab/fiddler, MoE models only): attention, norms,
  routers and lm_head on the GPU; whole experts resident in order of popularity until memory is full;
  each other expert, per layer and step, runs on the CPU if ``tokens x latency_cpu`` is below the
  latency of copying it, else is copied into one placeholder buffer and run on the GPU.
- ``ktransformers`` (KTransformers' usual MoE placement, its optimize rules for Mixtral and Qwen-MoE):
  attention, norms, routers, shared experts, dense layers and lm_head on the GPU; routed experts
  always on the CPU.
- ``cpu-only`` and ``gpu-only`` (only where the model fits).

A policy that cannot run a model on a profile (``gpu-only`` of a model larger than the GPU, ``fiddler``
of a dense model) raises :class:`~offloadkit.errors.PlanError` saying why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from offloadkit.errors import PlanError
from offloadkit.model.spec import ModelSpec
from offloadkit.plan.estimate import WorkloadCounts
from offloadkit.plan.host_memory import check_host_fits
from offloadkit.plan.partition import partition, with_gg
from offloadkit.plan.plans import (
    Plan,
    Workload,
    all_cpu,
    all_gpu,
    check_fits,
    llamacpp_plan,
    plan_blocks,
    splittable,
    units,
)
from offloadkit.plan.routing import Routing, parse_routing

POLICIES = ("scheinfer", "llamacpp", "fiddler", "ktransformers", "cpu-only", "gpu-only")
BASELINES = ("llamacpp", "fiddler", "ktransformers")


def _routing(routing: Routing | str | None, seed: int = 0) -> Routing:
    return parse_routing(routing, seed) if routing is None or isinstance(routing, str) else routing


def _fits(plan: Plan, spec: ModelSpec, profile: object, workload: Workload) -> bool:
    try:
        check_fits(plan, spec, profile, workload)
    except PlanError:
        return False
    return True


def llamacpp(spec: ModelSpec, profile: object, workload: Workload, routing: Routing | str | None = None) -> Plan:
    """llama.cpp's default run with the largest ``-ngl`` that fits (see the module docstring)."""
    best = llamacpp_plan(spec, 0)
    for n in range(1, spec.n_layers + 2):
        plan = llamacpp_plan(spec, n)
        if not _fits(plan, spec, profile, workload):
            break
        best = plan
    check_fits(best, spec, profile, workload)
    return replace(best, label=f"llamacpp ({best.label})")


def _resident_non_experts(spec: ModelSpec, shared: bool = True) -> dict[str, int]:
    return {b.name: units(b) for b in plan_blocks(spec)
            if b.kind not in ("embed", "expert") and (shared or b.kind != "shared_expert")}


def fiddler(spec: ModelSpec, profile: object, workload: Workload, routing: Routing | str | None = None,
            seed: int = 0) -> Plan:
    """Fiddler: popular experts resident, the others on the CPU or copied by its latency rule."""
    if not spec.is_moe:
        raise PlanError(f"fiddler runs Mixture-of-Experts models only (its code is Mixtral's); "
                        f"{spec.name or spec.arch} is dense")
    base = Plan("fiddler", _resident_non_experts(spec), (True,) * spec.n_layers, label="fiddler", assign="fiddler",
                staging_buffers=1)
    check_fits(base, spec, profile, workload)
    counts = WorkloadCounts.of(spec, workload, _routing(routing, seed), [workload.prompt_tokens])
    popularity = np.concatenate([counts.prefill, counts.decode]).sum(axis=0)  # [L, E]
    order = sorted(((layer, e) for layer in range(spec.n_layers) if spec.is_moe_layer(layer)
                    for e in range(spec.n_experts)), key=lambda le: (-popularity[le], le))
    gg = dict(base.gg_rows)
    rows = spec.expert_intermediate_size
    left = check_fits(base, spec, profile, workload)  # bytes free with no expert resident
    expert_bytes = {b.name: spec.bytes_of(b.params) for b in plan_blocks(spec) if b.kind == "expert"}
    for layer, e in order:
        name = f"L{layer}.expert{e}"
        if expert_bytes[name] > left:
            break
        gg[name] = rows
        left -= expert_bytes[name]
    plan = replace(base, gg_rows=gg)
    check_fits(plan, spec, profile, workload)
    return plan


def ktransformers(spec: ModelSpec, profile: object, workload: Workload,
                  routing: Routing | str | None = None) -> Plan:
    """KTransformers' MoE placement: everything but the routed experts on the GPU, those on the CPU."""
    plan = Plan("ktransformers", _resident_non_experts(spec), (True,) * spec.n_layers, label="ktransformers",
                assign="cpu")
    check_fits(plan, spec, profile, workload)
    return plan


def cpu_only(spec: ModelSpec, profile: object, workload: Workload, routing: Routing | str | None = None) -> Plan:
    return all_cpu(spec)


def gpu_only(spec: ModelSpec, profile: object, workload: Workload, routing: Routing | str | None = None) -> Plan:
    plan = all_gpu(spec)
    check_fits(plan, spec, profile, workload)
    return plan


def scheinfer(spec: ModelSpec, profile: object, workload: Workload, routing: Routing | str | None = None,
              seed: int = 0, **options: object) -> Plan:
    """The adaptive partition, searched from the baselines' placements too (see the module docstring)."""
    from offloadkit.runtime.sim import simulate

    routing = _routing(routing, seed)
    plan = partition(spec, profile, workload, routing, **options)  # type: ignore[arg-type]
    candidates = [plan]
    sizes = {b.name for b in splittable(spec)}
    for name in BASELINES:
        try:
            other = BUILDERS[name](spec, profile, workload, routing)
        except PlanError:
            continue
        gg = {**plan.gg_rows, **{k: v for k, v in other.gg_rows.items() if k in sizes}}
        gg = {k: v for k, v in gg.items() if k not in sizes or k in other.gg_rows}
        seeded = replace(with_gg(plan, spec, gg), meta={**plan.meta, "seeded_from": name})
        for buffers in (plan.staging_buffers, 1):  # a baseline that filled memory leaves room for one buffer
            if _fits(replace(seeded, staging_buffers=buffers), spec, profile, workload):
                candidates.append(replace(seeded, staging_buffers=buffers))
                break
    whole = replace(all_gpu(spec), policy="scheinfer", label="scheinfer", assign="balance", meta=plan.meta)
    if _fits(whole, spec, profile, workload):  # the whole model fits: nothing to partition
        return whole
    if len(candidates) == 1:
        return plan
    results = [simulate(spec, profile, c, workload, routing, record=False) for c in candidates]
    best = min(range(len(candidates)), key=lambda i: results[i].total_s)
    return candidates[best]


BUILDERS: dict[str, Callable[..., Plan]] = {
    "scheinfer": scheinfer, "llamacpp": llamacpp, "fiddler": fiddler, "ktransformers": ktransformers,
    "cpu-only": cpu_only, "gpu-only": gpu_only,
}


def make_plan(policy: str, spec: ModelSpec, profile: object, workload: Workload,
              routing: Routing | str | None = None) -> Plan:
    """The plan of ``policy`` (one of :data:`POLICIES`); unknown names are refused, naming the policies."""
    if policy not in BUILDERS:
        raise PlanError(f"unknown policy {policy!r}: the policies are {', '.join(POLICIES)}")
    plan = BUILDERS[policy](spec, profile, workload, routing)
    check_host_fits(plan, spec, profile, workload)  # the host must hold what the GPU does not
    return plan


__all__ = ["BASELINES", "BUILDERS", "POLICIES", "cpu_only", "fiddler", "gpu_only", "ktransformers", "llamacpp",
           "make_plan", "scheinfer"]
