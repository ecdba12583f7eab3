"""The CPU expert's inner product built step by step, for notebook 04 (``y = W x``, one token).

Each version below adds one idea and is measured in the notebook against this machine's memory
read; the real kernels (:mod:`offloadkit.kernels.cpu.decode`) are the last step applied to the
whole SwiGLU expert:

1. :func:`gemv_naive` — one thread, a plain loop. Without ``fastmath`` the compiler must add the
   products in order, so every add waits for the previous one (~4 cycles): latency-bound, far
   below what memory could deliver.
2. :func:`gemv_parallel` — the rows split over the Numba threads (``prange``): ~threads x faster,
   still latency-bound inside each row.
3. :func:`gemv_vectorized` — ``fastmath`` lets LLVM reorder the sum: 8-wide AVX2 FMAs into several
   accumulators. Now the loop outruns memory and the CPU waits on DRAM: memory-bound at last.
4. :func:`gemv_bf16` — the weights stay bf16 (uint16 bits) and are widened in registers with a
   shift (:func:`~offloadkit.kernels.cpu.primitives.widen`): half the bytes to read, so half the time at
   the same GB/s.

What it refuses to be: the production kernel (no slices, one token, one matrix; no checks).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from offloadkit.kernels.cpu.primitives import widen


@njit(cache=True, nogil=True)
def gemv_naive(w, x, y):
    """Step 1: ``y[i] = sum_k w[i, k] x[k]``, one thread, additions in order."""
    for i in range(w.shape[0]):
        s = np.float32(0.0)
        for k in range(w.shape[1]):
            s += w[i, k] * x[k]
        y[i] = s


@njit(parallel=True, cache=True, nogil=True)
def gemv_parallel(w, x, y):
    """Step 2: the rows over all threads; each row still summed in order."""
    for i in prange(w.shape[0]):
        s = np.float32(0.0)
        row = w[i]
        for k in range(row.size):
            s += row[k] * x[k]
        y[i] = s


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def gemv_vectorized(w, x, y):
    """Step 3: as step 2, with ``fastmath``: the sum is reassociated into 8-wide FMA accumulators."""
    for i in prange(w.shape[0]):
        s = np.float32(0.0)
        row = w[i]
        for k in range(row.size):
            s += row[k] * x[k]
        y[i] = s


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def gemv_bf16(w_bits, x, y):
    """Step 4: ``w_bits`` holds bf16 as uint16; each weight is widened in a register (``<< 16``)."""
    for i in prange(w_bits.shape[0]):
        s = np.float32(0.0)
        row = w_bits[i]
        for k in range(row.size):
            s += widen(row[k]) * x[k]
        y[i] = s


STEPS = {"1 naive loop": gemv_naive, "2 parallel rows": gemv_parallel, "3 vectorized (fastmath)": gemv_vectorized,
         "4 bf16 widening": gemv_bf16}

__all__ = ["STEPS", "gemv_bf16", "gemv_naive", "gemv_parallel", "gemv_vectorized"]
