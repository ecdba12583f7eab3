"""A decode step's decoder layer in one compiled call, with its tasks timed inside: no Python between them.

Between the memory-bound passes of a decode step the CPU engine used to return to Python a dozen times
per layer (norms, RoPE, router, each expert), and every return cost its dispatch and glue on caches the
weights had just flushed: ~1.5 ms per token on ``bench-moe`` (8 layers), 7% of a step, measured
(issue 10). :func:`decode_layer` runs a whole layer for a few tokens in one call from Python, calling
the same kernels the separate path calls (:mod:`~offloadkit.kernels.cpu.decode`,
:mod:`~offloadkit.kernels.cpu.layer_ops`, :mod:`~offloadkit.kernels.cpu.norms_attention`), so the
numbers are the same and only the calls are fewer:

    attn_norm -> attn_qkv (QKV + biases + RoPE + cache write) -> attention -> attn_o (+= residual)
    -> ffn_norm -> router (MoE) -> expert e (each used expert, weighted, += residual) -> shared expert
    or, in a dense layer, ffn_norm -> ffn

The engine's timeline keeps one record per task: the call stamps each boundary with the CPU's cycle
counter (:func:`cycles`, LLVM's ``readcyclecounter``: ``rdtsc`` on x86, invariant on any CPU with
``constant_tsc``), and :class:`CycleClock` turns stamps into ``time.perf_counter`` seconds. Where the
counter does not tick (:func:`cycle_clock` returns None), the engine keeps its separate path.

What it refuses: prefill (many tokens: the GEMM path), PhiMoE's sparsemixer routing, and layers whose
weights mix dtypes; the engine sends those through its separate path. It checks nothing: the engine
passes arrays it made.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from offloadkit.kernels.cpu.decode import expert_parallel, expert_serial, rows_dot_parallel, rows_dot_range
from offloadkit.kernels.cpu.layer_ops import _qkv_rope_parallel, _qkv_rope_serial, _router_topk
from offloadkit.kernels.cpu.norms_attention import _attention_heads, _attention_parallel, _layer_rows, _rms_rows
from offloadkit.kernels.cpu.primitives import FAST

#: Stamps of a layer: start, attn_norm, attn_qkv, attention, attn_o, ffn_norm, router (or ffn), then one
#: per expert run and one for the shared expert.
FIXED_STAMPS = 7


@intrinsic
def cycles(typingctx):
    """The CPU's cycle counter (``llvm.readcyclecounter``; 0 where the target has none)."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])
    return types.int64(), codegen


@njit(nogil=True, cache=True)
def read_cycles() -> int:
    return cycles()


@dataclass(frozen=True)
class CycleClock:
    """The cycle counter's rate (``hz``), so that stamps become seconds: ``(stamp - start) / hz``."""

    hz: float


def _pair() -> tuple[float, float]:
    """(perf_counter, cycles) at one instant: the counter read on both sides of the clock, averaged."""
    c0 = int(read_cycles())
    p = time.perf_counter()
    c1 = int(read_cycles())
    return p, (c0 + c1) / 2


@functools.cache
def cycle_clock() -> CycleClock | None:
    """The counter's rate, measured against ``time.perf_counter`` over 20 ms (once per process); None where
    it does not tick steadily, and then the engine times its tasks from Python instead."""
    read_cycles()
    p0, c0 = _pair()
    time.sleep(0.02)
    p1, c1 = _pair()
    if c0 <= 0 or c1 <= c0:
        return None
    hz = (c1 - c0) / (p1 - p0)
    return CycleClock(hz) if 1e8 < hz < 1e11 else None


@njit(**FAST)
def _norm(x, w, b, eps, layer_norm, out):
    if layer_norm:
        _layer_rows(x, w, b, eps, out, 0, x.shape[0])
    else:
        _rms_rows(x, w, eps, out, 0, x.shape[0])


@njit(**FAST)
def _expert(x, w1, w3, w2, out, scale, n_up, n_down):
    if n_up > 0 or n_down > 0:
        expert_parallel(x, w1, w3, w2, 0, w1.shape[0], out, scale, max(n_up, 1), max(n_down, 1))
    else:
        expert_serial(x, w1, w3, w2, 0, w1.shape[0], out, scale)


@njit(**FAST)
def decode_layer(h, norm1_w, norm1_b, norm2_w, norm2_b, eps, layer_norm,
                 wq, wk, wv, qkv_bias, n_qkv, cos, sin, batch, start, k_cache, v_cache, window, par_attn,
                 wo, o_bias, n_o, heads, head_dim,
                 moe, router, top_k, normalize, w1s, w3s, w2s, n_up, n_down,
                 shared_w1, shared_w3, shared_w2, shared_gate,
                 experts, stamps, used, counts):
    """One layer on the residual stream ``h`` [N = batch x tokens, hidden] f32, in place; returns the
    number of experts run. ``stamps`` [FIXED_STAMPS + E + 1] receives the cycle counter at each task
    boundary, ``used`` / ``counts`` the experts run in order and their tokens, ``experts`` [N, k] the
    routing. ``n_*`` are parallel chunk counts (0: serial); dense layers pass ``moe=False`` and their FFN
    as the only entry of ``w1s`` / ``w3s`` / ``w2s``; ``shared_*`` are empty without a shared expert."""
    n, hidden = h.shape
    tokens = n // batch
    stamps[0] = cycles()
    x = np.empty_like(h)
    _norm(h, norm1_w, norm1_b, eps, layer_norm, x)
    stamps[1] = cycles()
    q = np.empty((batch, tokens, heads, head_dim), dtype=np.float32)
    qkv = np.empty((n, wq.shape[0] + wk.shape[0] + wv.shape[0]), dtype=np.float32)
    if n_qkv > 0:
        _qkv_rope_parallel(x, wq, wk, wv, qkv_bias, cos, sin, tokens, start, q, k_cache, v_cache, qkv, n_qkv)
    else:
        _qkv_rope_serial(x, wq, wk, wv, qkv_bias, cos, sin, tokens, start, q, k_cache, v_cache, qkv)
    stamps[2] = cycles()
    o = np.empty_like(q)
    if par_attn:
        _attention_parallel(q, k_cache, v_cache, start + tokens, start, window, o)
    else:
        _attention_heads(q, k_cache, v_cache, start + tokens, start, window, o, 0, batch * heads)
    stamps[3] = cycles()
    o2 = o.reshape((n, heads * head_dim))
    if n_o > 0:
        rows_dot_parallel(o2, wo, 0, h, True, n_o)
    else:
        rows_dot_range(o2, wo, 0, 0, wo.shape[0], h, True, 0)
    if o_bias.size:
        for t in range(n):
            for j in range(hidden):
                h[t, j] += o_bias[j]
    stamps[4] = cycles()
    _norm(h, norm2_w, norm2_b, eps, layer_norm, x)
    stamps[5] = cycles()
    if not moe:
        _expert(x, w1s[0], w3s[0], w2s[0], h, np.ones(n, dtype=np.float32), n_up, n_down)
        stamps[6] = cycles()
        return 0
    n_experts = router.shape[0]
    logits = np.empty((n, n_experts), dtype=np.float32)
    weights = np.empty((n, top_k), dtype=np.float32)
    _router_topk(x, router, top_k, normalize, logits, weights, experts)
    stamps[6] = cycles()
    n_used = 0
    if n == 1:  # a decode step: no gathering, each weighted output goes straight into the residual stream
        order = np.argsort(experts[0])
        for j in order:
            e = experts[0, j]
            _expert(x, w1s[e], w3s[e], w2s[e], h, weights[0, j:j + 1], n_up, n_down)
            used[n_used] = e
            counts[n_used] = 1
            n_used += 1
            stamps[FIXED_STAMPS - 1 + n_used] = cycles()
    else:
        token = np.empty(n, dtype=np.int64)
        scale = np.empty(n, dtype=np.float32)
        for e in range(n_experts):
            m = 0
            for t in range(n):
                for j in range(top_k):
                    if experts[t, j] == e:
                        token[m] = t
                        scale[m] = weights[t, j]
                        m += 1
            if m == 0:
                continue
            xe = np.empty((m, hidden), dtype=np.float32)
            for i in range(m):
                xe[i] = x[token[i]]
            ye = np.zeros((m, hidden), dtype=np.float32)
            _expert(xe, w1s[e], w3s[e], w2s[e], ye, scale[:m].copy(), n_up, n_down)
            for i in range(m):
                h[token[i]] += ye[i]
            used[n_used] = e
            counts[n_used] = m
            n_used += 1
            stamps[FIXED_STAMPS - 1 + n_used] = cycles()
    if shared_w1.shape[0] > 0:
        gate = np.zeros((n, 1), dtype=np.float32)
        rows_dot_range(x, shared_gate, 0, 0, 1, gate, False, 0)
        sig = np.empty(n, dtype=np.float32)
        for t in range(n):
            sig[t] = np.float32(1.0) / (np.float32(1.0) + np.exp(-gate[t, 0]))
        _expert(x, shared_w1, shared_w3, shared_w2, h, sig, n_up, n_down)
        stamps[FIXED_STAMPS + n_used] = cycles()
    return n_used




@njit(**FAST)
def decode_step(h, norm1_w, norm1_b, norm2_w, norm2_b, eps, layer_norm,
                wq, wk, wv, qkv_bias, cos, sin, batch, start, k_caches, v_caches, window, par_attn,
                wo, o_bias, heads, head_dim, moe, router, top_k, normalize, w1s, w3s, w2s,
                shared_w1, shared_w3, shared_w2, shared_gate, chunks, experts, stamps, used, counts, n_used):
    """Every layer of a decode step: :func:`decode_layer` for layer ``l`` with the ``l``-th entry of each
    per-layer list (typed lists of arrays; ``w1s`` etc. lists of lists), ``chunks[l]`` = (QKV, O, gate/up,
    down) parallel chunks, and the outputs in row ``l`` of ``experts``, ``stamps``, ``used``, ``counts``,
    ``n_used``. One call from Python per step: no Python between layers either."""
    for layer in range(len(wq)):
        n_used[layer] = decode_layer(
            h, norm1_w[layer], norm1_b[layer], norm2_w[layer], norm2_b[layer], eps, layer_norm,
            wq[layer], wk[layer], wv[layer], qkv_bias[layer], chunks[layer, 0], cos, sin, batch, start,
            k_caches[layer], v_caches[layer], window, par_attn, wo[layer], o_bias[layer], chunks[layer, 1], heads,
            head_dim, moe[layer], router[layer], top_k, normalize, w1s[layer], w3s[layer], w2s[layer],
            chunks[layer, 2], chunks[layer, 3], shared_w1[layer], shared_w3[layer], shared_w2[layer],
            shared_gate[layer], experts[layer], stamps[layer], used[layer], counts[layer])


__all__ = ["FIXED_STAMPS", "CycleClock", "cycle_clock", "cycles", "decode_layer", "decode_step", "read_cycles"]
