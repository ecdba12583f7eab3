"""The cost model: how long one task takes on one lane of a machine described by a hardware profile.

docs/DESIGN.md section 4. Every task is priced with a roofline,

    t = overhead(lane) + max(bytes / bandwidth(lane), flops / flop_rate(lane, dtype))

using the bandwidths, FLOP rates and per-call overheads of a :class:`~offloadkit.hardware.profile.HardwareProfile`.
Where the profile carries a *measured curve* for a matmul (the CPU expert, the GPU's ``F.linear``:
time as a function of tokens, measured by ``offloadkit profile``), the curve prices it instead of the
FLOP rate, but never below the time to read its bytes at the lane's bandwidth: a curve is measured on
one weight size and scaled per parameter, and a weight small enough to sit in cache when it was
measured would otherwise price a task faster than memory can deliver it.

The partitioner, token assignment (inside the decode loop) and the simulator all call it, so it is
built to be cheap: :class:`CostModel` resolves everything a profile and a model imply once, in its
constructor, into plain float attributes; each ``*_s`` method is a few float operations, with no numpy,
no dict lookups by dtype and no allocation per call.

Where the profile carries a measured ``cpu_lane`` (``offloadkit profile`` writes one), tasks on the
``cpu`` lane are priced as offloadkit's CPU engine does the work (:mod:`offloadkit.plan.cpu_lane`: fixed
costs per task kind, matmul curves per shape class, the attention core's own rate, the work between
tasks), unless ``cpu_engine=False`` (a plan of another engine, e.g. llama.cpp's). ``kv_dtype`` is the
KV cache's element type where it is not the weights' (offloadkit's CPU engine keeps it in float32).
Catalog profiles have no ``cpu_lane``: they price as before.

What it refuses: pricing a GPU task on a profile without a GPU, or a copy without a link (it raises
:class:`~offloadkit.errors.PlanError`); and it does not model caches, NUMA, thermal clocks, or the
overlap of compute and memory traffic inside one kernel (the roofline takes the max, not the sum).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from offloadkit.errors import PlanError
from offloadkit.model.dtypes import DTYPE_BYTES, normalize_dtype
from offloadkit.model.spec import ModelSpec
from offloadkit.plan.cpu_lane import CpuLanePrices

if TYPE_CHECKING:
    from offloadkit.hardware.profile import HardwareProfile

#: Bytes per activation element: activations are computed and moved in f32 (the reference computes in f32).
ACT_BYTES = 4

#: The measured curve the cost model reads for CPU matmuls, by weight dtype (``profile.curves`` keys, as
#: ``offloadkit profile`` writes them). f16 weights are widened like bf16 ones, so they share its curve.
CPU_CURVE_KEYS: dict[str, str] = {"float32": "cpu_expert_f32", "bfloat16": "cpu_expert_bf16",
                                  "float16": "cpu_expert_bf16"}
#: The same for GPU matmuls. The probe measures bf16 only; f16 has the same bytes and the same tensor-core
#: rate on the GPUs offloadkit targets (Ampere and later), so it shares the curve; f32 keeps the roofline.
GPU_CURVE_KEYS: dict[str, str] = {"bfloat16": "gpu_matmul_bf16", "float16": "gpu_matmul_bf16"}


class CostModel:
    """Seconds per task for one (hardware profile, model) pair; see the module docstring.

    ``pinned`` selects the link's pinned or pageable bandwidth for copies that do not say; ``kv_dtype`` the
    KV cache's element type (default: the weights'); ``cpu_engine`` whether the ``cpu`` lane is offloadkit's
    CPU engine, priced from the profile's ``cpu_lane`` where it has one (``self.cpu_lane``, else None).
    """

    def __init__(self, profile: HardwareProfile, spec: ModelSpec, *, pinned: bool = True,
                 kv_dtype: str | None = None, cpu_engine: bool = True) -> None:
        self.profile_name: str = profile.name
        self.dtype = spec.dtype
        self.weight_bytes = float(DTYPE_BYTES[spec.dtype])
        cpu = profile.cpu
        self.cpu_bw = float(cpu.dram_bandwidth_gbps) * 1e9
        self.cpu_rate = cpu.flop_rate(spec.dtype)
        self.cpu_overhead = float(cpu.call_overhead_us) * 1e-6
        curves = getattr(profile, "curves", None) or {}
        self.cpu_curve = curves.get(CPU_CURVE_KEYS[spec.dtype])
        gpu, link = profile.gpu, profile.link
        self.has_gpu = gpu is not None and link is not None
        self.gpu_curve = curves.get(GPU_CURVE_KEYS.get(spec.dtype, "")) if self.has_gpu else None
        if self.has_gpu:
            self.gpu_bw = float(gpu.memory_bandwidth_gbps) * 1e9
            self.gpu_rate = gpu.flop_rate(spec.dtype)
            self.gpu_overhead = float(gpu.launch_overhead_us) * 1e-6
            self.link_latency = float(link.latency_us) * 1e-6
            self.h2d_pinned, self.h2d_pageable = link.bandwidth("h2d", True), link.bandwidth("h2d", False)
            self.d2h_pinned, self.d2h_pageable = link.bandwidth("d2h", True), link.bandwidth("d2h", False)
        else:
            self.gpu_bw = self.gpu_rate = self.gpu_overhead = 0.0
            self.link_latency = self.h2d_pinned = self.h2d_pageable = self.d2h_pinned = self.d2h_pageable = 0.0
        self.pinned = pinned
        lane = getattr(profile, "cpu_lane", None)
        self.cpu_lane = CpuLanePrices(lane, curves, spec, self.cpu_bw) if lane is not None and cpu_engine else None
        self.kv_bytes = float(DTYPE_BYTES[normalize_dtype(kv_dtype)]) if kv_dtype else self.weight_bytes
        # Attention constants of the model: KV bytes per position per layer (KV dtype, K and V),
        # FLOPs per visible (query, key) pair (QK^T and PV: 2 * 2 * heads * head_dim).
        self.kv_bytes_per_pos = 2.0 * spec.n_kv_heads * spec.head_dim * self.kv_bytes
        self.attn_flops_per_pair = 4.0 * spec.n_heads * spec.head_dim
        self.attn_act_bytes_per_token = 2.0 * spec.n_heads * spec.head_dim * ACT_BYTES
        self.sliding_window = spec.sliding_window

    # ---- the roofline --------------------------------------------------------------------------------

    def _need_gpu(self) -> None:
        if not self.has_gpu:
            raise PlanError(f"profile {self.profile_name!r} has no GPU (or no link): a plan that uses the GPU "
                            f"cannot run on it; pick a plan like all-cpu or a profile with a GPU")

    def roofline_s(self, lane: str, bytes_: float, flops: float, launches: int = 1) -> float:
        """``overhead * launches + max(bytes / bandwidth, flops / flop_rate)`` on ``cpu`` or ``gpu``."""
        if lane == "cpu":
            return self.cpu_overhead * launches + max(bytes_ / self.cpu_bw, flops / self.cpu_rate)
        if lane == "gpu":
            if not self.has_gpu:
                self._need_gpu()
            return self.gpu_overhead * launches + max(bytes_ / self.gpu_bw, flops / self.gpu_rate)
        raise PlanError(f"no compute on lane {lane!r}: compute runs on 'cpu' or 'gpu'")

    # ---- task kinds -------------------------------------------------------------------------------------

    def matmul_s(self, lane: str, params: int, tokens: int, act_bytes: float = 0.0, launches: int = 1) -> float:
        """A weight slice of ``params`` parameters applied to ``tokens`` tokens (an expert, QKV, lm_head...).

        Reads the weights once (``params * weight bytes``) plus ``act_bytes`` of activations; does
        ``2 * params * tokens`` FLOPs. Where the profile has a measured curve for the lane and dtype, the
        curve's time replaces the FLOP term, floored at the bytes over the lane's bandwidth:

        - CPU: ``max(curve, overhead * launches + bytes / bandwidth)`` (the curve timed whole calls, so
          it already holds a call's overhead);
        - GPU: ``overhead * launches + max(curve, bytes / bandwidth)`` (CUDA events timed the device
          alone, so the launch overhead comes on top).
        """
        bytes_ = params * self.weight_bytes + act_bytes
        if lane == "cpu" and self.cpu_curve is not None:
            return max(self.cpu_curve.time_s(tokens, params), self.cpu_overhead * launches + bytes_ / self.cpu_bw)
        if lane == "gpu" and self.gpu_curve is not None:
            return self.gpu_overhead * launches + max(self.gpu_curve.time_s(tokens, params), bytes_ / self.gpu_bw)
        return self.roofline_s(lane, bytes_, 2.0 * params * tokens, launches)

    def copy_s(self, direction: str, bytes_: float, pinned: bool | None = None) -> float:
        """A PCIe copy of ``bytes_`` host->device (``h2d``) or device->host (``d2h``): latency + bytes / bandwidth."""
        if not self.has_gpu:
            self._need_gpu()
        pin = self.pinned if pinned is None else pinned
        if direction == "h2d":
            bw = self.h2d_pinned if pin else self.h2d_pageable
        elif direction == "d2h":
            bw = self.d2h_pinned if pin else self.d2h_pageable
        else:
            raise PlanError(f"a copy goes 'h2d' or 'd2h', not {direction!r}")
        return self.link_latency + bytes_ / bw

    def attention_pairs(self, tokens: int, past: int) -> int:
        """Visible (query, key) pairs of ``tokens`` new queries after ``past`` cached positions (causal)."""
        w = self.sliding_window
        if w is None:
            return tokens * past + tokens * (tokens + 1) // 2
        return sum(min(past + i + 1, w) for i in range(tokens))

    def attention_cost(self, tokens: int, past: int, batch: int = 1) -> tuple[float, float]:
        """(bytes, flops) of one layer's attention core: read the KV cache once, softmax over visible keys."""
        kv_len = past + tokens
        if self.sliding_window is not None:  # the first query sees positions past+1-W .. past, the last one W
            kv_len = min(kv_len, self.sliding_window + tokens - 1)
        bytes_ = batch * (kv_len * self.kv_bytes_per_pos + tokens * self.attn_act_bytes_per_token)
        return bytes_, batch * self.attn_flops_per_pair * self.attention_pairs(tokens, past)

    def attention_s(self, lane: str, tokens: int, past: int, batch: int = 1, launches: int = 1) -> float:
        """The attention core (QK^T, softmax, PV) of one layer on the lane that holds its KV cache."""
        if lane == "cpu" and self.cpu_lane is not None:
            return self.cpu_lane.attention_s(tokens, self.attention_pairs(tokens, past), batch)
        bytes_, flops = self.attention_cost(tokens, past, batch)
        return self.roofline_s(lane, bytes_, flops, launches)

    def cpu_task_s(self, kind: str, tokens: int, params: float = 0.0) -> float | None:
        """A ``cpu``-lane task of ``kind`` as the CPU engine prices it (``tokens``: the rows it computes,
        ``params``: its weights), or None where the profile has no ``cpu_lane`` (use the roofline)."""
        if self.cpu_lane is None:
            return None
        return self.cpu_lane.task_s(kind, tokens, params)

    def small_op_s(self, lane: str, bytes_: float, flops: float = 0.0, launches: int = 1) -> float:
        """Norms, the router's softmax, residual adds, embedding lookups: usually pure overhead."""
        return self.roofline_s(lane, bytes_, flops, launches)

    def norm_s(self, lane: str, tokens: int, hidden: int, launches: int = 1) -> float:
        """A fused residual add + RMS/LayerNorm over ``tokens`` rows of width ``hidden``."""
        return self.roofline_s(lane, 4.0 * tokens * hidden * ACT_BYTES, 6.0 * tokens * hidden, launches)

    def describe(self) -> dict[str, float]:
        """The resolved constants (bytes/s, FLOP/s, s), for tables and notebooks."""
        out = {"cpu_bw": self.cpu_bw, "cpu_flops": self.cpu_rate, "cpu_overhead_s": self.cpu_overhead,
               "kv_bytes": self.kv_bytes}
        if self.has_gpu:
            out |= {"gpu_bw": self.gpu_bw, "gpu_flops": self.gpu_rate, "gpu_overhead_s": self.gpu_overhead,
                    "h2d_bw": self.h2d_pinned if self.pinned else self.h2d_pageable,
                    "d2h_bw": self.d2h_pinned if self.pinned else self.d2h_pageable,
                    "link_latency_s": self.link_latency}
        return out


def engine_options(plan: object) -> dict[str, object]:
    """The :class:`CostModel` options a plan implies: ``meta["kv_dtype"]`` (default: the weights'), and whether
    its ``cpu`` lane is offloadkit's CPU engine (``meta["cpu_engine"]``; default: every policy but ``llamacpp``,
    whose CPU lane is llama.cpp's)."""
    meta = getattr(plan, "meta", None) or {}
    return {"kv_dtype": meta.get("kv_dtype"),
            "cpu_engine": bool(meta.get("cpu_engine", getattr(plan, "policy", "") != "llamacpp"))}


__all__ = ["ACT_BYTES", "CPU_CURVE_KEYS", "GPU_CURVE_KEYS", "CostModel", "engine_options"]
