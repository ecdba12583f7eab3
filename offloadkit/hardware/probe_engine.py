"""The CPU engine's own costs: what :class:`~offloadkit.runtime.cpu_engine.CpuEngine` spends beyond its kernels.

A kernel curve (:mod:`offloadkit.hardware.probe_cpu`) prices one call of one kernel, timed alone in a loop.
The engine does more per forward than call kernels: every task (norms, RoPE, the router, gathers and
scatters of expert rows, fresh arrays and their page faults) has a fixed cost and a cost per row, the
forward has work between its tasks (per step and per layer), and a one-token matmul between two others
that evicted the caches reads its weights at the engine's own rate, not the loop's. None of that is in a
curve, and the fixed costs cannot be timed in a loop either (with the interpreter's data in cache they were
half of what they cost between two matmuls, see :data:`ENGINES`), so this module runs the real engine on
small random-weight probe models (:data:`ENGINES`) and fits each cost against the kernel work the simulator
already prices (:class:`~offloadkit.plan.cpu_lane.CpuLanePrices` on the curves, without fixed costs):

- **fixed costs** (:func:`fixed_costs`): each task's time beyond its priced kernel work in decode steps,
  ``a + c * hidden`` through the two widths; for the kinds that stream their weights (:data:`STREAMING`)
  the whole call per weight on the widest models instead: the engine's own read, which floors the curve;
  a forward's wall time minus its tasks, across the layer counts, is the work outside any task per step
  and per layer;
- **decode floors** (:func:`decode_floors`): the same read again with f32 weights;
- **costs per row** (:func:`element_costs`): prompts against one-token forwards on the widest models, per
  extra row and hidden unit.

:func:`measure_engine` runs all of it for :func:`offloadkit.hardware.probe_cpu.measure_lane`, which owns
the curves and the attention rates these costs are net of (it imports this module, never the reverse).
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

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


# ---- the whole measurement -----------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineCosts:
    """The engine's own costs as ``[cpu_lane]`` tables (:data:`offloadkit.hardware.profile.LANE_TABLES`), and
    how each table was measured."""

    task_us: dict[str, float]
    task_hidden_ns: dict[str, float]
    element_ns: dict[str, float]
    decode_ps: dict[str, float]
    methods: dict[str, str]


def measure_engine(curves: dict[str, Any], prices_for: Callable[[Any, dict[str, float]], Any], steps: int,
                   prompt: int, reps: int, vocab: int) -> EngineCosts:
    """Run the CPU engine on every probe model (:data:`ENGINES`, vocabulary ``vocab``): ``steps`` decode steps
    per pass, ``reps`` fresh ``prompt``-token forwards on the widest, the widest again with f32 weights; and
    fit its costs. ``prices_for(spec, decode_ps)`` prices ``spec``'s kernel work alone (the curves, no fixed
    costs), floored by the decode floors measured so far (``decode_ps``, filled in between the fits)."""
    floors: dict[str, float] = {}

    def priced(spec: Any) -> Any:
        return prices_for(spec, floors)

    specs = {key: probe_spec(*key, vocab) for key in ENGINES}
    widest = max(ENGINES, key=lambda k: (k[1], k[2]))
    decode, fresh = {}, {}
    for key in ENGINES:
        runner = _Runner(specs[key])
        decode[key] = runner.decode(steps)
        if key[1:] == widest[1:]:
            fresh[key] = runner.fresh((1, prompt), reps)
    task_us, hidden_ns, measured = fixed_costs(decode, specs, priced)
    f32_specs = [probe_spec(a, h, n, vocab, "float32") for a, h, n in ENGINES if (h, n) == widest[1:]]
    f32_steps = [(spec, _Runner(spec).decode(steps)) for spec in f32_specs]
    floors.update(decode_floors(measured, curves, f32_steps, priced))
    element_ns = element_costs(fresh, specs, priced)
    shapes_text = ", ".join(f"{a} hidden {h} x{n}" for a, h, n in ENGINES)
    methods = {"task_us": f"CpuEngine on bf16 probe models ({shapes_text} layers; vocabulary {vocab}):"
                          f" median over {steps} decode steps of each task's time beyond its priced "
                          f"kernel work, a + c * hidden through the two widths (a); host_*: a forward's wall time "
                          f"minus its tasks, per step and per layer",
               "task_hidden_ns": "the same, c (nanoseconds per hidden unit)",
               "decode_ps": "the same decode steps on the widest probe models, in bf16 and again with f32 "
                            "weights: a whole call of the attention projections, experts, FFNs and lm_head, "
                            "in picoseconds per weight",
               "element_ns": f"the widest probe models: median over {reps} fresh "
                             f"{prompt}-token forwards against fresh 1-token ones, per extra row and "
                             f"hidden unit beyond the priced kernel work"}
    return EngineCosts(task_us, hidden_ns, element_ns, dict(floors), methods)


__all__ = ["ENGINES", "HOST_KIND", "STREAMING", "EngineCosts", "decode_floors", "element_costs", "fixed_costs",
           "measure_engine", "probe_spec", "record_rows"]
