"""The physical limit a decode kernel is measured against: how fast these threads can *read* memory.

A STREAM-like read touches every byte of the given arrays once, in the same contiguous runs per
thread as the decode kernels use (one run per Numba thread), and folds them into a checksum with
64-bit XORs so the compiler cannot drop the loads and no floating-point oddity (NaN, denormals) can
slow it down. Timing :func:`stream_read` over *the very weights a kernel reads* gives the ceiling for
that kernel on this machine, with the same threads, in the same run: the ratio of the two is what
``offloadkit bench kernels`` reports.

:func:`machine_label` names the machine for every measured figure ("AMD EPYC, 2 threads").

What it refuses to be: a full STREAM (no copy / scale / triad: a decode kernel only reads), or a
machine probe (``offloadkit.hardware`` owns profiles; it may call these functions).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numba
import numpy as np
from numba import njit, prange

from offloadkit.kernels.cpu.primitives import FAST


@njit(parallel=True, **FAST)
def _xor_chunks(a, n_chunks):
    part = np.zeros(n_chunks, dtype=np.uint64)
    for c in prange(n_chunks):
        seg = a[c * a.size // n_chunks:(c + 1) * a.size // n_chunks]
        s = np.uint64(0)
        for k in range(seg.size):
            s ^= seg[k]
        part[c] = s
    acc = np.uint64(0)
    for c in range(n_chunks):
        acc ^= part[c]
    return acc


def _words(a: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array as uint64 words (the tail of < 8 bytes is left out)."""
    flat = a.reshape(-1).view(np.uint8)
    return flat[:flat.size - flat.size % 8].view(np.uint64)


def stream_read(arrays: Sequence[np.ndarray]) -> int:
    """Read every byte of ``arrays`` once with all Numba threads; return a checksum (to keep the loads)."""
    acc = 0
    chunks = numba.get_num_threads()
    for a in arrays:
        acc ^= int(_xor_chunks(_words(np.ascontiguousarray(a)), chunks))
    return acc


def read_gbps(arrays: Sequence[np.ndarray], repeats: int = 5) -> float:
    """Best-of-``repeats`` read bandwidth (GB/s, 1e9 bytes) over ``arrays``, after one warm-up read."""
    nbytes = sum(int(a.nbytes) for a in arrays)
    stream_read(arrays)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        stream_read(arrays)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


__all__ = ["read_gbps", "stream_read"]
