"""The price list of offloadkit's CPU engine: seconds per task, as the engine does the work.

The roofline of :mod:`offloadkit.plan.costmodel` prices a task from its bytes and FLOPs. Held against
the real CPU engine (:mod:`offloadkit.runtime.cpu_engine`) that was 1.2-2.8x too fast in prefill and up
to 4x in decode: a task is more than its matmul (docs/DESIGN.md, "Calibration"). Where a profile carries
a measured :class:`~offloadkit.hardware.profile.CpuLaneProfile`, every task on the ``cpu`` lane is priced
here instead, as the sum of measured terms:

    t(task) = fixed(kind) + fixed_per_hidden(kind) * hidden   # Python, dispatch, evicted caches: decode steps
            + element(kind) * (rows - 1) * hidden             # norms, RoPE, gathers, page faults: prompts
            + max(curve_class(rows), decode(kind)) * params   # the matmuls: net kernel time per shape class and
                                                              # dtype, floored by the engine's own read per weight
            + attention FLOPs / rate(keys per query)          # the attention core only

The matmul classes are the engine's kernel entry points measured by ``offloadkit profile`` (net of a
call's fixed cost, reading a working set beyond the last-level cache): ``qkv`` (``linear3``: Q, K and V
in one pass), ``linear`` (``linear`` on a square weight: the O projection), ``wide`` (the lm_head:
vocabulary x hidden), ``router`` (a handful of outputs) and ``expert`` (``expert_rows``: experts, dense
FFNs, Qwen's shared expert). The work the engine does outside any recorded task is priced as its own
items: ``host_step`` once per forward, ``host_layer`` / ``host_moe_layer`` once per layer.

What it refuses: nothing at run time (the cost model builds it only from a profile that has it); a kind
the profile has no figure for borrows a close kind's (:data:`FALLBACK`), or costs only its work, and a
class without a curve is priced at the profile's DRAM read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from offloadkit.hardware.profile import CpuLaneProfile, Curve
from offloadkit.model.dtypes import DTYPE_BYTES
from offloadkit.model.spec import ModelSpec

#: Curve class of each matmul-bearing task kind.
CLASS_OF = {"attn_qkv": "qkv", "attn_o": "linear", "router": "router", "shared_gate": "router",
            "expert": "expert", "ffn": "expert", "shared_expert": "expert", "lm_head": "wide"}
CLASSES = ("qkv", "linear", "wide", "router", "expert")
#: Kinds a profile may lack (measured on an engine or models without them), and the kind to borrow from.
FALLBACK = {"shared_expert": "expert", "shared_gate": "router", "final_norm": "attn_norm", "ffn_norm": "attn_norm",
            "qkv": "linear"}


def curve_key(cls: str, dtype: str, width: int) -> str:
    """``("linear", "bfloat16", 2048)`` -> ``"cpu_lane_linear_bf16_h2048"``: the profile curve of a class and
    weight dtype measured at hidden size ``width`` (f16 weights are widened like bf16 ones and share them)."""
    return f"cpu_lane_{cls}_{'f32' if dtype == 'float32' else 'bf16'}_h{width}"


def class_curves(curves: Mapping[str, Curve], cls: str, dtype: str) -> list[tuple[int, Curve]]:
    """``[(width, curve), ...]`` of a class and dtype, by width."""
    prefix = curve_key(cls, dtype, 0).removesuffix("0")
    return sorted((int(k[len(prefix):]), c) for k, c in curves.items()
                  if k.startswith(prefix) and k[len(prefix):].isdigit())


def params_of(spec: ModelSpec, kind: str) -> int:
    """Weights one task of ``kind`` multiplies in ``spec`` (an expert: one expert; the lm_head: the whole head)."""
    if kind == "lm_head":  # the head's weight (the embedding table's when tied) and its bias
        return spec.vocab_size * (spec.hidden_size + int(bool(spec.lm_head_bias)))
    for layer in range(spec.n_layers):
        for b in spec.layer_blocks(layer):
            if b.kind == kind:
                return b.params
    return 0


class CpuLanePrices:
    """Seconds of each task of the CPU engine for one (profile, model); see the module docstring.

    ``curves`` maps :func:`curve_key` names to net per-parameter curves; a class without one costs its
    weight bytes at ``read_bps``. Everything is resolved here, once, into floats and dicts.
    """

    def __init__(self, lane: CpuLaneProfile, curves: Mapping[str, Curve], spec: ModelSpec, read_bps: float) -> None:
        self.lane, self.spec = lane, spec
        self.weight_bytes = float(DTYPE_BYTES[spec.dtype])
        self.curves = {cls: class_curves(curves, cls, spec.dtype) or class_curves(curves, FALLBACK.get(cls, cls),
                                                                                    spec.dtype)
                       for cls in CLASSES}
        self.read_bps = read_bps
        h = spec.hidden_size
        self.fixed = {k: v * 1e-6 + lane.task_hidden_ns.get(k, 0.0) * 1e-9 * h for k, v in lane.task_us.items()}
        self.element = {k: v * 1e-9 * h for k, v in lane.element_ns.items()}  # seconds per further row
        suffix = "_f32" if spec.dtype == "float32" else "_bf16"
        self.floor = {k.removesuffix(suffix): v * 1e-12 for k, v in lane.decode_ps.items() if k.endswith(suffix)}
        self.attn_flops_per_pair = 4.0 * spec.n_heads * spec.head_dim

    # ---- the terms ------------------------------------------------------------------------------------

    def overhead_s(self, kind: str, rows: int) -> float:
        """The fixed cost of a task of ``kind`` over ``rows`` rows (one row: its decode-step cost; each further
        row: its element cost times the hidden size), a close kind's where ``kind`` has no figures."""
        k = kind if kind in self.fixed else FALLBACK.get(kind, kind)
        return self.fixed.get(k, 0.0) + self.element.get(k, 0.0) * max(rows - 1, 0)

    def matmul_s(self, cls: str, params: float, rows: int) -> float:
        """Net kernel time of ``params`` weights of class ``cls`` applied to ``rows`` rows: the class's curves
        at the two measured widths around the model's hidden size, interpolated in log scale (a GEMM's time
        per weight depends on its inner dimension), the nearest one beyond them."""
        if rows <= 0 or params <= 0:
            return 0.0
        curves = self.curves.get(cls)
        if not curves:
            return params * self.weight_bytes / self.read_bps
        h = self.spec.hidden_size
        hi = next((i for i, (w, _) in enumerate(curves) if w >= h), len(curves) - 1)
        lo = max(hi - 1, 0) if curves[hi][0] > h else hi
        (w0, c0), (w1, c1) = curves[lo], curves[hi]
        y0, y1 = c0.seconds_per_param_at(rows), c1.seconds_per_param_at(rows)
        if w0 == w1 or h <= w0:
            return y0 * params
        f = min(1.0, (math.log(h) - math.log(w0)) / (math.log(w1) - math.log(w0)))
        return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0))) * params

    def work_s(self, kind: str, rows: int, params: float = 0.0) -> float:
        """A task's matmul: its class's curve over ``params`` weights, never below the engine's own read of
        them (``decode_ps``, where measured); nothing for kinds without a matmul."""
        cls = CLASS_OF.get(kind)
        if cls is None or rows <= 0:
            return 0.0
        return max(self.matmul_s(cls, params, rows), self.floor.get(kind, 0.0) * params)

    def attention_work_s(self, tokens: int, pairs: int, batch: int = 1) -> float:
        """The attention core's kernel time: its FLOPs at the measured rate for its keys per query
        (``pairs``: visible (query, key) pairs per sequence)."""
        if tokens <= 0:
            return 0.0
        rate = self.lane.attention_flop_rate(pairs / tokens, self.spec.head_dim)
        return batch * self.attn_flops_per_pair * pairs / rate

    # ---- whole tasks ------------------------------------------------------------------------------------

    def task_s(self, kind: str, rows: int, params: float = 0.0) -> float:
        """Seconds of one task of ``kind`` over ``rows`` rows (an expert's tokens; the positions the final
        norm and lm_head compute) with ``params`` weights; ``host_*`` kinds are the work between tasks."""
        return self.overhead_s(kind, rows) + self.work_s(kind, rows, params)

    def attention_s(self, tokens: int, pairs: int, batch: int = 1) -> float:
        """Seconds of the ``attention`` task of ``tokens`` queries per sequence."""
        return self.overhead_s("attention", batch * tokens) + self.attention_work_s(tokens, pairs, batch)


__all__ = ["CLASSES", "CLASS_OF", "FALLBACK", "CpuLanePrices", "class_curves", "curve_key", "params_of"]
