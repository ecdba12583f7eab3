"""The CPU engine's one-call decode: a layer, or a whole step, as one compiled call, and its task records.

A decode step of a MoE model is dozens of small tasks; called one by one from Python they cost
~4.8 ms per token of fixed overhead on an 8-layer model (issue 10, measured), llama.cpp ~0.5 ms.
:func:`~offloadkit.kernels.cpu.decode_layer.decode_layer` and ``decode_step`` run a layer, or every
layer, inside one Numba call that stamps each task boundary with the CPU's cycle counter. This module
is the engine's side of those calls:

- :func:`run_layer` and :func:`run_step` pass a :class:`~offloadkit.runtime.cpu_weights.LayerWeights`'
  fixed arguments (or :func:`step_lists`, the same per layer as typed lists) with the step's
  activations, and return the routing and the stamps;
- :func:`layer_records` turns one layer's stamps into the measured
  :class:`~offloadkit.runtime.timeline.TaskRecord` s the separate path would have recorded (same names,
  kinds, bytes and FLOPs), so a timeline does not depend on the path that made it.

The engine decides when the path applies (:class:`~offloadkit.runtime.cpu_engine.CpuEngine`:
a steady cycle counter, decode-sized token counts, every layer fusable).
"""

from __future__ import annotations

import numpy as np
from numba.typed import List as NumbaList

from offloadkit.kernels.cpu.decode_layer import FIXED_STAMPS, decode_layer, decode_step
from offloadkit.kernels.cpu.norms_attention import _PARALLEL_ATTENTION_MACS
from offloadkit.model.spec import ModelSpec
from offloadkit.runtime.cpu_weights import HostWeights, LayerWeights
from offloadkit.runtime.timeline import TaskRecord

#: (experts [.., n, k], stamps [.., width], used [.., E], counts [.., E], n_used) of a call
CallResult = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, "int | np.ndarray"]


def _parallel_attention(spec: ModelSpec, n: int, keys: int, threads: int) -> bool:
    return threads > 1 and n * spec.n_heads * spec.head_dim * keys >= _PARALLEL_ATTENTION_MACS


def run_layer(spec: ModelSpec, lw: LayerWeights, eps: np.float32, h: np.ndarray, b: int, t: int, start: int,
              k_all: np.ndarray, v_all: np.ndarray, cos: np.ndarray, sin: np.ndarray, threads: int) -> CallResult:
    """Layer ``lw`` on the residual stream ``h`` [b * t, hidden] in place, as one :func:`decode_layer` call."""
    s, n = spec, h.shape[0]
    norm_b, qkv_bias, o_bias, router, w1s, w3s, w2s, sh1, sh3, sh2, shg = lw.fused
    n_qkv, n_o, n_up, n_down = HostWeights.fused_chunks(lw, n, threads)
    k = max(s.top_k, 1)
    experts = np.empty((n, k), dtype=np.int64)
    stamps = np.zeros(FIXED_STAMPS + s.n_experts + 1, dtype=np.int64)
    used = np.empty(max(s.n_experts, 1), dtype=np.int64)
    counts = np.empty_like(used)
    n_used = decode_layer(h, lw.attn_norm.weight, norm_b[0], lw.ffn_norm.weight, norm_b[1], eps,
                          lw.attn_norm.bias is not None, lw.wq, lw.wk, lw.wv, qkv_bias, n_qkv, cos, sin, b, start,
                          k_all, v_all, s.sliding_window or 0, _parallel_attention(s, n, start + t, threads), lw.wo,
                          o_bias, n_o, s.n_heads, s.head_dim, lw.dense is None, router, k, s.norm_topk_prob, w1s, w3s,
                          w2s, n_up, n_down, sh1, sh3, sh2, shg, experts, stamps, used, counts)
    return experts, stamps, used, counts, n_used


def step_lists(layers: list[LayerWeights]) -> tuple | bool:
    """``decode_step``'s per-layer weight lists, or False where a layer needs the separate path or the
    layers' arrays do not share types (typed lists hold one type: one dtype across layers)."""
    if not all(lw.fused is not None for lw in layers) or len({lw.wq.dtype for lw in layers}) != 1:
        return False
    f = [lw.fused for lw in layers]
    return (NumbaList([lw.attn_norm.weight for lw in layers]), NumbaList([x[0][0] for x in f]),
            NumbaList([lw.ffn_norm.weight for lw in layers]), NumbaList([x[0][1] for x in f]),
            *(NumbaList([getattr(lw, w) for lw in layers]) for w in ("wq", "wk", "wv", "wo")),
            *(NumbaList([x[i] for x in f]) for i in range(1, 11)),
            np.array([lw.dense is None for lw in layers]))


def run_step(spec: ModelSpec, lists: tuple, chunks: np.ndarray, eps: np.float32, h: np.ndarray, b: int, t: int,
             start: int, k_list: NumbaList, v_list: NumbaList, cos: np.ndarray, sin: np.ndarray,
             threads: int) -> CallResult:
    """Every layer on ``h`` in place, as one ``decode_step`` call; results carry a leading layer axis."""
    s, n, n_layers = spec, h.shape[0], spec.n_layers
    (n1w, n1b, n2w, n2b, wq, wk, wv, wo, qkv_bias, o_bias, router, w1s, w3s, w2s, sh1, sh3, sh2, shg, moe) = lists
    k = max(s.top_k, 1)
    experts = np.empty((n_layers, n, k), dtype=np.int64)
    stamps = np.zeros((n_layers, FIXED_STAMPS + s.n_experts + 1), dtype=np.int64)
    used = np.empty((n_layers, max(s.n_experts, 1)), dtype=np.int64)
    counts = np.empty_like(used)
    n_used = np.zeros(n_layers, dtype=np.int64)
    decode_step(h, n1w, n1b, n2w, n2b, eps, s.norm_kind == "layer", wq, wk, wv, qkv_bias, cos, sin, b, start,
                k_list, v_list, s.sliding_window or 0, _parallel_attention(s, n, start + t, threads), wo, o_bias,
                s.n_heads, s.head_dim, moe, router, k, s.norm_topk_prob, w1s, w3s, w2s, sh1, sh3, sh2, shg, chunks,
                experts, stamps, used, counts, n_used)
    return experts, stamps, used, counts, n_used


def layer_records(spec: ModelSpec, lw: LayerWeights, layer: int, step: int, b: int, t: int, start: int, c0: int,
                  hz: float, stamps: np.ndarray, used: np.ndarray, counts: np.ndarray,
                  n_used: int) -> list[TaskRecord]:
    """The task records of one layer's call, from its cycle stamps (``c0``: the timeline's start, ``hz``)."""
    s, n, d = spec, b * t, spec.hidden_size
    at = [(int(c) - c0) / hz for c in np.maximum.accumulate(stamps)]  # monotonic even if the thread migrated
    keys = start + t
    tasks = [("attn_norm", "attn_norm", 4 * d, 0), ("attn_qkv", "attn_qkv", lw.qkv_bytes, 2 * n * lw.qkv_params),
             ("attention", "attention", b * 2 * keys * s.n_kv_heads * s.head_dim * 4,
              b * 4 * t * keys * s.n_heads * s.head_dim),
             ("attn_o", "attn_o", lw.o_bytes, 2 * n * lw.o_params), ("ffn_norm", "ffn_norm", 4 * d, 0)]
    if lw.dense is not None:
        tasks.append(("ffn", "ffn", lw.dense.nbytes, 6 * n * d * lw.dense.intermediate))
    else:
        tasks.append(("router", "router", lw.router.nbytes, 2 * n * d * s.n_experts))
        for e, m in zip(used[:n_used], counts[:n_used], strict=True):
            ew = lw.experts[int(e)]
            tasks.append((f"expert {int(e)}", "expert", ew.nbytes, 6 * int(m) * ew.hidden * ew.intermediate))
        if lw.shared is not None:
            tasks.append(("shared_expert", "shared_expert", lw.shared.nbytes + lw.shared_gate.nbytes,
                          6 * n * lw.shared.hidden * lw.shared.intermediate))
    return [TaskRecord("cpu", name, at[i], at[i + 1], layer, kind, bytes_, flops, step)
            for i, (name, kind, bytes_, flops) in enumerate(tasks)]


__all__ = ["layer_records", "run_layer", "run_step", "step_lists"]
