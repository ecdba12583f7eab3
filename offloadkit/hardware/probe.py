"""``offloadkit profile``: measure the machine this runs on and write a profile the catalog loader reads.

What it measures (CPU always; GPU and PCIe when ``torch.cuda.is_available()``, see ``probe_cuda.py``):

- DRAM read bandwidth with all cores: :func:`offloadkit.hardware.stream.measure_read`, the one read routine
  (512 MiB, best of several reads, with or without ``--quick``) behind every read figure offloadkit prints;
  the spread of its samples goes into the figure's source.
- The CPU lane (``probe_cpu.py``): curves of the engine's own kernels per shape class and dtype
  (``offloadkit.kernels.cpu.experts.linear`` on square, vocabulary-wide and router-sized weights,
  ``expert_rows`` on a hidden 4096 x intermediate 4096 expert, 1024 x 2048 with ``--quick``; f32 and
  bf16-stored weights, widened to f32 inside the kernel, docs/DESIGN.md section 10), read from a working
  set beyond the last-level cache; the expert's whole-call curves ``cpu_expert_f32`` / ``cpu_expert_bf16``
  and their best FLOP rates as ``flops_*_tflops``; the attention core's rate; and the fixed costs of
  the CPU engine's tasks, measured on the engine itself (``probe_engine.py``; ``[cpu_lane]``, what the
  simulator prices the engine with).
- The per-call overhead of the same kernel on a tiny expert (median).

It refuses to invent what it did not measure: a CPU-only machine gets a profile without ``[gpu]`` and
``[link]``, never made-up GPU figures; and a figure measured as zero or negative aborts the probe.
The raw measurements are a plain dict, so ``build_profile`` can be tested with a fake one.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offloadkit.errors import ProfileError
from offloadkit.hardware.machine import cpu_model
from offloadkit.hardware.profile import (
    LANE_TABLES,
    CpuLaneProfile,
    CpuProfile,
    Curve,
    GpuProfile,
    HardwareProfile,
    LinkProfile,
)
from offloadkit.hardware.toml_writer import save_profile


@dataclass(frozen=True)
class ProbeSettings:
    """Sizes and repetitions of one probe run."""

    hidden: int  # the expert's hidden size H (W1, W3: [I, H]; W2: [H, I])
    intermediate: int  # the expert's intermediate size I
    tokens: tuple[int, ...]
    reps: int  # timed runs per point (best is kept), after one warm-up
    point_budget_s: float  # keep repeating a point until this much time has passed (fast points)


TOKENS = tuple(2**i for i in range(10))  # 1, 2, 4, ..., 512
# Full: 3 x 4096 x 4096 = 50M parameters (201 MB in f32, far beyond the caches), a third of a
# Mixtral-8x7B expert, so that the sweep stays well under two minutes on two cores.
FULL = ProbeSettings(hidden=4096, intermediate=4096, tokens=TOKENS, reps=2, point_budget_s=0.3)
QUICK = ProbeSettings(hidden=1024, intermediate=2048, tokens=TOKENS, reps=2, point_budget_s=0.05)


# ---- kernels --------------------------------------------------------------------------------------

def expert_kernel(dtype: str, hidden: int, intermediate: int) -> tuple[Callable[[Any], Any], str]:
    """A SwiGLU expert ``x -> W2 (silu(W1 x) * W3 x)`` with random weights stored in ``dtype``, and what it is.

    The engine's own CPU kernel (``offloadkit.kernels.cpu.experts.expert_rows``: weights stored as they come,
    widened to f32 inside the kernel) when it imports; otherwise torch on weights widened beforehand.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    shapes = ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate))
    w1, w3, w2 = (torch.randn(*shape, generator=gen).mul_(0.02).to(tdtype) for shape in shapes)
    try:
        from offloadkit.kernels.cpu.experts import ExpertWeights, expert_rows
    except ImportError:
        import torch.nn.functional as F

        f1, f3, f2 = w1.float(), w3.float(), w2.float()
        return (lambda x: F.linear(F.silu(F.linear(x, f1)) * F.linear(x, f3), f2),
                "torch F.linear SwiGLU expert on weights widened to f32 beforehand")
    weights = ExpertWeights.from_torch(w1, w3, w2)
    return lambda x: expert_rows(x, weights), "offloadkit.kernels.cpu.experts.expert_rows (SwiGLU expert, all rows)"


# ---- CPU measurements -----------------------------------------------------------------------------

def measure_dram() -> tuple[float, str]:
    """All-core DRAM read bandwidth (GB/s, 1e9 bytes/s) and how it was measured, with the samples' spread.

    The read is :func:`offloadkit.hardware.stream.measure_read`, the routine ``offloadkit bench kernels``
    and the notebooks print too, so the three report one physical limit (up to the machine's noise,
    which the spread shows).
    """
    from offloadkit.hardware.stream import measure_read

    read = measure_read()
    return read.gbps, f"STREAM-like Numba read (offloadkit.hardware.stream.measure_read): {read.describe()}"


def measure_call_overhead_us(calls: int = 300) -> tuple[float, str]:
    """Median microseconds of one call of the expert kernel on a tiny (8 x 8) bf16 expert: the fixed
    cost of a CPU task; and what was called."""
    import torch

    kernel, what = expert_kernel("bfloat16", 8, 8)
    x = torch.ones(1, 8)
    for _ in range(20):
        kernel(x)
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        kernel(x)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6, f"median of {calls} calls of {what} on an 8 x 8 bf16 expert, 1 token"


# ---- the whole probe ------------------------------------------------------------------------------

def measure(quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run every measurement this machine allows; returns the raw figures (see ``build_profile``)."""
    from numba import get_num_threads
    from tqdm.auto import tqdm

    from offloadkit.hardware import probe_cpu, probe_cuda

    s = QUICK if quick else FULL
    has_cuda = probe_cuda.cuda_available()
    steps = 2 + probe_cpu.STEPS + (probe_cuda.STEPS if has_cuda else 0)
    started = time.perf_counter()
    m: dict[str, Any] = {"cpu": {"name": cpu_model(), "cores": get_num_threads()}, "gpu": None, "link": None,
                         "curves": {}, "methods": {}, "quick": quick}
    cpu, methods = m["cpu"], m["methods"]
    with tqdm(total=steps, desc="offloadkit profile", disable=not progress, leave=False) as bar:
        bar.set_postfix_str("DRAM bandwidth")
        cpu["dram_bandwidth_gbps"], methods["cpu.dram_bandwidth_gbps"] = measure_dram()
        methods["cpu.cores"] = "Numba threads (numba.get_num_threads())"
        bar.update()
        probe_cpu.measure_lane(m, quick, bar)
        bar.set_postfix_str("call overhead")
        cpu["call_overhead_us"], methods["cpu.call_overhead_us"] = measure_call_overhead_us()
        bar.update()
        if has_cuda:
            probe_cuda.measure_cuda(m, s, bar)
    m["elapsed_s"] = time.perf_counter() - started
    return m


def default_name() -> str:
    """``measured-<hostname>``, lower case, with anything but letters, digits and dashes made a dash."""
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-") or "host"
    return f"measured-{host}"


def default_out(name: str | None = None) -> Path:
    """Where ``offloadkit profile`` writes without ``--out``: ``./<name>.toml`` (name: :func:`default_name`)."""
    return Path(os.getcwd()) / f"{name or default_name()}.toml"


def build_profile(m: dict[str, Any], name: str | None = None, date: str | None = None) -> HardwareProfile:
    """Turn raw measurements (from ``measure``, or a fake dict in tests) into a sourced profile."""
    date = date or _dt.date.today().isoformat()
    name = name or default_name()
    stamp = f"measured by offloadkit profile on {date}" + (" (--quick)" if m.get("quick") else "")
    methods: dict[str, str] = m.get("methods", {})
    sources: dict[str, str] = {}
    parts: dict[str, Any] = {}
    for section, cls in (("cpu", CpuProfile), ("gpu", GpuProfile), ("link", LinkProfile)):
        raw = m.get(section)
        if raw is None:
            parts[section] = None
            continue
        for key, value in raw.items():
            if key == "name":
                continue
            if not isinstance(value, (int, float)) or not value == value or value < 0 or (
                    value == 0 and not key.endswith(("overhead_us", "latency_us"))):
                raise ProfileError(f"the probe measured {section}.{key} = {value!r}; refusing to write it")
            how = methods.get(f"{section}.{key}")
            sources[f"{section}.{key}"] = f"{stamp}: {how}" if how else stamp
        parts[section] = cls(**raw)
    curves = {}
    for kind, c in m.get("curves", {}).items():
        params = int(c["params"])
        curves[kind] = Curve(kind=kind, tokens=tuple(c["tokens"]), params=params,
                             seconds_per_param=tuple(t / params for t in c["seconds"]))
        sources[f"curves.{kind}"] = f"{stamp}: {c['method']}" if c.get("method") else stamp
    lane = _cpu_lane(m["cpu_lane"], stamp, sources) if m.get("cpu_lane") else None
    cpu = parts["cpu"]
    what = f"{cpu.name}, {cpu.cores} cores"
    if parts["gpu"] is not None:
        what += f", {parts['gpu'].name} on {parts['link'].name}"
    else:
        what += ", no CUDA GPU"
    description = f"{what}; {stamp}" + (f" in {m['elapsed_s']:.0f} s" if "elapsed_s" in m else "")
    return HardwareProfile(name=name, description=description, cpu=cpu, gpu=parts["gpu"], link=parts["link"],
                           curves=curves, sources=sources, cpu_lane=lane)


def _cpu_lane(raw: dict[str, Any], stamp: str, sources: dict[str, str]) -> CpuLaneProfile:
    """The raw ``cpu_lane`` measurements (:func:`offloadkit.hardware.probe_cpu.measure_lane`) as a profile part,
    with a source for every figure."""
    how: dict[str, str] = raw.get("methods", {})
    if not raw.get("attention_gflops") or min(min(row) for row in raw["attention_gflops"]) <= 0:
        raise ProfileError(f"the probe measured attention rates {raw.get('attention_gflops')!r}; refusing to "
                           "write them")
    sources["cpu_lane.attention"] = f"{stamp}: {how.get('attention', 'measured')}"
    for key in LANE_TABLES:
        for kind in raw.get(key, {}):
            sources[f"cpu_lane.{key}.{kind}"] = f"{stamp}: {how.get(key, 'measured')}"
    return CpuLaneProfile(raw["name"], tuple(raw["attention_keys"]), tuple(map(tuple, raw["attention_gflops"])),
                          tuple(raw.get("attention_head_dims", (128,))),
                          **{key: dict(raw.get(key, {})) for key in LANE_TABLES})


def run_profile(out: str | Path | None = None, quick: bool = False, name: str | None = None,
                progress: bool = True) -> tuple[HardwareProfile, Path]:
    """Measure this machine, write the profile to ``out`` (default ``./<name>.toml``); returns both."""
    profile = build_profile(measure(quick=quick, progress=progress), name=name)
    path = save_profile(profile, Path(out) if out else default_out(profile.name))
    return profile, path
