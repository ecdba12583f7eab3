"""The glue of a decoder layer as kernels: RoPE with the KV-cache write, and the router's softmax top-k.

Between its matrix products a decode step does a dozen small things per layer: add the QKV biases,
rotate Q and K, copy K and V into the cache, turn the router's logits into expert weights, group the
tokens by expert. Each is a few thousand numbers, so in torch each costs its dispatch (5-40 µs, and an
allocation), which summed to ~2 ms per token on an 8-layer model (issue 10: ~4.5 ms of fixed cost per
token against llama.cpp's 0.5 ms). Here each is one Numba call on arrays the engine already holds:

- :func:`rope_store`: ``qkv`` [N, (H + 2 KV) D] (the fused projection's output, N = batch x tokens) ->
  Q rotated into ``q_out`` [B, T, H, D], K rotated and V copied into the cache ``[B, KV, capacity, D]``
  at positions ``start + t``. The rotation is transformers' ``rotate_half`` form, as
  :func:`offloadkit.model.rope.apply_rope`: ``x * cos + rotate_half(x) * sin``;
- :func:`softmax_topk`: router logits [N, E] -> (weights [N, k] f32, experts [N, k] int64), the
  softmax over all experts, the k largest (lowest index first among equals), renormalized when asked,
  as :func:`offloadkit.model.moe.route_softmax_topk`;
- :func:`gather_rows`: the embedding lookup, rows of a table in kernel storage widened to f32.

At decode the projections around them are fused in, so that a step makes fewer calls from Python (each
costs its dispatch, and Python runs on cold caches between the memory-bound kernels):
:func:`qkv_rope` is the QKV decode pass plus biases, RoPE and the cache write in one call;
:func:`router_topk` is the router's logits plus its softmax top-k.

Both run serial for a decode step's few rows and parallel over rows for a prompt. What they refuse:
validation beyond shapes (the engine calls them with arrays it made), and sparsemixer routing (PhiMoE),
which stays in torch (:func:`offloadkit.model.moe.route_sparsemixer`).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from offloadkit.errors import KernelInputError
from offloadkit.kernels.cpu.decode import PARALLEL_MIN_BYTES, rows_dot3_range, rows_dot_range
from offloadkit.kernels.cpu.primitives import FAST, widen

#: Rows (tokens) from which RoPE runs parallel over rows.
_PARALLEL_ROPE_ROWS = 64


@njit(**FAST)
def _rotate(src, c, s, dst, half):
    for i in range(half):
        x1 = src[i]
        x2 = src[i + half]
        dst[i] = x1 * c[i] - x2 * s[i]
        dst[i + half] = x2 * c[i + half] + x1 * s[i + half]


@njit(**FAST)
def _rope_rows(qkv, cos, sin, tokens, start, q_out, k_cache, v_cache, r0, r1):
    heads, dim = q_out.shape[2], q_out.shape[3]
    kv = k_cache.shape[1]
    half = dim // 2
    for r in range(r0, r1):
        b = r // tokens
        t = r % tokens
        row = qkv[r]
        c = cos[t]
        s = sin[t]
        for h in range(heads):
            _rotate(row[h * dim:(h + 1) * dim], c, s, q_out[b, t, h], half)
        for g in range(kv):
            _rotate(row[(heads + g) * dim:(heads + g + 1) * dim], c, s, k_cache[b, g, start + t], half)
            src = row[(heads + kv + g) * dim:(heads + kv + g + 1) * dim]
            dst = v_cache[b, g, start + t]
            for i in range(dim):
                dst[i] = src[i]


@njit(parallel=True, **FAST)
def _rope_parallel(qkv, cos, sin, tokens, start, q_out, k_cache, v_cache, n_chunks):
    rows = qkv.shape[0]
    for c in prange(n_chunks):
        _rope_rows(qkv, cos, sin, tokens, start, q_out, k_cache, v_cache, c * rows // n_chunks,
                   (c + 1) * rows // n_chunks)


def rope_store(qkv: np.ndarray, cos: np.ndarray, sin: np.ndarray, start: int, q_out: np.ndarray,
               k_cache: np.ndarray, v_cache: np.ndarray, threads: int | None = None) -> None:
    """Rotate Q into ``q_out`` [B, T, H, D] and K into ``k_cache``, copy V into ``v_cache`` (both
    [B, KV, capacity, D]) at positions ``[start, start + T)``; ``qkv`` [B * T, (H + 2 KV) D] f32 holds the
    projections (biases added), ``cos`` and ``sin`` [T, D] the rotary tables of those positions."""
    b, t, heads, dim = q_out.shape
    kv = k_cache.shape[1]
    if qkv.shape != (b * t, (heads + 2 * kv) * dim) or cos.shape != (t, dim) or sin.shape != (t, dim) \
            or k_cache.shape[2] < start + t or v_cache.shape != k_cache.shape or dim % 2:
        raise KernelInputError(f"rope_store: qkv {qkv.shape}, cos {cos.shape}, q_out {q_out.shape}, cache "
                               f"{k_cache.shape} / {v_cache.shape} at {start} do not fit together")
    rows = b * t
    threads = numba.get_num_threads() if threads is None and rows >= _PARALLEL_ROPE_ROWS else threads or 1
    if rows >= _PARALLEL_ROPE_ROWS and threads > 1:
        _rope_parallel(qkv, cos, sin, t, start, q_out, k_cache, v_cache, threads)
    else:
        _rope_rows(qkv, cos, sin, t, start, q_out, k_cache, v_cache, 0, rows)


# ---- the fused decode forms: projection and glue in one compiled call -----------------------------


@njit(**FAST)
def _bias_rope(qkv, bias, cos, sin, tokens, start, q_out, k_cache, v_cache):
    if bias.size:
        for r in range(qkv.shape[0]):
            row = qkv[r]
            for j in range(row.size):
                row[j] += bias[j]
    _rope_rows(qkv, cos, sin, tokens, start, q_out, k_cache, v_cache, 0, qkv.shape[0])


@njit(**FAST)
def _qkv_rope_serial(x, wq, wk, wv, bias, cos, sin, tokens, start, q_out, k_cache, v_cache, qkv):
    rows_dot3_range(x, wq, wk, wv, qkv, 0, qkv.shape[1])
    _bias_rope(qkv, bias, cos, sin, tokens, start, q_out, k_cache, v_cache)


@njit(parallel=True, **FAST)
def _qkv_rope_parallel(x, wq, wk, wv, bias, cos, sin, tokens, start, q_out, k_cache, v_cache, qkv, n_chunks):
    rows = qkv.shape[1]
    for c in prange(n_chunks):
        rows_dot3_range(x, wq, wk, wv, qkv, c * rows // n_chunks, (c + 1) * rows // n_chunks)
    _bias_rope(qkv, bias, cos, sin, tokens, start, q_out, k_cache, v_cache)


_NO_BIAS = np.zeros(0, dtype=np.float32)


def qkv_rope(x: np.ndarray, wq: np.ndarray, wk: np.ndarray, wv: np.ndarray, bias: np.ndarray | None,
             cos: np.ndarray, sin: np.ndarray, start: int, q_out: np.ndarray, k_cache: np.ndarray,
             v_cache: np.ndarray, threads: int | None = None) -> None:
    """A decode step's attention input in one call: ``x · [Wq; Wk; Wv]ᵀ`` (the decode kernel, weights in
    kernel storage, one parallel pass), plus ``bias`` [(H + 2 KV) D] if given, then :func:`rope_store`.
    ``x`` [B * T, hidden] f32 with T the tokens of ``q_out`` [B, T, H, D]."""
    tokens = q_out.shape[1]
    qkv = np.empty((x.shape[0], wq.shape[0] + wk.shape[0] + wv.shape[0]), dtype=np.float32)
    bias = _NO_BIAS if bias is None else bias
    threads = numba.get_num_threads() if threads is None else threads
    if threads > 1 and qkv.shape[1] * x.shape[1] * wq.itemsize >= PARALLEL_MIN_BYTES:
        _qkv_rope_parallel(x, wq, wk, wv, bias, cos, sin, tokens, start, q_out, k_cache, v_cache, qkv,
                           min(threads, qkv.shape[1]))
    else:
        _qkv_rope_serial(x, wq, wk, wv, bias, cos, sin, tokens, start, q_out, k_cache, v_cache, qkv)


@njit(**FAST)
def _router_topk(x, w, k, normalize, logits, weights, experts):
    rows_dot_range(x, w, 0, 0, w.shape[0], logits, False, 0)
    _softmax_topk(logits, k, normalize, weights, experts)


def router_topk(x: np.ndarray, w: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`softmax_topk` of the router logits ``x · Wᵀ`` (``w`` [E, hidden] in kernel storage), in one
    serial call: a decode step's router is a few dozen KB."""
    n, e = x.shape[0], w.shape[0]
    if not 0 < k <= e:
        raise KernelInputError(f"router_topk: {e} experts, k = {k}")
    logits = np.empty((n, e), dtype=np.float32)
    weights = np.empty((n, k), dtype=np.float32)
    experts = np.empty((n, k), dtype=np.int64)
    _router_topk(x, w, k, normalize, logits, weights, experts)
    return weights, experts


# ---- routing ---------------------------------------------------------------------------------------


@njit(**FAST)
def _softmax_topk(logits, k, normalize, weights, experts):
    n, e = logits.shape
    p = np.empty(e, dtype=np.float32)
    taken = np.zeros(e, dtype=np.bool_)
    for r in range(n):
        row = logits[r]
        top = row[0]
        for j in range(1, e):
            top = max(top, row[j])
        total = np.float32(0.0)
        for j in range(e):
            p[j] = np.exp(row[j] - top)
            total += p[j]
        taken[:] = False
        chosen = np.float32(0.0)
        for slot in range(k):
            best = -1
            for j in range(e):
                if not taken[j] and (best < 0 or p[j] > p[best]):
                    best = j
            taken[best] = True
            weights[r, slot] = p[best] / total
            experts[r, slot] = best
            chosen += weights[r, slot]
        if normalize:
            for slot in range(k):
                weights[r, slot] /= chosen


def softmax_topk(logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(weights [N, k] f32, experts [N, k] int64) of router ``logits`` [N, E] f32: softmax, top ``k``,
    renormalized to sum to 1 when ``normalize`` (Mixtral and Qwen2-MoE's routing)."""
    if logits.ndim != 2 or not 0 < k <= logits.shape[1]:
        raise KernelInputError(f"softmax_topk: logits {logits.shape}, k = {k}")
    weights = np.empty((logits.shape[0], k), dtype=np.float32)
    experts = np.empty((logits.shape[0], k), dtype=np.int64)
    _softmax_topk(np.ascontiguousarray(logits, dtype=np.float32), k, normalize, weights, experts)
    return weights, experts


@njit(**FAST)
def _gather_rows(table, ids, out):
    for r in range(ids.size):
        src = table[ids[r]]
        dst = out[r]
        for k in range(src.size):
            dst[k] = widen(src[k])


def gather_rows(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``f32(table[ids])`` [len(ids), H] for a table in kernel storage (the embedding lookup), ids in range."""
    out = np.empty((ids.size, table.shape[1]), dtype=np.float32)
    _gather_rows(table, np.ascontiguousarray(ids, dtype=np.int64), out)
    return out


__all__ = ["gather_rows", "qkv_rope", "rope_store", "router_topk", "softmax_topk"]
