"""Host memory: whether the machine's RAM holds what a plan leaves off the GPU.

A plan is usually checked against the GPU's memory only (:func:`~offloadkit.plan.plans.check_fits`); but
offloading exists because the model does not fit the GPU, and the rest of it must fit the host. Here the
host holds every weight byte that is not GG-resident (the CC and CG rows of every block, the embedding
table) and the KV cache of the layers whose attention runs on the CPU. A tied embedding/lm_head table is
counted once. This is offloadkit's simple model: llama.cpp memory-maps the whole file, so its page cache
may hold the resident layers too, and the operating system and the program's own buffers are not counted;
the check errs towards accepting a plan, never towards refusing one that fits.

:func:`check_host_fits` refuses, with :class:`~offloadkit.errors.PlanError`, a plan whose host share is
larger than the profile's ``cpu.memory_gib``, saying by how much; a profile that does not give its host
memory (``memory_gib`` unknown) is not checked.
"""

from __future__ import annotations

from typing import Any

from offloadkit.errors import PlanError
from offloadkit.model.spec import ModelSpec
from offloadkit.plan.plans import Plan, Workload, plan_blocks, units


def host_bytes_breakdown(plan: Plan, spec: ModelSpec, workload: Workload | None = None) -> dict[str, int]:
    """Bytes the plan keeps in host memory: ``weights`` (not GG-resident) and ``kv_cache`` (of CPU layers;
    0 without a workload)."""
    host_share: dict[str, tuple[int, float]] = {}  # tensor name -> (bytes, largest fraction on the host)
    for b in plan_blocks(spec):
        u = units(b)
        off = (u - min(max(plan.gg_rows.get(b.name, 0), 0), u)) / u
        for t in b.tensors:  # a tied embedding is a tensor of two blocks: held once, if either needs it
            nbytes = spec.bytes_of(t.numel)
            host_share[t.name] = (nbytes, max(off, host_share.get(t.name, (0, 0.0))[1]))
    weights = sum(round(nbytes * off) for nbytes, off in host_share.values())
    kv = 0
    if workload is not None and spec.n_layers:
        cpu_layers = spec.n_layers - sum(plan.kv_on_gpu)
        kv = cpu_layers * workload.max_len * workload.batch * spec.kv_bytes_per_token() // spec.n_layers
    return {"weights": weights, "kv_cache": kv}


def host_bytes(plan: Plan, spec: ModelSpec, workload: Workload | None = None) -> int:
    """Host weights + the KV cache of CPU layers, in bytes."""
    return sum(host_bytes_breakdown(plan, spec, workload).values())


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_host_fits(plan: Plan, spec: ModelSpec, profile: Any, workload: Workload | None = None) -> int | None:
    """Raise :class:`PlanError` if the plan's host share exceeds ``profile.cpu.memory_gib``; return the bytes
    left, or None where the profile does not give its host memory (nothing is checked then)."""
    have = profile.cpu.memory_bytes
    if have is None:
        return None
    parts = host_bytes_breakdown(plan, spec, workload)
    need = sum(parts.values())
    if need > have:
        detail = ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in parts.items() if v)
        raise PlanError(f"plan {plan.name} does not fit the host memory of {profile.name}: it keeps {_gib(need)} "
                        f"off the GPU ({detail}) but the host has {_gib(have)} (cpu.memory_gib); over by "
                        f"{need - have:,} bytes ({_gib(need - have)}). Use a machine with more memory or a "
                        f"smaller model (the host holds every weight that is not resident on the GPU)")
    return have - need


__all__ = ["check_host_fits", "host_bytes", "host_bytes_breakdown"]
