"""The small CPU-lane operations around the experts: norms, and the measurement that chose them.

A layer the plan keeps on the CPU needs more than its experts: RMSNorm / LayerNorm, the router,
the attention core. Each is cheap in bytes but called many times per step, so at decode its cost is
mostly *call overhead*. For each piece the CPU engine uses whichever of Numba or torch measured
faster (:func:`compare_lane_ops` measures them again; ``offloadkit bench kernels`` prints the result):

- **RMSNorm** and **LayerNorm** (PhiMoE): Numba kernels (one pass for the statistics, one to
  scale; serial for a few tokens, parallel over tokens for many). At one token of 4096 torch's
  RMSNorm (five ops: pow, mean, rsqrt, mul, mul) took ~39 µs and the kernel ~4 µs; at 512 tokens
  1.35 ms against 0.43 ms. Even torch's fused ``F.layer_norm`` (7 µs / 0.74 ms) lost to the kernel
  (3 µs / 0.45 ms).
- **attention core**: a Numba kernel over the KV cache in place (parallel over batch x heads,
  grouped-query heads read their shared KV head without copying it). The reference's torch version
  copies K and V per query head (``repeat_interleave``) and masks a full square: at one token over
  512 positions (32 heads, 8 KV heads, 128 dims) torch took ~6.3 ms and the kernel ~0.2 ms; for a
  fresh 512-token prefill 87 ms against 47 ms. Torch won one case, a 128-token chunk after 384
  cached positions (13 ms against 20 ms), so :func:`use_torch_attention` sends chunks of more than
  32 tokens that follow a cache to torch. For a *fresh* prompt, torch's fused
  ``scaled_dot_product_attention`` (causal, GQA without copies; torch >= 2.5) beat the kernel from
  :data:`SDPA_MIN_TOKENS` tokens on (issue 10, bench-moe's 16 heads / 4 KV heads / 128 dims, 2 threads):
  0.37 against 0.41 ms at 64 tokens, 4.2 against 5.5 at 256, 16.4 against 22.3 at 512 (1 thread: 32
  against 46 ms), and lost at 32 (0.13 against 0.11), so :func:`attention_bthd` takes it there.
  The kernel takes the token-major layout [B, T, H, D] of the projections, so neither side transposes.
- **router logits**: the decode / prefill ``linear`` of :mod:`offloadkit.kernels.cpu.experts` (weights read
  in their stored dtype); softmax and top-k stay in torch (:mod:`offloadkit.model.moe`), on a few
  dozen numbers.

All figures above were measured on a 2-core AMD EPYC (AVX2) with 2 threads; rerun
:func:`compare_lane_ops` (or ``offloadkit bench kernels``) to measure them on another machine.

What it refuses: anything but f32 activations (the engine's compute dtype), and claiming a winner
it did not measure: :func:`compare_lane_ops` returns the measured times, labelled by the caller.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from offloadkit.kernels.cpu.primitives import FAST
from offloadkit.model.reference import causal_attention as torch_attention
from offloadkit.model.reference import rms_norm as torch_rms_norm

#: Above this many activations the norm runs parallel over tokens.
_PARALLEL_NORM_ELEMS = 1 << 16


@njit(**FAST)
def _rms_rows(x, w, eps, out, t0, t1):
    hidden = x.shape[1]
    for t in range(t0, t1):
        row = x[t]
        s = np.float32(0.0)
        for k in range(hidden):
            s += row[k] * row[k]
        r = np.float32(1.0) / np.sqrt(s / np.float32(hidden) + np.float32(eps))
        dst = out[t]
        for k in range(hidden):
            dst[k] = row[k] * r * w[k]


@njit(parallel=True, **FAST)
def _rms_parallel(x, w, eps, out):
    for t in prange(x.shape[0]):
        _rms_rows(x, w, eps, out, t, t + 1)


def _parallel(size: int, threshold: int, threads: int | None) -> bool:
    return size >= threshold and (numba.get_num_threads() if threads is None else threads) > 1


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, threads: int | None = None) -> np.ndarray:
    """``x / sqrt(mean(x²) + eps) * weight`` over the rows of ``x`` [n, H] f32 (``weight`` [H] f32).

    ``threads``: Numba's thread count if the caller knows it (asking Numba takes a lock).
    """
    out = np.empty_like(x)
    if _parallel(x.size, _PARALLEL_NORM_ELEMS, threads):
        _rms_parallel(x, weight, np.float32(eps), out)
    else:
        _rms_rows(x, weight, np.float32(eps), out, 0, x.shape[0])
    return out


@njit(**FAST)
def _layer_rows(x, w, b, eps, out, t0, t1):
    hidden = x.shape[1]
    for t in range(t0, t1):
        row = x[t]
        mean = np.float32(0.0)
        for k in range(hidden):
            mean += row[k]
        mean /= np.float32(hidden)
        var = np.float32(0.0)
        for k in range(hidden):
            d = row[k] - mean
            var += d * d
        r = np.float32(1.0) / np.sqrt(var / np.float32(hidden) + np.float32(eps))
        dst = out[t]
        for k in range(hidden):
            dst[k] = (row[k] - mean) * r * w[k] + b[k]


@njit(parallel=True, **FAST)
def _layer_parallel(x, w, b, eps, out):
    for t in prange(x.shape[0]):
        _layer_rows(x, w, b, eps, out, t, t + 1)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
               threads: int | None = None) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the rows of ``x`` [n, H] f32 (PhiMoE's norm)."""
    out = np.empty_like(x)
    if _parallel(x.size, _PARALLEL_NORM_ELEMS, threads):
        _layer_parallel(x, weight, bias, np.float32(eps), out)
    else:
        _layer_rows(x, weight, bias, np.float32(eps), out, 0, x.shape[0])
    return out


# ---- attention over the KV cache -----------------------------------------------------------------------


@njit(**FAST)
def _attention_heads(q, k, v, length, q_start, window, out, bh0, bh1):
    """Attention of the (batch, head) pairs ``[bh0, bh1)`` (flattened), one thread; ``q``, ``out`` [B, T, H, D]."""
    tokens, heads, dim = q.shape[1], q.shape[2], q.shape[3]
    groups = heads // k.shape[1]
    scale = np.float32(1.0) / np.sqrt(np.float32(dim))
    scores = np.empty(length, dtype=np.float32)
    for bh in range(bh0, bh1):
        b, h = bh // heads, bh % heads
        g = h // groups
        for t in range(tokens):
            pos = q_start + t
            lo = max(0, pos - window + 1) if window > 0 else 0
            hi = min(pos + 1, length)
            qv = q[b, t, h]
            top = np.float32(-np.inf)
            for s in range(lo, hi):
                kv = k[b, g, s]
                acc = np.float32(0.0)
                for d in range(dim):
                    acc += qv[d] * kv[d]
                acc *= scale
                scores[s] = acc
                top = max(top, acc)
            total = np.float32(0.0)
            for s in range(lo, hi):
                e = np.exp(scores[s] - top)
                scores[s] = e
                total += e
            o = out[b, t, h]
            o[:] = 0.0
            inv = np.float32(1.0) / total
            for s in range(lo, hi):
                p = scores[s] * inv
                vv = v[b, g, s]
                for d in range(dim):
                    o[d] += p * vv[d]


@njit(parallel=True, **FAST)
def _attention_parallel(q, k, v, length, q_start, window, out):
    for bh in prange(q.shape[0] * q.shape[2]):
        _attention_heads(q, k, v, length, q_start, window, out, bh, bh + 1)


#: Below this many multiply-adds (queries x positions x head dim x heads) attention runs on one thread.
_PARALLEL_ATTENTION_MACS = 1 << 18
#: A fresh prompt of this many tokens or more goes to torch's ``scaled_dot_product_attention`` (see the
#: module docstring: 10-30% faster than the kernel from 64 tokens on, 14% slower at 32).
SDPA_MIN_TOKENS = 64


def use_torch_attention(tokens: int, q_start: int) -> bool:
    """True for the one measured case where torch's attention beat the kernel: a chunk of more than
    32 tokens after cached positions."""
    return tokens > 32 and q_start > 0


def attention_bthd(q: np.ndarray, k: np.ndarray, v: np.ndarray, length: int, q_start: int,
                   sliding_window: int | None = None, out: np.ndarray | None = None,
                   threads: int | None = None) -> np.ndarray:
    """Softmax attention of ``q`` [B, T, H, D] (positions ``q_start..``) over the first ``length`` positions
    of ``k``, ``v`` [B, KV, capacity, D], into ``out`` [B, T, H, D] (new if None).

    The token-major layout is the projections' own: ``q`` is the QKV output's Q columns, and ``out``
    reshaped to [B * T, H * D] is the O projection's input, so neither side transposes.
    """
    out = np.empty_like(q) if out is None else out
    window = sliding_window or 0
    tokens = q.shape[1]
    if q_start == 0 and length == tokens >= SDPA_MIN_TOKENS and (window == 0 or window >= tokens):
        # a fresh prompt: torch's fused causal attention (flash kernel, GQA without copies) measured faster
        with torch.no_grad():
            o = F.scaled_dot_product_attention(torch.from_numpy(q).transpose(1, 2),
                                               torch.from_numpy(k)[:, :, :length], torch.from_numpy(v)[:, :, :length],
                                               is_causal=True, enable_gqa=True)
            torch.from_numpy(out).copy_(o.transpose(1, 2))
        return out
    if not _parallel(q.size * length, _PARALLEL_ATTENTION_MACS, threads):
        _attention_heads(q, k, v, length, q_start, window, out, 0, q.shape[0] * q.shape[2])
    else:
        _attention_parallel(q, k, v, length, q_start, window, out)
    return out


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, length: int, q_start: int,
                     sliding_window: int | None = None) -> np.ndarray:
    """Softmax attention of ``q`` [B, H, T, D] (positions ``q_start..``) over the first ``length`` positions
    of ``k``, ``v`` [B, KV, capacity, D], as :func:`offloadkit.model.reference.causal_attention` (head-major
    in and out; :func:`attention_bthd` is the same kernel on the token-major layout the engine uses)."""
    o = attention_bthd(np.ascontiguousarray(q.transpose(0, 2, 1, 3)), k, v, length, q_start, sliding_window)
    return np.ascontiguousarray(o.transpose(0, 2, 1, 3))


# ---- measuring the choice ----------------------------------------------------------------------------


def _best_s(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def compare_lane_ops(hidden: int = 4096, tokens: tuple[int, ...] = (1, 512), positions: int = 512,
                     repeats: int = 20) -> list[dict[str, object]]:
    """Measured best times (s) of the Numba and torch versions of the CPU-lane ops, per token count.

    Attention runs ``tokens`` queries at the end of ``positions`` cached positions (a decode step for
    one token; a fresh prefill when ``tokens == positions``), with ``hidden // 128`` heads of 128 and
    a quarter as many KV heads (Mixtral's layout at hidden 4096).
    """
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal(hidden).astype(np.float32), rng.standard_normal(hidden).astype(np.float32)
    wt, bt = torch.from_numpy(w), torch.from_numpy(b)
    dim = min(128, hidden)
    heads = max(1, hidden // dim)
    kv = max(1, heads // 4)
    rows: list[dict[str, object]] = []
    for n in tokens:
        x = rng.standard_normal((n, hidden)).astype(np.float32)
        xt = torch.from_numpy(x)
        rows.append({"op": "rms_norm", "tokens": n, "hidden": hidden,
                     "numba_s": _best_s(lambda x=x: rms_norm(x, w, 1e-5), repeats),
                     "torch_s": _best_s(lambda xt=xt: torch_rms_norm(xt, wt, 1e-5), repeats)})
        rows.append({"op": "layer_norm", "tokens": n, "hidden": hidden,
                     "numba_s": _best_s(lambda x=x: layer_norm(x, w, b, 1e-5), repeats),
                     "torch_s": _best_s(lambda xt=xt: F.layer_norm(xt, (hidden,), wt, bt, 1e-5), repeats)})
        s = max(positions, n)
        q = torch.randn(1, heads, n, dim)
        k, v = torch.randn(1, kv, s, dim), torch.randn(1, kv, s, dim)
        rows.append({"op": f"attention over {s} positions ({heads} heads, {kv} KV heads)", "tokens": n,
                     "hidden": hidden,
                     "numba_s": _best_s(lambda q=q, k=k, v=v, s=s: causal_attention(
                         q.numpy(), k.numpy(), v.numpy(), s, s - q.shape[2]), max(2, repeats // 10)),
                     "torch_s": _best_s(lambda q=q, k=k, v=v, s=s: torch_attention(q, k, v, s - q.shape[2]),
                                        max(2, repeats // 10))})
    return rows


__all__ = ["attention_bthd", "causal_attention", "compare_lane_ops", "layer_norm", "rms_norm",
           "use_torch_attention"]
