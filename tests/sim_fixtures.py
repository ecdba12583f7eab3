"""Shared fixtures of the cost-model / simulator tests: a fixed desktop profile and tiny models.

The profile is built from offloadkit's own profile dataclasses with round numbers (not a catalog
file), so the tests' arithmetic does not move when the catalog is re-measured.
"""

from __future__ import annotations

from offloadkit.hardware.profile import CpuProfile, Curve, GpuProfile, HardwareProfile, LinkProfile
from offloadkit.model.spec import ModelSpec
from offloadkit.model.writer import make_config, random_weights

CPU = CpuProfile("test cpu", cores=16, dram_bandwidth_gbps=60.0, flops_f32_tflops=1.5, flops_bf16_tflops=1.0,
                 call_overhead_us=5.0)
GPU = GpuProfile("test gpu", memory_gib=24.0, usable_memory_gib=22.5, memory_bandwidth_gbps=900.0,
                 flops_f32_tflops=80.0, flops_bf16_tflops=160.0, flops_f16_tflops=160.0, launch_overhead_us=5.0)
LINK = LinkProfile("test link", h2d_pinned_gbps=25.0, h2d_pageable_gbps=8.0, d2h_pinned_gbps=24.0,
                   d2h_pageable_gbps=7.0, latency_us=10.0)


def desktop(curves: dict[str, Curve] | None = None, name: str = "test-4090") -> HardwareProfile:
    return HardwareProfile(name, "a 4090-like desktop, round numbers", CPU, GPU, LINK, curves or {})


def cpu_only() -> HardwareProfile:
    return HardwareProfile("test-cpu-only", "no GPU", CPU)


def tiny(arch: str = "mixtral", layers: int = 2, seed: int = 1, **kw) -> tuple[ModelSpec, dict]:
    spec = ModelSpec.from_config(make_config(arch, layers=layers, dtype="float32", **kw), name=f"tiny-{arch}")
    return spec, random_weights(spec, seed=seed)


def cpu_engine_timeline():
    """A measured timeline of the CPU engine on a tiny Mixtral: a 12-token prefill (step 0) and one decode step."""
    import torch

    from offloadkit.runtime.cpu_engine import CpuEngine

    spec = ModelSpec.from_config(make_config("mixtral", layers=1, hidden=64, intermediate=128, experts=4, vocab=256,
                                             dtype="float32"), "tiny-mixtral")
    engine = CpuEngine(spec, random_weights(spec, seed=0))
    cache = engine.new_cache(1, 16)
    engine.forward(torch.randint(0, 256, (1, 12)), cache)
    engine.forward(torch.randint(0, 256, (1, 1)), cache)
    return engine.timeline
