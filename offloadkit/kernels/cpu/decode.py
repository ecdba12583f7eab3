"""The decode path: a SwiGLU row slice for a few tokens, at the speed DRAM delivers the weights.

With one to ~8 tokens an expert is a matrix-vector product: 2 flops per weight per token against
2 or 4 bytes per weight, so the CPU waits on memory and the only thing that matters is reading
every weight byte once, in long sequential streams, on every core at once. The slice
``[r0, r1)`` of the intermediate dimension is computed in two parallel passes:

1. **gate / up** — rows ``i`` of W1 and W3 (``[I, H]``, contiguous rows in the Hub layout): each
   thread takes one contiguous run of rows and, for each row, computes both dot products against
   every token in one pass (:func:`~offloadkit.kernels.cpu.primitives.dot2_t4` and friends), then
   ``h[t, i] = silu(g) * u``. Each thread streams ``2 * rows / threads`` weight rows front to back.
2. **down** — W2 is ``[H, I]``, so the slice is the column block ``W2[:, r0:r1]``: a run of
   ``r1 - r0`` contiguous weights in every one of the H rows. Threads split the *output* rows ``j``
   and each computes ``y[t, j] += W2[j, r0:r1] · h[t]`` with the same fused dots. No two threads
   write the same output and no cross-thread reduction is needed; ``h`` (``4 (r1 - r0)`` bytes per
   token) stays in L2 while the weights stream past.

Both passes split rows evenly over the Numba threads (contiguous runs, which the hardware
prefetchers follow). Shapes too small to pay for a parallel launch (under
:data:`PARALLEL_MIN_BYTES` of weights), and every pass when Numba runs one thread, run on the calling
thread. :func:`expert_decode` runs both passes inside one compiled call (:func:`expert_parallel`: two
parallel regions back to back, nothing in Python between them), and takes a per-token ``scale`` (the
router's weight) that multiplies ``h``, so a weighted expert adds straight into the residual stream.
:func:`rows_dot` is the same pass 2 for any weight ``[out, in]``: attention projections, routers and
the lm_head use it too; :func:`rows_dot3` runs the Q, K and V projections as one pass over the three
weights (K and V alone are too small to keep both threads streaming to the end).

Issue 10 (bench-moe: 2048 x 2048 experts, AVX2, 2 threads, mmap'd weights, measured): 16 experts back
to back read at 94-100% of a plain read of the same bytes; the decode step as a whole (QKV, O, 2 random
experts per layer, lm_head) at ~87%. Dynamic scheduling (4-16 chunks per thread), a software prefetch
of the next row and an even/odd bf16 widening (``u32 << 16``, ``u32 & 0xffff0000``) measured no better
(0.95-1.07x, within this machine's noise), so the rows stream as described.

Measured on a Mixtral expert (2 threads, AVX2): at one token the kernel reads bf16 and f32 weights
at 88-97% of a plain read of the same bytes. From ~4 tokens on it is bound by FMA throughput
(~100 GFLOP/s with bf16 weights), still faster than torch's GEMM up to a few dozen tokens. A
k-blocked variant (a chunk of ``x`` kept in L1 across 4-8 weight rows) measured 5-25% *slower* at
1-8 tokens, so the rows stream whole.

What it refuses to do: validation (see :mod:`offloadkit.kernels.cpu.experts`, the public entry point,
which checks shapes, slices and dtypes before calling in here) and many tokens (the prefill path,
:mod:`offloadkit.kernels.cpu.prefill`, reuses widened weights across tokens instead).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from offloadkit.kernels.cpu.primitives import FAST, dot2_t1, dot2_t2, dot2_t4, dot_t1, dot_t2, dot_t4, silu_mul

#: Below this many weight bytes per pass a parallel launch costs more than it saves (measured on 2
#: threads: a launch costs ~3 µs; two threads won from 32-64 KB of weights per pass).
PARALLEL_MIN_BYTES = 64 * 1024


# ---- pass 1: gate and up ---------------------------------------------------------------------------


@njit(**FAST)
def gate_up_rows(x, w1, w3, r0, i0, i1, h, scale):
    """``h[t, i - r0] = scale[t] * silu(W1[i] · x[t]) * (W3[i] · x[t])`` for rows ``[i0, i1)``, all tokens.

    ``scale`` [n] is the weight each token gives this expert (ones for a plain FFN): the down pass is
    linear, so scaling ``h`` scales the expert's output, and the router's weighting costs nothing.
    """
    n = x.shape[0]
    for i in range(i0, i1):
        a = w1[i]
        b = w3[i]
        c = i - r0
        t = 0
        while n - t >= 4:
            g0, g1, g2, g3, u0, u1, u2, u3 = dot2_t4(a, b, x[t], x[t + 1], x[t + 2], x[t + 3])
            h[t, c] = silu_mul(g0, u0) * scale[t]
            h[t + 1, c] = silu_mul(g1, u1) * scale[t + 1]
            h[t + 2, c] = silu_mul(g2, u2) * scale[t + 2]
            h[t + 3, c] = silu_mul(g3, u3) * scale[t + 3]
            t += 4
        if n - t >= 2:
            g0, g1, u0, u1 = dot2_t2(a, b, x[t], x[t + 1])
            h[t, c] = silu_mul(g0, u0) * scale[t]
            h[t + 1, c] = silu_mul(g1, u1) * scale[t + 1]
            t += 2
        if n - t == 1:
            g0, u0 = dot2_t1(a, b, x[t])
            h[t, c] = silu_mul(g0, u0) * scale[t]


@njit(parallel=True, **FAST)
def gate_up_parallel(x, w1, w3, r0, r1, h, scale, n_chunks):
    m = r1 - r0
    for c in prange(n_chunks):
        gate_up_rows(x, w1, w3, r0, r0 + c * m // n_chunks, r0 + (c + 1) * m // n_chunks, h, scale)


# ---- pass 2: down (and any y = W x) -----------------------------------------------------------------


@njit(**FAST)
def rows_dot_range(v, w, c0, j0, j1, y, accumulate, y0=0):
    """``y[t, y0 + j] (+)= W[j, c0:c0 + K] · v[t]`` for weight rows ``[j0, j1)``, ``v`` [n, K]."""
    n, kk = v.shape
    for jw in range(j0, j1):
        seg = w[jw, c0:c0 + kk]
        j = y0 + jw
        t = 0
        while n - t >= 4:
            s0, s1, s2, s3 = dot_t4(seg, v[t], v[t + 1], v[t + 2], v[t + 3])
            if accumulate:
                y[t, j] += s0
                y[t + 1, j] += s1
                y[t + 2, j] += s2
                y[t + 3, j] += s3
            else:
                y[t, j] = s0
                y[t + 1, j] = s1
                y[t + 2, j] = s2
                y[t + 3, j] = s3
            t += 4
        if n - t >= 2:
            s0, s1 = dot_t2(seg, v[t], v[t + 1])
            if accumulate:
                y[t, j] += s0
                y[t + 1, j] += s1
            else:
                y[t, j] = s0
                y[t + 1, j] = s1
            t += 2
        if n - t == 1:
            s0 = dot_t1(seg, v[t])
            if accumulate:
                y[t, j] += s0
            else:
                y[t, j] = s0


@njit(parallel=True, **FAST)
def rows_dot_parallel(v, w, c0, y, accumulate, n_chunks):
    rows = w.shape[0]
    for c in prange(n_chunks):
        rows_dot_range(v, w, c0, c * rows // n_chunks, (c + 1) * rows // n_chunks, y, accumulate)


@njit(**FAST)
def rows_dot3_range(v, wa, wb, wc, y, g0, g1):
    """Rows ``[g0, g1)`` of the stacked ``[Wa; Wb; Wc]`` into ``y[:, g0:g1]`` (``y = v · [Wa; Wb; Wc]ᵀ``)."""
    ra = wa.shape[0]
    rb = wb.shape[0]
    lo, hi = max(g0, 0), min(g1, ra)
    if lo < hi:
        rows_dot_range(v, wa, 0, lo, hi, y, False, 0)
    lo, hi = max(g0, ra), min(g1, ra + rb)
    if lo < hi:
        rows_dot_range(v, wb, 0, lo - ra, hi - ra, y, False, ra)
    lo, hi = max(g0, ra + rb), min(g1, ra + rb + wc.shape[0])
    if lo < hi:
        rows_dot_range(v, wc, 0, lo - ra - rb, hi - ra - rb, y, False, ra + rb)


@njit(parallel=True, **FAST)
def rows_dot3_parallel(v, wa, wb, wc, y, n_chunks):
    rows = wa.shape[0] + wb.shape[0] + wc.shape[0]
    for c in prange(n_chunks):
        rows_dot3_range(v, wa, wb, wc, y, c * rows // n_chunks, (c + 1) * rows // n_chunks)


# ---- entry points (arguments already checked by offloadkit.kernels.cpu.experts) ------------------------------


def _chunks(weight_bytes: int, rows: int, tokens: int, threads: int | None = None) -> int:
    """Parallel chunks for a pass over ``weight_bytes`` for ``tokens``: one per thread, or 0 (serial).

    Up to 4 tokens the pass costs about its bytes; beyond, the arithmetic grows with the tokens, so
    a small matrix with many tokens is worth a parallel launch too. With one thread the pass runs
    serial: a parallel launch of one chunk would only add the launch.
    """
    if weight_bytes * max(1, tokens // 4) < PARALLEL_MIN_BYTES:
        return 0
    threads = min(numba.get_num_threads() if threads is None else threads, rows)
    return threads if threads > 1 else 0


def ones(n: int) -> np.ndarray:
    """A scale of 1 for ``n`` tokens (a plain FFN), shared for the common sizes."""
    if n >= len(_ONES):
        return np.ones(n, dtype=np.float32)
    return _ONES[:n]


_ONES = np.ones(1024, dtype=np.float32)  # private: the kernels only read a scale


def gate_up(x: np.ndarray, w1: np.ndarray, w3: np.ndarray, r0: int, r1: int, h: np.ndarray,
            scale: np.ndarray | None = None, threads: int | None = None) -> None:
    """Pass 1 into ``h`` [n, r1 - r0] f32, each token's row times ``scale[t]`` (1 if None).

    ``threads``: the Numba threads to use (``numba.get_num_threads()`` if None; a caller that makes many
    calls passes it, since asking Numba takes a lock).
    """
    scale = ones(x.shape[0]) if scale is None else scale
    chunks = _chunks(2 * (r1 - r0) * w1.shape[1] * w1.itemsize, r1 - r0, x.shape[0], threads)
    if chunks:
        gate_up_parallel(x, w1, w3, r0, r1, h, scale, chunks)
    else:
        gate_up_rows(x, w1, w3, r0, r0, r1, h, scale)


def rows_dot(v: np.ndarray, w: np.ndarray, c0: int, y: np.ndarray, accumulate: bool,
             threads: int | None = None) -> None:
    """Pass 2: ``y[:, j] (+)= W[j, c0:c0 + v.shape[1]] · v`` for every row ``j`` of ``w``."""
    chunks = _chunks(w.shape[0] * v.shape[1] * w.itemsize, w.shape[0], v.shape[0], threads)
    if chunks:
        rows_dot_parallel(v, w, c0, y, accumulate, chunks)
    else:
        rows_dot_range(v, w, c0, 0, w.shape[0], y, accumulate)


def rows_dot3(v: np.ndarray, wa: np.ndarray, wb: np.ndarray, wc: np.ndarray, y: np.ndarray,
              threads: int | None = None) -> None:
    """``y = v · [Wa; Wb; Wc]ᵀ`` (``y`` [n, rows a + b + c]) in one parallel pass: the QKV projections
    of a decode step, whose K and V alone are too small to keep both threads busy to the end."""
    rows = wa.shape[0] + wb.shape[0] + wc.shape[0]
    chunks = _chunks(rows * v.shape[1] * wa.itemsize, rows, v.shape[0], threads)
    if chunks:
        rows_dot3_parallel(v, wa, wb, wc, y, chunks)
    else:
        rows_dot3_range(v, wa, wb, wc, y, 0, rows)


def expert_decode(x: np.ndarray, w1: np.ndarray, w3: np.ndarray, w2: np.ndarray, r0: int, r1: int,
                  out: np.ndarray, scale: np.ndarray | None = None, threads: int | None = None) -> None:
    """``out += scale ⊙ W2[:, r0:r1] · (silu(W1[r0:r1] x) ⊙ W3[r0:r1] x)`` for ``x`` [n, H] f32, ``out`` [n, H]
    f32, ``scale`` [n] f32 per token (1 if None).

    Both passes run inside one compiled call (two parallel regions back to back, or none with one
    thread), so nothing runs in Python between them.
    """
    n = x.shape[0]
    scale = ones(n) if scale is None else scale
    up = _chunks(2 * (r1 - r0) * w1.shape[1] * w1.itemsize, r1 - r0, n, threads)
    down = _chunks(w2.shape[0] * (r1 - r0) * w2.itemsize, w2.shape[0], n, threads)
    if up or down:
        expert_parallel(x, w1, w3, w2, r0, r1, out, scale, max(up, 1), max(down, 1))
    else:
        expert_serial(x, w1, w3, w2, r0, r1, out, scale)


@njit(**FAST)
def expert_serial(x, w1, w3, w2, r0, r1, out, scale):
    h = np.empty((x.shape[0], r1 - r0), dtype=np.float32)
    gate_up_rows(x, w1, w3, r0, r0, r1, h, scale)
    rows_dot_range(h, w2, r0, 0, w2.shape[0], out, True, 0)


# fusion off: the second loop reads all of ``h``, which every chunk of the first writes
@njit(parallel={"fusion": False}, **FAST)
def expert_parallel(x, w1, w3, w2, r0, r1, out, scale, n_up, n_down):
    m = r1 - r0
    h = np.empty((x.shape[0], m), dtype=np.float32)
    for c in prange(n_up):
        gate_up_rows(x, w1, w3, r0, r0 + c * m // n_up, r0 + (c + 1) * m // n_up, h, scale)
    rows = w2.shape[0]
    for c in prange(n_down):
        rows_dot_range(h, w2, r0, c * rows // n_down, (c + 1) * rows // n_down, out, True, 0)


__all__ = ["PARALLEL_MIN_BYTES", "expert_decode", "gate_up", "ones", "rows_dot", "rows_dot3"]
