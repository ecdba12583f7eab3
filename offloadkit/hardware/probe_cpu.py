"""The CPU lane's part of ``offloadkit profile``: offloadkit's own kernels, timed as the engine runs them.

The simulator prices offloadkit's CPU engine from these figures (:mod:`offloadkit.plan.cpu_lane`), so they
are measured on the engine's code, not on stand-ins, and follow the engine when it changes. This module
measures what the engine's kernels cost per call; :mod:`offloadkit.hardware.probe_engine` measures what
the engine spends beyond them, net of these curves, and :func:`measure_lane` runs both:

- **matmul curves per shape class and dtype**, on the kernel entry points the engine calls
  (:mod:`offloadkit.kernels.cpu.experts`): ``linear3`` on Q, K and V shaped weights (``qkv``), ``linear``
  on a square weight (``linear``: the O projection), on a vocabulary-wide one (``wide``: the lm_head) and
  on a router-sized one (``router``), and ``expert_rows`` on a SwiGLU expert (``expert``: experts and
  dense FFNs), at two hidden sizes (:attr:`LaneSettings.widths`), for 1..512 tokens plus both sides of the
  decode/prefill kernel switch. Each call reads a weight the previous calls did not touch (copies rotating
  through four times the last-level cache), so a few-token call reads DRAM as the engine's do; each point
  is the median over :attr:`LaneSettings.rounds` rounds (each round sweeps every class, so a slow minute of
  the machine spoils one round), made monotone in tokens (:func:`monotone`), and stored *net*
  of a call's fixed cost (the same call on a tiny weight), which the engine's task costs below hold. The
  widest expert's whole-call curve is also kept as ``cpu_expert_<dtype>`` (what the plain roofline reads).
- **the attention core's FLOP rate** by keys per query and head dim (the engine's attention kernel:
  decode calls over growing contexts and fresh prefills, net of a one-head, one-key call).
- **the engine's own costs** (:func:`offloadkit.hardware.probe_engine.measure_engine`): the real
  :class:`~offloadkit.runtime.cpu_engine.CpuEngine` on probe models, each task's time beyond the kernel
  work these curves and rates price (fixed, per hidden unit, per row, and the work between tasks).

What it refuses: nothing beyond the probe's rule (``build_profile`` refuses non-positive figures).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offloadkit.hardware.probe_engine import measure_engine
from offloadkit.hardware.stream import MIB


def best_time(fn: Callable[[], object], reps: int, budget_s: float = 0.0) -> float:
    """Best wall time of ``fn`` over at least ``reps`` runs (after one warm-up), and more runs while
    the total stays under ``budget_s`` (at most 50): fast calls get enough samples to be stable."""
    fn()
    best, spent, n = float("inf"), 0.0, 0
    while n < reps or (spent < budget_s and n < 50):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best


def typical_time(fn: Callable[[], object], reps: int, budget_s: float = 0.0, warm: bool = True) -> float:
    """The median wall time of ``fn`` over at least ``reps`` runs (after one warm-up unless ``warm`` is False),
    more while the total stays under ``budget_s`` (at most 50): what a call typically costs on a busy machine,
    not its luckiest run."""
    if warm:
        fn()
    samples: list[float] = []
    while len(samples) < reps or (sum(samples) < budget_s and len(samples) < 50):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


@dataclass(frozen=True)
class LaneSettings:
    """Sizes and repetitions of the CPU lane's measurements."""

    widths: tuple[int, ...]  # hidden sizes d the matmul classes are measured at (per-weight time depends on d)
    wide_rows: int  # the lm_head class: a wide_rows x d weight
    tokens: tuple[int, ...]
    reps: int
    point_budget_s: float
    attention: tuple[int, int, int]  # heads, KV heads (head dims: attention_head_dims)
    attention_decode: tuple[int, ...]  # contexts of one-query calls
    attention_prefill: tuple[int, ...]  # lengths of fresh prefills
    engine_steps: int  # decode steps per pass over each probe model (two passes)
    engine_prompt: int  # prompt tokens of the per-row measurement
    engine_reps: int  # fresh forwards per length on the widest probe models
    engine_vocab: int  # the probe models' vocabulary (the lm_head streams it every step)
    attention_head_dims: tuple[int, ...] = (64, 128)
    rounds: int = 3  # rounds over every class's token sweep (per point the median over rounds is kept)


TOKENS = tuple(2**i for i in range(10))
FULL_LANE = LaneSettings(widths=(512, 2048), wide_rows=32000, tokens=TOKENS,
                         reps=2, point_budget_s=0.3, attention=(16, 4, 128), attention_decode=(16, 64, 256, 1024),
                         attention_prefill=(16, 64, 128, 256, 512), engine_steps=48, engine_prompt=128,
                         engine_reps=9, engine_vocab=32000)
QUICK_LANE = LaneSettings(widths=(512, 1024), wide_rows=4096, tokens=tuple(t for t in TOKENS if t != 256),
                          reps=1, point_budget_s=0.02, attention=(16, 4, 128), attention_decode=(16, 128, 512),
                          attention_prefill=(32, 128, 384), engine_steps=24, engine_prompt=128, engine_reps=3,
                          engine_vocab=8192, rounds=2)
STEPS = 3  # progress-bar steps: curves, attention, engine


def last_level_cache_bytes() -> int:
    """The largest CPU cache (``/sys``), or 32 MiB where it cannot be read."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 * MIB


def token_points(dtype: str, tokens: tuple[int, ...]) -> tuple[int, ...]:
    """``tokens`` plus both sides of the kernels' decode/prefill switch for ``dtype``."""
    from offloadkit.kernels.cpu.experts import DECODE_MAX_TOKENS

    d = DECODE_MAX_TOKENS[dtype]
    return tuple(sorted({*tokens, d, d + 1}))


# ---- matmul curves ------------------------------------------------------------------------------------

def class_shapes(cls: str, d: int, wide_rows: int = 32000) -> list[tuple[int, int]]:
    """The weights of one call of class ``cls`` at hidden size ``d``: Q, K and V with 4 heads per KV head
    (``qkv``), a square one (``linear``), a vocabulary-wide one (``wide``), 8 router rows (``router``), and
    for the ``expert`` its (intermediate, hidden) = (2 d, d)."""
    return {"qkv": [(d, d), (d // 4, d), (d // 4, d)], "linear": [(d, d)], "wide": [(wide_rows, d)],
            "router": [(8, d)], "expert": [(2 * d, d)]}[cls]


def _copies(arrays: list[np.ndarray], working_set: int) -> list[list[np.ndarray]]:
    """Enough copies of ``arrays`` that cycling through them reads at least ``working_set`` bytes."""
    k = max(1, math.ceil(working_set / sum(a.nbytes for a in arrays)))
    stacks = []
    for a in arrays:
        s = np.empty((k, *a.shape), dtype=a.dtype)
        s[:] = a
        stacks.append(s)
    return [[s[j] for s in stacks] for j in range(k)]


def class_kernel(cls: str, dtype: str, shapes: list[tuple[int, int]], working_set: int) -> tuple[Callable, int, str]:
    """A call ``x -> kernel(x, next weights)`` of class ``cls`` on weights of ``shapes`` (for the expert:
    ``[(intermediate, hidden)]``) stored in ``dtype``, rotating through copies; its parameters; what it calls."""
    from offloadkit.kernels.cpu import experts as k
    from offloadkit.kernels.cpu.primitives import storage_view

    gen = torch.Generator().manual_seed(0)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]

    def weight(rows: int, cols: int) -> np.ndarray:
        return storage_view(torch.randn(rows, cols, generator=gen).mul_(0.02).to(tdtype), "w")[0]

    state = {"i": 0}
    if cls == "expert":
        (inter, hidden), = shapes
        sets = _copies([weight(inter, hidden), weight(inter, hidden), weight(hidden, inter)], working_set)
        experts = [k.ExpertWeights.from_torch(*s) for s in sets]

        def call_expert(x: np.ndarray) -> object:
            state["i"] = (state["i"] + 1) % len(experts)
            return k.expert_rows(x, experts[state["i"]])

        return call_expert, 3 * inter * hidden, "offloadkit.kernels.cpu.experts.expert_rows"
    sets = _copies([weight(*shape) for shape in shapes], working_set)
    params = sum(r * c for r, c in shapes)
    if cls == "qkv" and hasattr(k, "linear3"):
        def call_qkv(x: np.ndarray) -> object:
            state["i"] = (state["i"] + 1) % len(sets)
            return k.linear3(x, *sets[state["i"]])

        return call_qkv, params, "offloadkit.kernels.cpu.experts.linear3"

    def call_linear(x: np.ndarray) -> object:
        state["i"] = (state["i"] + 1) % len(sets)
        return [k.linear(x, w) for w in sets[state["i"]]]

    return call_linear, params, "offloadkit.kernels.cpu.experts.linear"


def sweep_class(cls: str, dtype: str, shapes: list[tuple[int, int]], tiny: list[tuple[int, int]], s: LaneSettings,
                working_set: int, backwards: bool = False) -> tuple[dict[int, tuple[float, float]], int, str]:
    """One sweep of a class over its token points: ``{tokens: (seconds of a call, of the same call on the
    tiny weights)}`` (medians of >= ``s.reps`` calls after a warm-up), its parameters and what it calls."""
    tokens = token_points(dtype, s.tokens)
    big, params, what = class_kernel(cls, dtype, shapes, working_set)
    small, _, _ = class_kernel(cls, dtype, tiny, 0)
    gen = torch.Generator().manual_seed(1)
    out = {}
    for n in (tokens[::-1] if backwards else tokens):
        x, xt = torch.randn(n, shapes[0][1], generator=gen).numpy(), torch.randn(n, tiny[0][1], generator=gen).numpy()
        out[n] = (typical_time(lambda x=x: big(x), s.reps, s.point_budget_s / s.rounds),
                  typical_time(lambda x=xt: small(x), s.reps, min(s.point_budget_s, 0.02) / s.rounds))
    return out, params, what


def class_curve(sweeps: list[dict[int, tuple[float, float]]]) -> tuple[list[int], list[float], list[float]]:
    """(tokens, whole-call seconds, net seconds) from a class's sweeps: per point the median over the sweeps
    (each a median already, taken minutes apart: what a call typically costs, as the engine is measured),
    made monotone."""
    tokens = sorted(sweeps[0])
    whole = [statistics.median(sw[n][0] for sw in sweeps) for n in tokens]
    net = [max(statistics.median(sw[n][0] - sw[n][1] for sw in sweeps), 0.05 * w)
           for n, w in zip(tokens, whole, strict=True)]
    return tokens, monotone(whole), monotone(net)


def peak_tflops(seconds: list[float], tokens: tuple[int, ...] | list[int], params: int) -> float:
    """The best FLOP rate along a curve, TFLOP/s (a matmul of n tokens is 2 n params FLOPs)."""
    return max(2 * n * params / t for n, t in zip(tokens, seconds, strict=True)) / 1e12


def monotone(seconds: list[float]) -> list[float]:
    """``seconds`` with every point lowered to the smallest at more tokens: a kernel is not slower with fewer
    tokens, so a point above a later one caught a stall of the shared machine (threads descheduled for a
    4 ms tick were seen here), not the kernel. ``[3, 1, 2] -> [1, 1, 2]``."""
    out, low = [], float("inf")
    for t in reversed(seconds):
        low = min(low, t)
        out.append(low)
    return out[::-1]


# ---- the attention core --------------------------------------------------------------------------------

def attention_call(heads: int, kv: int, dim: int, cap: int) -> tuple[Callable[[int, int], object], str]:
    """``call(tokens, length)``: the engine's attention kernel on ``tokens`` new queries ending at ``length``."""
    from offloadkit.kernels.cpu import norms_attention as na

    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, kv, cap, dim), dtype=np.float32)
    v = rng.standard_normal((1, kv, cap, dim), dtype=np.float32)
    queries: dict[int, np.ndarray] = {}
    token_major = hasattr(na, "attention_bthd")

    def call(tokens: int, length: int) -> object:
        if tokens not in queries:
            shape = (1, tokens, heads, dim) if token_major else (1, heads, tokens, dim)
            queries[tokens] = rng.standard_normal(shape, dtype=np.float32)
        q = queries[tokens]
        if token_major:
            return na.attention_bthd(q, k, v, length, length - tokens)
        return na.causal_attention(q, k, v, length, length - tokens)

    name = "attention_bthd" if token_major else "causal_attention"
    return call, f"offloadkit.kernels.cpu.norms_attention.{name}"


def measure_attention(s: LaneSettings) -> tuple[list[int], list[int], list[list[float]], str]:
    """(keys per query, head dims, GFLOP/s per head dim and key count) of the attention core, net of the call's
    own cost (one head, one key): what grows with heads and keys, per-query setup included, is in the rate."""
    heads, kv, _ = s.attention
    cap = max(*s.attention_decode, *s.attention_prefill)
    rows, what = [], ""
    for dim in s.attention_head_dims:
        call, what = attention_call(heads, kv, dim, cap)
        bare, _ = attention_call(1, 1, dim, 1)
        t0 = best_time(lambda bare=bare: bare(1, 1), s.reps, 0.02)  # the call alone: one head, one key
        points: dict[int, list[float]] = defaultdict(list)
        for length in s.attention_decode:
            t = typical_time(lambda n=length, c=call: c(1, n), s.reps, s.point_budget_s)
            points[length].append(4 * heads * dim * length / max(t - t0, 0.05 * t))
        for length in s.attention_prefill:
            t = typical_time(lambda n=length, c=call: c(n, n), s.reps, s.point_budget_s)
            pairs = length * (length + 1) // 2
            points[max(1, round(pairs / length))].append(4 * heads * dim * pairs / max(t - t0, 0.05 * t))
        keys = sorted(points)
        rows.append([statistics.fmean(points[x]) / 1e9 for x in keys])
    how = (f"{what}, {heads} heads, {kv} KV heads, head dims {', '.join(map(str, s.attention_head_dims))}: one "
           f"query over {', '.join(map(str, s.attention_decode))} positions and fresh prefills of "
           f"{', '.join(map(str, s.attention_prefill))}, median of >= {s.reps}, net of a one-head one-key call")
    return keys, list(s.attention_head_dims), rows, how


# ---- the whole lane ------------------------------------------------------------------------------------

def measure_lane(m: dict[str, Any], quick: bool, bar: Any = None) -> None:
    """Add the CPU lane's curves (``m["curves"]``), FLOP rates (``m["cpu"]``) and ``m["cpu_lane"]`` to a probe's
    raw measurements; ``m["cpu"]["dram_bandwidth_gbps"]`` must be there already."""
    from offloadkit.hardware.machine import machine_label
    from offloadkit.hardware.profile import CpuLaneProfile, Curve
    from offloadkit.plan.cpu_lane import CLASSES, CpuLanePrices, curve_key

    s = QUICK_LANE if quick else FULL_LANE
    working_set = 4 * last_level_cache_bytes()
    ws = f"copies rotating through {working_set // MIB} MiB (4x the last-level cache)"
    tiny = {cls: class_shapes(cls, 16, 64) for cls in CLASSES}

    def note(label: str, done: bool = False) -> None:
        if bar is not None:
            bar.update() if done else bar.set_postfix_str(label)

    early_attention = measure_attention(s)[2]
    curves: dict[str, Curve] = {}
    jobs = [(dtype, d, cls) for dtype in ("float32", "bfloat16") for d in s.widths for cls in CLASSES]
    sweeps: dict[tuple[str, int, str], list[dict[int, tuple[float, float]]]] = defaultdict(list)
    what: dict[str, str] = {}
    params: dict[tuple[str, int, str], int] = {}
    for r in range(s.rounds):  # every class once per round: a slow minute of the shared machine spoils one round
        for dtype, d, cls in jobs:
            note(f"CPU {cls} {dtype} at {d}, round {r + 1} of {s.rounds}")
            sweep, params[(dtype, d, cls)], what[cls] = sweep_class(cls, dtype, class_shapes(cls, d, s.wide_rows),
                                                                    tiny[cls], s, working_set, r % 2 == 1)
            sweeps[(dtype, d, cls)].append(sweep)
    for (dtype, d, cls), runs in sweeps.items():
        short = "f32" if dtype == "float32" else "bf16"
        tokens, whole, net = class_curve(runs)
        n_params = params[(dtype, d, cls)]
        dims = " + ".join(f"{r} x {k}" for r, k in class_shapes(cls, d, s.wide_rows))
        how = (f"{what[cls]} on {dims} ({cls}), {short} weights, {ws}, the median over {s.rounds} rounds of medians "
               f"of >= {s.reps} calls")
        key = curve_key(cls, dtype, d)
        m["curves"][key] = {"tokens": tokens, "seconds": net, "params": n_params,
                            "method": f"{how}, net of the same call on {tiny[cls]}"}
        curves[key] = Curve(key, tuple(tokens), tuple(t / n_params for t in net), n_params)
        if cls == "expert" and d == max(s.widths):
            m["curves"][f"cpu_expert_{short}"] = {"tokens": tokens, "seconds": whole, "params": n_params,
                                                  "method": f"{how}, whole calls"}
            m["cpu"][f"flops_{short}_tflops"] = peak_tflops(whole, tokens, n_params)
            m["methods"][f"cpu.flops_{short}_tflops"] = f"best FLOP rate of the cpu_expert_{short} curve ({how})"
    note("", True)
    note("attention core")
    keys, dims, gflops, attention_how = measure_attention(s)
    note("", True)
    if early_attention is not None:  # measured twice, minutes apart: their mean per point
        gflops = [[(a + b) / 2 for a, b in zip(r0, r1, strict=True)] for r0, r1 in zip(early_attention, gflops,
                                                                                         strict=True)]
        attention_how += "; the mean of two measurements minutes apart"
    note("CPU engine on tiny and mid-size models")
    read_bps = m["cpu"]["dram_bandwidth_gbps"] * 1e9

    def prices_for(spec: Any, floors: dict[str, float]) -> CpuLanePrices:  # the kernel work alone, floored
        lane = CpuLaneProfile("kernel work only", tuple(keys), tuple(map(tuple, gflops)), tuple(dims),
                              decode_ps=floors)
        return CpuLanePrices(lane, curves, spec, read_bps)

    engine = measure_engine(curves, prices_for, s.engine_steps, s.engine_prompt, s.engine_reps, s.engine_vocab)
    note("", True)
    m["cpu_lane"] = {
        "name": f"offloadkit CpuEngine on {machine_label()}", "attention_keys": keys, "attention_gflops": gflops,
        "attention_head_dims": dims, "task_us": engine.task_us, "task_hidden_ns": engine.task_hidden_ns,
        "element_ns": engine.element_ns, "decode_ps": engine.decode_ps,
        "methods": {"attention": attention_how, **engine.methods}}
