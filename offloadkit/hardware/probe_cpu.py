"""The CPU lane's part of ``offloadkit profile``: offloadkit's own kernels and engine, timed as the engine runs them.

The simulator prices offloadkit's CPU engine from these figures (:mod:`offloadkit.plan.cpu_lane`), so they
are measured on the engine's code, not on stand-ins, and follow the engine when it changes:

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
- **the engine's own costs**, from :class:`~offloadkit.runtime.cpu_engine.CpuEngine` itself on probe models
  (:data:`ENGINES`: MoE and dense, hidden 512 and 1024, one and two layers): each task's time beyond its
  priced kernel work in decode steps is its fixed cost (``a + c * hidden`` through the two widths; for the
  kinds that stream their weights, the whole call per weight on the widest models: the engine's own read);
  a forward's wall time minus its tasks, across the layer counts, is the work outside any task per step
  and per layer; prompts against one-token forwards on the wider models give each task's cost per row
  and hidden unit (norms, RoPE, gathers, page faults of fresh arrays).

What it refuses: nothing beyond the probe's rule (``build_profile`` refuses non-positive figures).
"""

from __future__ import annotations

import inspect
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

MIB = 2**20


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


# ---- the engine's own costs ------------------------------------------------------------------------------

#: The models the engine's own costs are measured on: (architecture, hidden, layers). Two widths give each
#: cost's growth with the hidden size, two layer counts the work outside tasks per layer; the widest runs
#: the prompts. Their experts and FFNs are wide (4-8x hidden), so every step streams weights through the
#: caches as real models do: a task's fixed cost measured with the interpreter's data in cache was half of
#: what it costs between two matmuls that evict it (measured on a 2-core AMD EPYC). Not narrower than 512:
#: at hidden 256 the decode kernels' rows are short and read at half the rate (measured), which no
#: benchmark model shares.
ENGINES = (("mixtral", 512, 1), ("mixtral", 512, 2), ("mixtral", 1024, 2),
           ("llama", 512, 1), ("llama", 512, 2), ("llama", 1024, 2))
HOST_KIND = {"mixtral": "host_moe_layer", "llama": "host_layer"}


def probe_spec(arch: str, hidden: int, layers: int, vocab: int, dtype: str = "bfloat16") -> Any:
    """A probe model: heads of 64 (4 per KV head), 4 experts of 8 x hidden (top-2) or an FFN of 16 x hidden
    up to 4096 / 8192 wide, bf16 (f32 for the f32 read)."""
    from offloadkit.model.spec import ModelSpec
    from offloadkit.model.writer import make_config

    inter = min(16 * hidden, 4096) if arch == "mixtral" else min(32 * hidden, 8192)
    heads = hidden // 64
    config = make_config(arch, layers=layers, hidden=hidden, heads=heads, kv_heads=max(1, heads // 4), experts=4,
                         top_k=2, intermediate=inter, vocab=vocab, dtype=dtype)
    return ModelSpec.from_config(config, name=f"probe-{arch}-{hidden}x{layers}-{dtype}")


@dataclass
class _Step:
    """One measured forward: its wall time, tokens, cached positions before it, and its task records."""

    wall_s: float
    tokens: int
    past: int
    records: list[Any]


class _Runner:
    """The CPU engine on a random-weight ``spec``, every forward timed from outside and its records kept."""

    def __init__(self, spec: Any) -> None:
        from offloadkit.model.writer import random_weights
        from offloadkit.runtime.cpu_engine import CpuEngine

        self.spec = spec
        self.engine = CpuEngine(spec, random_weights(spec, seed=0))
        self.kw = {"logits": "last"} if "logits" in inspect.signature(self.engine.forward).parameters else {}
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, n: int, cache: Any) -> _Step:
        ids = torch.randint(3, self.spec.vocab_size, (1, n), generator=self.gen)
        past = cache.length
        t0 = time.perf_counter()
        self.engine.forward(ids, cache, **self.kw)
        wall = time.perf_counter() - t0
        tl = self.engine.timeline
        return _Step(wall, n, past, list(tl.select(step=tl.steps()[-1])))

    def decode(self, steps: int) -> list[_Step]:
        """Two passes of a one-token forward and ``steps`` decode steps; the second pass's decode steps."""
        out: list[_Step] = []
        for _ in range(2):
            cache = self.engine.new_cache(1, steps + 1)
            self.forward(1, cache)
            out = [self.forward(1, cache) for _ in range(steps)]
        return out

    def fresh(self, sizes: tuple[int, ...], reps: int) -> dict[int, list[_Step]]:
        """``reps`` fresh forwards of each size, interleaved (after one warm-up round)."""
        out: dict[int, list[_Step]] = {n: [] for n in sizes}
        for _ in range(reps + 1):
            for n in sizes:
                out[n].append(self.forward(n, self.engine.new_cache(1, n)))
        return {n: v[1:] for n, v in out.items()}


def record_rows(record: Any, spec: Any, step_tokens: int) -> int:
    """Rows one engine task computed: an expert's tokens and the lm_head's positions from their FLOPs."""
    if record.kind == "expert" and record.flops:
        return max(1, round(record.flops / (6 * spec.hidden_size * spec.expert_intermediate_size)))
    if record.kind == "lm_head" and record.flops:
        return max(1, round(record.flops / (2 * spec.hidden_size * spec.vocab_size)))
    return step_tokens


def _residuals(step: _Step, prices: Any, spec: Any) -> dict[str, tuple[int, float, int]]:
    """Per kind: (calls, seconds beyond the priced kernel work, rows) of one measured step (the final norm
    computes the lm_head's rows)."""
    from offloadkit.plan.cpu_lane import params_of

    head_rows = next((record_rows(r, spec, step.tokens) for r in step.records if r.kind == "lm_head"), step.tokens)
    out: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    for r in step.records:
        n = head_rows if r.kind == "final_norm" else record_rows(r, spec, step.tokens)
        if r.kind == "attention":
            work = prices.attention_work_s(n, n * step.past + n * (n + 1) // 2)
        else:
            work = prices.work_s(r.kind, n, params_of(spec, r.kind))
        acc = out[r.kind]
        acc[0] += 1
        acc[1] += (r.end_s - r.start_s) - work
        acc[2] += n
    return {k: (int(v[0]), float(v[1]), int(v[2])) for k, v in out.items()}


def _outside(step: _Step) -> float:
    return step.wall_s - sum(r.end_s - r.start_s for r in step.records)


def _line(points: dict[int, list[float]]) -> tuple[float, float]:
    """``(a, c)`` of ``a + c * hidden`` through the medians at the smallest and largest hidden size (c >= 0)."""
    lo, hi = min(points), max(points)
    y0, y1 = statistics.median(points[lo]), statistics.median(points[hi])
    c = max(0.0, (y1 - y0) / (hi - lo)) if hi > lo else 0.0
    return max(0.0, y0 - c * lo), c


#: Kinds whose decode cost is the engine's own read per weight (the floor of the kernel curve), all the call
#: included: a matmul that streams its weights. The rest are ``a + c * hidden`` beyond their priced work.
STREAMING = ("attn_qkv", "attn_o", "expert", "ffn", "lm_head")


def fixed_costs(decode: dict[tuple[str, int, int], list[_Step]], specs: dict[tuple[str, int, int], Any],
                prices_for: Callable[[Any], Any]) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per task kind, from the decode steps at two widths (medians): ``task_us`` and ``task_hidden_ns`` of its
    fixed cost per call, ``a + c * hidden``, beyond its priced kernel work; for the :data:`STREAMING` kinds
    the whole call's seconds per weight on the widest models instead (``decode_ps``, picoseconds per
    parameter: the engine's own read, which floors the kernel curve); and the work outside tasks per step
    (``host_step``) and per layer."""
    from offloadkit.plan.cpu_lane import params_of

    per_call: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    outside: dict[tuple[str, int, int], float] = {}
    for key, steps in decode.items():
        spec = specs[key]
        prices = prices_for(spec)
        for st in steps:
            for kind, (calls, extra, _) in _residuals(st, prices, spec).items():
                # streaming kinds: the whole call (the kernel's priced work added back), by its weight count
                group = params_of(spec, kind) if kind in STREAMING else spec.hidden_size
                back = prices.work_s(kind, 1, params_of(spec, kind)) * calls if kind in STREAMING else 0.0
                per_call[kind][group].append((extra + back) / calls)
        outside[key] = statistics.median(_outside(st) for st in steps)
    lines = {kind: _line(points) for kind, points in per_call.items() if kind not in STREAMING}
    decode_ps = {}
    for kind in STREAMING:  # the whole call per weight on the widest probe models, no fixed part: a line
        if kind in per_call:  # through two sizes extrapolated badly (a smaller weight reads faster per byte)
            params = max(per_call[kind])
            decode_ps[kind] = statistics.median(per_call[kind][params]) / params * 1e12
            lines[kind] = (0.0, 0.0)
    host_step = []
    for arch, kind in HOST_KIND.items():  # (arch, narrow, 1), (arch, narrow, 2), (arch, wide, 2): see ENGINES
        h0, h1 = min(h for a, h, _ in outside if a == arch), max(h for a, h, _ in outside if a == arch)
        layer0 = outside[(arch, h0, 2)] - outside[(arch, h0, 1)]
        step = outside[(arch, h0, 1)] - layer0
        lines[kind] = _line({h0: [layer0], h1: [(outside[(arch, h1, 2)] - step) / 2]})
        host_step.append(step)
    lines["host_step"] = (max(0.0, statistics.fmean(host_step)), 0.0)
    return ({k: a * 1e6 for k, (a, _) in lines.items()}, {k: c * 1e9 for k, (_, c) in lines.items()}, decode_ps)


def element_costs(fresh: dict[tuple[str, int, int], dict[int, list[_Step]]], specs: dict[tuple[str, int, int], Any],
                  prices_for: Callable[[Any], Any]) -> dict[str, float]:
    """Nanoseconds per extra row and hidden unit of every task kind (and of the work outside tasks, per
    layer): prompt forwards against one-token forwards, beyond the priced kernel work."""
    per_elem: dict[str, list[float]] = defaultdict(list)
    for key, by_size in fresh.items():
        spec = specs[key]
        prices = prices_for(spec)
        h = spec.hidden_size
        for a, b in zip(by_size[1], by_size[max(by_size)], strict=True):
            ra, rb = _residuals(a, prices, spec), _residuals(b, prices, spec)
            for kind in (rb.keys() & ra.keys()) - set(STREAMING):  # a matmul's per-row cost is its curve's
                (ca, ea, ta), (cb, eb, tb) = ra[kind], rb[kind]
                extra_rows = tb - cb * ta / ca
                if extra_rows > 0:
                    per_elem[kind].append((eb - cb * ea / ca) / extra_rows / h)
            per_elem[HOST_KIND[key[0]]].append((_outside(b) - _outside(a)) / (b.tokens - a.tokens) / h /
                                               spec.n_layers)
    return {k: max(0.0, statistics.median(v)) * 1e9 for k, v in per_elem.items()}


def decode_floors(bf16_ps: dict[str, float], curves: dict[str, Any], f32_steps: list[tuple[Any, list[_Step]]],
                  prices_for: Callable[[Any], Any]) -> dict[str, float]:
    """``{kind_bf16: ps, kind_f32: ps}``: the engine's read per weight at one token, the whole call included:
    bf16 from :func:`fixed_costs`, f32 from the widest probe models again with f32 weights. A figure the noise
    spoilt (below half its curve's one-token point) is left out, and its kind priced by its curve."""
    from offloadkit.plan.cpu_lane import CLASS_OF, curve_key, params_of

    out = {}
    width = min(int(k.rsplit("_h", 1)[1]) for k in curves)
    for kind, ps in bf16_ps.items():
        cb = curves.get(curve_key(CLASS_OF[kind], "bfloat16", width))
        if cb is not None and ps >= 0.5 * cb.seconds_per_param[0] * 1e12:
            out[f"{kind}_bf16"] = ps
    per_weight: dict[str, list[float]] = defaultdict(list)
    for spec, steps in f32_steps:
        prices = prices_for(spec)
        for st in steps:
            for kind, (calls, extra, _) in _residuals(st, prices, spec).items():
                if kind in bf16_ps:
                    params = params_of(spec, kind)
                    whole = (extra + prices.work_s(kind, 1, params) * calls) / calls
                    per_weight[kind].append(whole / params * 1e12)
    for kind, values in per_weight.items():
        if f"{kind}_bf16" in out:
            out[f"{kind}_f32"] = max(statistics.median(values), out[f"{kind}_bf16"])
    return out


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
            m["cpu"][f"flops_{short}_tflops"] = max(2 * n * n_params / t for n, t in zip(tokens, whole,
                                                                                            strict=True)) / 1e12
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
    floors: dict[str, float] = {}

    def prices_for(spec: Any) -> CpuLanePrices:  # the kernel work alone (no fixed costs), floored once measured
        lane = CpuLaneProfile("kernel work only", tuple(keys), tuple(map(tuple, gflops)), tuple(dims),
                              decode_ps=floors)
        return CpuLanePrices(lane, curves, spec, read_bps)

    specs = {key: probe_spec(*key, s.engine_vocab) for key in ENGINES}
    widest = max(ENGINES, key=lambda k: (k[1], k[2]))
    decode, fresh = {}, {}
    for key in ENGINES:
        runner = _Runner(specs[key])
        decode[key] = runner.decode(s.engine_steps)
        if key[1:] == widest[1:]:
            fresh[key] = runner.fresh((1, s.engine_prompt), s.engine_reps)
    task_us, hidden_ns, measured = fixed_costs(decode, specs, prices_for)
    f32_specs = [probe_spec(a, h, n, s.engine_vocab, "float32") for a, h, n in ENGINES if (h, n) == widest[1:]]
    f32_steps = [(spec, _Runner(spec).decode(s.engine_steps)) for spec in f32_specs]
    floors.update(decode_floors(measured, curves, f32_steps, prices_for))
    element_ns = element_costs(fresh, specs, prices_for)
    note("", True)
    shapes_text = ", ".join(f"{a} hidden {h} x{n}" for a, h, n in ENGINES)
    m["cpu_lane"] = {
        "name": f"offloadkit CpuEngine on {machine_label()}", "attention_keys": keys, "attention_gflops": gflops,
        "attention_head_dims": dims,
        "task_us": task_us, "task_hidden_ns": hidden_ns, "element_ns": element_ns, "decode_ps": dict(floors),
        "methods": {"attention": attention_how,
                    "task_us": f"CpuEngine on bf16 probe models ({shapes_text} layers; vocabulary {s.engine_vocab}):"
                               f" median over {s.engine_steps} decode steps of each task's time beyond its priced "
                               f"kernel work, a + c * hidden through the two widths (a); host_*: a forward's wall time "
                               f"minus its tasks, per step and per layer",
                    "task_hidden_ns": "the same, c (nanoseconds per hidden unit)",
                    "decode_ps": "the same decode steps on the widest probe models, in bf16 and again with f32 "
                                 "weights: a whole call of the attention projections, experts, FFNs and lm_head, "
                                 "in picoseconds per weight",
                    "element_ns": f"the widest probe models: median over {s.engine_reps} fresh "
                                  f"{s.engine_prompt}-token forwards against fresh 1-token ones, per extra row and "
                                  f"hidden unit beyond the priced kernel work"}}
