"""Hardware profiles: what one machine's CPU, GPU and PCIe link can do, in numbers with units.

The cost model (docs/DESIGN.md section 4) needs, for every lane, a bandwidth, a FLOP rate and a fixed
overhead; this module holds them as frozen dataclasses with the unit in every name:

- ``_gbps`` is gigabytes per second, 1e9 bytes/s (not gigabits); ``_tflops`` is 1e12 FLOP/s;
  ``_gib`` is 2**30 bytes; ``_us`` is microseconds.
- Figures are *effective* rates (what a real kernel or copy reaches), not spec peaks. Where a catalog
  file derives one from a spec peak, the :class:`Derivation` (peak x effective, or total - reserve)
  is kept beside it so that ``offloadkit hardware show`` can explain every number.
- A :class:`Curve` is a measured time-vs-tokens curve of a real kernel; the cost model prefers it to
  the roofline where a profile has one.
- A :class:`CpuLaneProfile` (measured profiles only) holds what offloadkit's CPU engine costs beyond
  its matmuls: fixed costs per task kind, the work between tasks, the attention core's rate.

This module refuses to guess: it has no default bandwidths or FLOP rates, and a dtype it has no rate
for raises :class:`~offloadkit.errors.ProfileError`. Reading and writing TOML lives in
``catalog.py`` and ``toml_writer.py``, which import this module (never the other way round); the
package (``offloadkit.hardware``) re-exports all three.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from pathlib import Path

from offloadkit.errors import ProfileError

GB = 1e9  # bytes in one GB (the unit of every ``_gbps`` field)
GIB = 2**30  # bytes in one GiB (the unit of every ``_gib`` field)
TFLOP = 1e12
US = 1e-6

#: dtype spellings accepted by ``flop_rate`` -> the canonical name.
_DTYPES = {
    "float32": "float32", "f32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "f16": "float16", "fp16": "float16", "half": "float16",
}


def canonical_dtype(dtype: object) -> str:
    """``"bf16"``, ``"bfloat16"`` or ``torch.bfloat16`` -> ``"bfloat16"``; anything else raises."""
    text = str(dtype).removeprefix("torch.").lower()
    if text not in _DTYPES:
        raise ProfileError(f"no FLOP rate for dtype {dtype!r}: use one of float32, bfloat16, float16")
    return _DTYPES[text]


# ---- the three parts of a machine -----------------------------------------------------------------

@dataclass(frozen=True)
class CpuProfile:
    """The host: cores the kernels use, DRAM read bandwidth, FLOP rates of the project's CPU kernels.

    ``flops_bf16_tflops`` is the rate of bf16-*stored* weights widened to f32 for the arithmetic
    (docs/DESIGN.md section 10), which is what the CPU kernels do on CPUs without AVX-512 BF16.
    ``memory_gib`` is the host's installed memory, or None where it is not known (a profile without it,
    or one measured by the probe): then no plan is refused for the host's memory
    (:func:`offloadkit.plan.host_memory.check_host_fits`).
    """

    name: str
    cores: int
    dram_bandwidth_gbps: float
    flops_f32_tflops: float
    flops_bf16_tflops: float
    call_overhead_us: float
    memory_gib: float | None = None

    def flop_rate(self, dtype: object) -> float:
        """FLOP/s for weights of ``dtype`` (float16 is widened like bfloat16)."""
        tflops = self.flops_f32_tflops if canonical_dtype(dtype) == "float32" else self.flops_bf16_tflops
        return tflops * TFLOP

    @property
    def dram_bandwidth_bytes_per_s(self) -> float:
        return self.dram_bandwidth_gbps * GB

    @property
    def call_overhead_s(self) -> float:
        return self.call_overhead_us * US

    @property
    def memory_bytes(self) -> int | None:
        """Installed host memory in bytes, or None where the profile does not say."""
        return None if self.memory_gib is None else int(self.memory_gib * GIB)


@dataclass(frozen=True)
class GpuProfile:
    """One GPU: memory (total and usable by the plan), memory bandwidth, dense FLOP rates, launch cost."""

    name: str
    memory_gib: float
    usable_memory_gib: float
    memory_bandwidth_gbps: float
    flops_f32_tflops: float
    flops_bf16_tflops: float
    flops_f16_tflops: float
    launch_overhead_us: float

    def flop_rate(self, dtype: object) -> float:
        """FLOP/s of a dense matmul in ``dtype`` (f32 without TF32)."""
        tflops = {"float32": self.flops_f32_tflops, "bfloat16": self.flops_bf16_tflops,
                  "float16": self.flops_f16_tflops}[canonical_dtype(dtype)]
        return tflops * TFLOP

    @property
    def usable_memory_bytes(self) -> int:
        return int(self.usable_memory_gib * GIB)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def memory_bandwidth_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gbps * GB

    @property
    def launch_overhead_s(self) -> float:
        return self.launch_overhead_us * US


@dataclass(frozen=True)
class LinkProfile:
    """The CPU<->GPU link: per-direction copy bandwidth from pinned and from pageable host memory."""

    name: str
    h2d_pinned_gbps: float
    h2d_pageable_gbps: float
    d2h_pinned_gbps: float
    d2h_pageable_gbps: float
    latency_us: float

    def bandwidth(self, direction: str, pinned: bool = True) -> float:
        """Bytes/s of a copy in ``direction`` (``"h2d"`` or ``"d2h"``)."""
        if direction not in ("h2d", "d2h"):
            raise ProfileError(f"no link direction {direction!r}: use 'h2d' or 'd2h'")
        return getattr(self, f"{direction}_{'pinned' if pinned else 'pageable'}_gbps") * GB

    @property
    def latency_s(self) -> float:
        return self.latency_us * US


# ---- measured curves ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Curve:
    """Measured time of a kernel vs the number of tokens, normalized per weight parameter.

    ``seconds_per_param[i]`` is the time the kernel took for ``tokens[i]`` tokens divided by the
    number of weight parameters it multiplied (rows x cols), so one curve serves any weight size:
    ``time_s(n, params) = seconds_per_param(n) * params``. Both memory-bound and compute-bound time
    grow linearly with the weight size, which is what makes this normalization sound.

    Between measured points the curve is interpolated linearly in log(tokens)-log(time) (points are
    usually powers of two). Below the first point the time is the first point's (a kernel is not
    faster with fewer tokens than its memory-bound floor); above the last point it grows in
    proportion to the tokens (the last point is taken as compute-bound). Zero tokens cost nothing.
    """

    kind: str
    tokens: tuple[int, ...]
    seconds_per_param: tuple[float, ...]
    params: int = 0  # size of the weight the curve was measured on (0: unknown); informational
    _log_tokens: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _log_spp: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tokens, spp = tuple(int(t) for t in self.tokens), tuple(float(s) for s in self.seconds_per_param)
        if not tokens or len(tokens) != len(spp):
            raise ProfileError(f"curve {self.kind!r}: tokens and seconds_per_param must be non-empty "
                               f"and of equal length (got {len(tokens)} and {len(spp)})")
        if tokens[0] < 1 or any(b <= a for a, b in zip(tokens, tokens[1:], strict=False)):
            raise ProfileError(f"curve {self.kind!r}: tokens must be positive and strictly increasing")
        if not all(s > 0 and math.isfinite(s) for s in spp):
            raise ProfileError(f"curve {self.kind!r}: seconds_per_param must be positive and finite")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "seconds_per_param", spp)
        object.__setattr__(self, "_log_tokens", tuple(math.log(t) for t in tokens))
        object.__setattr__(self, "_log_spp", tuple(math.log(s) for s in spp))

    def seconds_per_param_at(self, tokens: int) -> float:
        """The normalized time at ``tokens`` (see the class docstring for inter/extrapolation)."""
        if tokens <= 0:
            return 0.0
        ts = self.tokens
        if tokens <= ts[0]:
            return self.seconds_per_param[0]
        if tokens >= ts[-1]:
            return self.seconds_per_param[-1] * tokens / ts[-1]
        i = bisect.bisect_right(ts, tokens)  # ts[i-1] <= tokens < ts[i]
        x0, x1 = self._log_tokens[i - 1], self._log_tokens[i]
        y0, y1 = self._log_spp[i - 1], self._log_spp[i]
        return math.exp(y0 + (y1 - y0) * (math.log(tokens) - x0) / (x1 - x0))

    def time_s(self, tokens: int, params: int) -> float:
        """Seconds the kernel takes for ``tokens`` tokens on a weight of ``params`` parameters."""
        return self.seconds_per_param_at(tokens) * params


# ---- offloadkit's CPU engine on this machine ---------------------------------------------------------

#: Task kinds of work the CPU engine does outside any recorded task, per step / dense layer / MoE layer.
HOST_KINDS = ("host_step", "host_layer", "host_moe_layer")
#: The per-kind tables of a :class:`CpuLaneProfile` (``[cpu_lane.<table>]`` in TOML).
LANE_TABLES = ("task_us", "task_hidden_ns", "element_ns", "decode_ps")


@dataclass(frozen=True)
class CpuLaneProfile:
    """What offloadkit's CPU engine costs on this machine beyond the matmuls its curves price.

    Measured by ``offloadkit profile`` on the engine itself (docs/DESIGN.md, "Calibration"); a profile
    without it (every catalog file) prices the CPU lane with the plain roofline and curves, as before.

    - ``task_us[kind]`` and ``task_hidden_ns[kind]``: the fixed cost of one task of ``kind`` (the engine's
      timeline kinds: ``embed``, ``attn_norm``, ``attn_qkv``, ``attention``, ``expert``...; and
      :data:`HOST_KINDS` for the work between tasks) beyond the kernel work the cost model prices from
      curves, ``task_us + task_hidden_ns * 1e-3 * hidden`` microseconds for a model of that hidden size:
      Python, dispatch, small arrays, the caches the weights streaming past have evicted;
    - ``element_ns[kind]``: its nanoseconds per further row and hidden unit (a task over ``n`` rows adds
      ``element_ns * (n - 1) * hidden``): norms, RoPE, copies, gathers, page faults of fresh arrays;
    - ``decode_ps["<kind>_<bf16|f32>"]``: picoseconds per weight parameter of one-token calls of the kinds
      that stream their weights (``attn_qkv``, ``attn_o``, ``expert``, ``ffn``, ``lm_head``), as the engine
      reads them between its other tasks: the floor of that kind's kernel curve;
    - ``attention_keys`` / ``attention_head_dims`` / ``attention_gflops``: the attention core's FLOP rate by
      visible keys per query and head dim (interpolated in log scale, constant beyond the measured points).
    """

    name: str
    attention_keys: tuple[int, ...]
    attention_gflops: tuple[tuple[float, ...], ...]  # one row per head dim, one rate per key count
    attention_head_dims: tuple[int, ...] = (128,)
    task_us: dict[str, float] = field(default_factory=dict, hash=False)
    task_hidden_ns: dict[str, float] = field(default_factory=dict, hash=False)
    element_ns: dict[str, float] = field(default_factory=dict, hash=False)
    decode_ps: dict[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        keys, dims = tuple(int(k) for k in self.attention_keys), tuple(int(d) for d in self.attention_head_dims)
        rates = tuple(tuple(float(r) for r in row) for row in self.attention_gflops)
        for axis, name in ((keys, "keys"), (dims, "head_dims")):
            if not axis or axis[0] < 1 or any(b <= a for a, b in zip(axis, axis[1:], strict=False)):
                raise ProfileError(f"cpu_lane.attention: {name} must be positive and strictly increasing")
        if len(rates) != len(dims) or any(len(row) != len(keys) for row in rates):
            raise ProfileError(f"cpu_lane.attention: gflops must hold one row per head dim ({len(dims)}) of one "
                               f"rate per key count ({len(keys)})")
        if not all(r > 0 and math.isfinite(r) for row in rates for r in row):
            raise ProfileError("cpu_lane.attention: the rates must be positive and finite")
        for table in (self.task_us, self.task_hidden_ns, self.element_ns, self.decode_ps):
            if not all(v >= 0 and math.isfinite(v) for v in table.values()):
                raise ProfileError(f"cpu_lane: task and element costs must be >= 0 and finite, got {table}")
        object.__setattr__(self, "attention_keys", keys)
        object.__setattr__(self, "attention_head_dims", dims)
        object.__setattr__(self, "attention_gflops", rates)

    def attention_flop_rate(self, keys_per_query: float, head_dim: int = 128) -> float:
        """FLOP/s of the attention core when each query sees ``keys_per_query`` keys on average, for heads of
        ``head_dim`` (both interpolated in log scale between the measured points, constant beyond them)."""
        by_dim = [_log_interp(self.attention_keys, row, keys_per_query) for row in self.attention_gflops]
        return _log_interp(self.attention_head_dims, by_dim, head_dim) * 1e9


def _log_interp(xs: tuple[int, ...], ys: tuple[float, ...] | list[float], x: float) -> float:
    """``ys`` at ``x``, linear in log(x)-log(y) between the points ``xs``, constant beyond them."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    f = (math.log(x) - math.log(xs[i - 1])) / (math.log(xs[i]) - math.log(xs[i - 1]))
    return math.exp(math.log(ys[i - 1]) + f * (math.log(ys[i]) - math.log(ys[i - 1])))


# ---- the machine ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Derivation:
    """How a catalog figure was derived from a spec sheet: ``peak * effective`` or ``total - reserve``."""

    peak: float | None = None
    effective: float | None = None
    total: float | None = None
    reserve: float | None = None

    @property
    def value(self) -> float:
        if self.peak is not None:
            return round_figure(self.peak * (self.effective if self.effective is not None else 1.0))
        if self.total is not None:
            return round_figure(self.total - (self.reserve or 0.0))
        raise ProfileError("a derivation needs a peak or a total")

    def describe(self) -> str:
        """``"peak 83.2 x effective 0.75"`` or ``"total 24 - reserve 1"``."""
        if self.peak is not None:
            return f"peak {self.peak:g} x effective {self.effective:g}"
        return f"total {self.total:g} - reserve {self.reserve:g}"


def round_figure(x: float) -> float:
    """Round away float noise from a derivation (83.2 * 0.75 -> 62.4, not 62.400000000000006)."""
    return float(f"{x:.12g}")


@dataclass(frozen=True)
class HardwareProfile:
    """One machine. ``gpu`` and ``link`` are None for a CPU-only machine (e.g. one measured here).

    ``cpu_lane`` (measured profiles only) prices offloadkit's CPU engine task by task.
    ``sources`` maps a dotted field name (``"cpu.dram_bandwidth_gbps"``, ``"curves.cpu_expert_f32"``)
    to where the figure comes from; ``derivations`` maps the same names to the spec peak and the
    effective fraction (or total and reserve) that produced a figure, where one did. ``path`` is the
    file the profile was loaded from (not part of equality).
    """

    name: str
    description: str
    cpu: CpuProfile
    gpu: GpuProfile | None = None
    link: LinkProfile | None = None
    curves: dict[str, Curve] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)
    derivations: dict[str, Derivation] = field(default_factory=dict)
    cpu_lane: CpuLaneProfile | None = None

    def __hash__(self) -> int:  # the dict fields are not hashable; the machine itself is
        return hash((self.name, self.cpu, self.gpu, self.link))

    @property
    def has_gpu(self) -> bool:
        return self.gpu is not None

    def curve(self, kind: str) -> Curve | None:
        """The measured curve of ``kind`` (e.g. ``"cpu_expert_bf16"``), or None."""
        return self.curves.get(kind)

    def figures(self) -> dict[str, float | int]:
        """Every numeric field by dotted name, in the order of the dataclasses (an optional figure the
        profile does not give, such as an unknown ``cpu.memory_gib``, is left out)."""
        out: dict[str, float | int] = {}
        for section in ("cpu", "gpu", "link"):
            part = getattr(self, section)
            if part is None:
                continue
            for key, value in vars(part).items():
                if key != "name" and value is not None:
                    out[f"{section}.{key}"] = value
        return out


__all__ = ["HOST_KINDS", "LANE_TABLES", "CpuLaneProfile", "CpuProfile", "Curve", "Derivation", "GpuProfile",
           "HardwareProfile", "LinkProfile", "canonical_dtype"]
