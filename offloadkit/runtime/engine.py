"""The hybrid engine: a checkpoint, a plan and a device -> tokens, with a measured timeline of every step.

:class:`HybridEngine` is what ``offloadkit generate --device loopback|cuda`` runs: it has the
``new_cache`` / ``forward`` pair that :mod:`offloadkit.model.generate` drives (greedy or sampled
text, stopping at the model's context), runs each step through the
:class:`~offloadkit.runtime.executor.HybridExecutor` (a prompt in the plan's ``ubatch`` chunks, then one
step per token), and appends each step's measured tasks to :attr:`HybridEngine.timeline`, labelled
**measured** with the CPU and the device (the loopback device's lanes are CPU threads, and say so).

Before anything is allocated it refuses (:class:`~offloadkit.errors.PlanError`): a plan naming blocks the
model does not have, or more rows than a block has; a plan whose GPU share (weights, KV cache,
activations, staging) exceeds the device's memory, with the breakdown and by how much. A forward past
the cache's positions is refused too, saying where the context ends.

:func:`open_hybrid` opens a model folder, makes a policy's plan (or takes one) for a profile, and opens the
device; :func:`measure_generation` times a prompt and a greedy continuation (pp and tg tokens/s).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from offloadkit.errors import OffloadkitError, PlanError
from offloadkit.hardware.machine import machine_label
from offloadkit.model.spec import ModelSpec
from offloadkit.plan.costmodel import CostModel, engine_options
from offloadkit.plan.plans import Plan, Workload, gpu_bytes_breakdown, plan_blocks, units
from offloadkit.runtime.device_open import open_device
from offloadkit.runtime.devices import DEFAULT_WAIT_S, Device
from offloadkit.runtime.executor import HybridExecutor
from offloadkit.runtime.timeline import Timeline


def check_plan_blocks(plan: Plan, spec: ModelSpec) -> None:
    """Refuse a plan that places blocks ``spec`` lacks, more rows than a block has, or another layer count."""
    blocks = {b.name: b for b in plan_blocks(spec)}
    unknown = sorted(set(plan.gg_rows) - set(blocks))
    if unknown:
        raise PlanError(f"plan {plan.name} places block(s) {', '.join(unknown[:5])}"
                        + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                        + f" that {spec.name or spec.arch} does not have (its blocks are like "
                        f"{', '.join(list(blocks)[:4])}...): is it a plan of another model?")
    for name, rows in plan.gg_rows.items():
        if not 0 <= rows <= units(blocks[name]):
            raise PlanError(f"plan {plan.name} keeps {rows} rows of {name} on the GPU; the block has "
                            f"{units(blocks[name])}")
    if len(plan.kv_on_gpu) != spec.n_layers:
        raise PlanError(f"plan {plan.name} places the KV cache of {len(plan.kv_on_gpu)} layers; "
                        f"{spec.name or spec.arch} has {spec.n_layers}")


def check_device_memory(plan: Plan, spec: ModelSpec, workload: Workload, device: Device) -> None:
    """Refuse, before any allocation, a plan whose GPU share does not fit the device's memory now."""
    if not plan.uses_gpu:
        return
    parts = gpu_bytes_breakdown(plan, spec, workload)
    need, have = sum(parts.values()), device.memory_bytes()
    if need > have:
        detail = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in parts.items() if v)
        raise PlanError(f"plan {plan.name} needs {need / 2**20:.1f} MiB of device memory for {workload.label} "
                        f"({detail}) but {device.label} has {have / 2**20:.1f} MiB free; over by "
                        f"{(need - have) / 2**20:.1f} MiB. Plan for this device's memory (a profile with its "
                        f"usable memory), shorten the workload, or keep fewer rows resident.")


class HybridCache:
    """The KV cache of one generation: per layer, on the side its attention runs, ``max_len`` positions."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], batch: int, max_len: int) -> None:
        self.kv, self.batch, self.max_len = kv, batch, max_len
        self.length = 0
        self.decode_steps = 0


class HybridEngine:
    """A model run by the hybrid executor under one plan on one device; see the module docstring.

    The engine owns ``device``: closing the engine (or an error, or an interrupt) closes it.
    """

    engine_name = "hybrid"
    logits_modes = ("last",)

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], plan: Plan, profile: Any,
                 device: Device, *, workload: Workload | None = None, wait_s: float = DEFAULT_WAIT_S,
                 check: bool = False, pinned_budget_bytes: int | None = None) -> None:
        self.spec, self.plan, self.profile, self.device = spec, plan, profile, device
        self.workload = workload or Workload()
        try:
            check_plan_blocks(plan, spec)
            check_device_memory(plan, spec, self.workload, device)
            cost = CostModel(profile, spec, pinned=plan.pinned, **engine_options(plan))
            if plan.uses_gpu and not cost.has_gpu:
                raise PlanError(f"plan {plan.name} uses a GPU but profile {profile.name!r} has none; give a "
                                f"profile with a GPU (its figures size the per-step split)")
            self.executor = HybridExecutor(spec, weights, plan, cost, device, wait_s=wait_s, check=check,
                                           pinned_budget_bytes=pinned_budget_bytes)
        except BaseException:
            device.close()
            raise
        where = "GPU" if device.is_gpu else "CPU threads standing in for a GPU, not GPU figures"
        self.machine = f"{machine_label()} + {device.label}"
        self.timeline = Timeline("measured", self.machine, [], {
            "model": spec.name or spec.arch, "plan": plan.name, "policy": plan.policy, "device": device.kind,
            "workload": self.workload.label,
            "device_label": device.label, "lanes": f"gpu/h2d/d2h lanes: {where}",
            "profile": getattr(profile, "name", "")})
        self.origin: float | None = None
        self.last_steps: list = []

    # ---- the engine protocol of offloadkit.model.generate ----------------------------------------------------

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> HybridCache:
        n = max_len or self.workload.max_len
        return HybridCache(self.executor.new_kv(batch, n), batch, n)

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None, *, logits: str = "last"
                ) -> torch.Tensor:
        """Logits [B, 1, V] of the last position after ``input_ids`` [B, T]; a prompt runs in the plan's chunks."""
        if logits != "last":
            raise OffloadkitError(f"the hybrid engine computes the last position's logits only, not {logits!r}")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise OffloadkitError(f"input_ids must be [batch, tokens] with tokens >= 1, got {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        cache = cache if cache is not None else self.new_cache(b, t)
        if cache.batch != b:
            raise OffloadkitError(f"the cache holds a batch of {cache.batch}, the input has {b}")
        if cache.length + t > cache.max_len:
            raise OffloadkitError(f"the cache holds {cache.max_len} positions and {cache.length} are used; "
                                  f"{t} more do not fit: generation stops here (the context ends)")
        if self.origin is None:
            self.origin = time.perf_counter()
        prefill = cache.length == 0
        chunks = self.plan.prefill_chunks(t) if prefill else [t]
        step = 0 if prefill else cache.decode_steps + 1
        run, a = None, 0
        self.last_steps = []
        for c in chunks:
            run = self.executor.run_step(input_ids[:, a:a + c], cache.length, cache.kv, step)
            self.timeline.records.extend(run.records(self.origin, step))
            self.last_steps.append(run)
            cache.length += c
            a += c
        if not prefill:
            cache.decode_steps += 1
        assert run is not None
        lg = run.logits
        if lg.shape[0] != b:  # a plan that computes every position's logits (meta["logits"] == "all")
            lg = lg.view(b, -1, lg.shape[-1])[:, -1]
        return lg.view(b, 1, -1)

    def close(self) -> None:
        self.executor.close()

    def __enter__(self) -> HybridEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_hybrid(model_dir: str | Path, *, device: Device | str = "loopback", plan: Plan | str | None = None,
                policy: str | None = "scheinfer", profile: Any = None, workload: Workload | None = None,
                routing: Any = None, **kwargs: Any) -> HybridEngine:
    """Open ``model_dir`` (a folder or ``"demo"``) under a plan (``plan``, or ``policy``'s plan for ``profile``)
    on ``device`` (``"loopback"``, ``"cuda"`` or a :class:`Device`). ``kwargs`` go to :class:`HybridEngine`."""
    from offloadkit.hardware.catalog import load_profile
    from offloadkit.model.checkpoint import open_checkpoint
    from offloadkit.model.zoo import resolve_model
    from offloadkit.plan.plan_io import resolve_plan
    from offloadkit.plan.policies import make_plan

    ckpt = open_checkpoint(resolve_model(model_dir))
    spec = ckpt.spec
    workload = workload or Workload(prompt_tokens=64, gen_tokens=64)
    if isinstance(profile, str):
        profile = load_profile(profile)
    if isinstance(plan, str):
        plan = resolve_plan(plan, spec)
    if plan is None:
        if profile is None:
            raise PlanError(f"the {policy} policy plans for a machine: give a profile (a catalog name, a TOML "
                            f"written by offloadkit profile) or a plan")
        plan = make_plan(policy or "scheinfer", spec, profile, workload, routing)
    if profile is None:
        raise PlanError(f"plan {plan.name} needs a profile: its figures size each step's CPU/GPU split")
    dev = open_device(device) if isinstance(device, str) else device
    return HybridEngine(spec, ckpt, plan, profile, dev, workload=workload, **kwargs)


@dataclass
class GenerationRun:
    """A timed greedy generation: the tokens, the prompt's and the continuation's times (**measured**)."""

    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    timeline: Timeline

    @property
    def pp_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def tg_tps(self) -> float:
        return max(len(self.tokens) - 1, 0) / self.decode_s if self.decode_s > 0 else float("nan")


def measure_generation(engine: HybridEngine, prompt_ids: torch.Tensor, n_new: int) -> GenerationRun:
    """Greedy ``n_new`` tokens after ``prompt_ids`` [1, P]: the prompt's time (pp) and the time of the
    ``n_new - 1`` one-token steps after the first token (tg), wall clock, on a fresh cache."""
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] != 1:
        raise OffloadkitError(f"prompt_ids must be [1, P], got {tuple(prompt_ids.shape)}")
    p = prompt_ids.shape[1]
    cache = engine.new_cache(1, p + n_new)
    start = len(engine.timeline.records)
    t0 = time.perf_counter()
    logits = engine.forward(prompt_ids, cache)
    t1 = time.perf_counter()
    tokens = [int(logits[0, -1].argmax())]
    for _ in range(n_new - 1):
        logits = engine.forward(torch.tensor([[tokens[-1]]]), cache)
        tokens.append(int(logits[0, -1].argmax()))
    t2 = time.perf_counter()
    tl = Timeline("measured", engine.timeline.machine, engine.timeline.records[start:], dict(engine.timeline.meta))
    return GenerationRun(tokens, p, t1 - t0, t2 - t1, tl)


__all__ = ["GenerationRun", "HybridCache", "HybridEngine", "check_device_memory", "check_plan_blocks",
           "measure_generation", "open_hybrid"]
