"""The machine's memory read: the one routine behind every "read" bandwidth offloadkit prints.

A decode kernel reads each weight once, so its speed limit is how fast these threads can *read*
memory. :func:`measure_read` measures that, always the same way, wherever a figure is printed
(``offloadkit profile``, ``offloadkit bench kernels``, notebooks 02 and 04):

- **buffer**: :data:`READ_BYTES` (512 MiB, far past any CPU's last-level cache), written once
  before timing so every page is resident;
- **threads**: all Numba threads, each reading one contiguous run (the way the decode kernels split
  their rows), folded into a checksum with 64-bit XORs so the compiler cannot drop the loads and no
  floating-point oddity (NaN, denormals) can slow them;
- **repeats**: one untimed read, then at least :data:`READ_REPEATS` timed reads, more while the
  total stays under :data:`READ_BUDGET_S` (at most :data:`MAX_SAMPLES`);
- **policy**: the figure is the best sample (the least disturbed read); every sample is kept, so a
  printed figure can carry its spread. On a shared machine the spread is the honest part: this
  project's VM reads anywhere from 28 to 68 GB/s within one afternoon, so two runs disagree, and only
  ratios taken within one run (:class:`ReadMeter` interleaved with the kernels) compare.

What it refuses to be: a full STREAM (no copy / scale / triad: a decode kernel only reads), or a
machine probe (:mod:`offloadkit.hardware.probe` owns profiles and calls :func:`measure_read`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from offloadkit.kernels.cpu.primitives import FAST

MIB = 2**20
READ_BYTES = 512 * MIB  #: the buffer every machine read figure comes from
READ_REPEATS = 7  #: timed reads, at least
READ_BUDGET_S = 0.5  #: keep reading while the timed reads total less than this
MAX_SAMPLES = 50
NOISY_SPREAD = 0.15  #: samples further apart than this (max / min - 1) are called noisy when printed


# ---- the read ------------------------------------------------------------------------------------

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


def read_buffer(nbytes: int = READ_BYTES) -> np.ndarray:
    """``nbytes`` of memory, every page written (so the first timed read does not fault pages in)."""
    return np.ones(max(nbytes // 8, 1), dtype=np.uint64)


# ---- the measurement -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ReadMeasurement:
    """Every timed read of one measurement: the figure is the best, the spread says how noisy it was."""

    nbytes: int
    threads: int
    samples_s: tuple[float, ...]

    @property
    def samples_gbps(self) -> tuple[float, ...]:
        return tuple(self.nbytes / s / 1e9 for s in self.samples_s)

    @property
    def gbps(self) -> float:
        """The figure: the best read (GB/s, 1e9 bytes per second)."""
        return self.nbytes / min(self.samples_s) / 1e9

    @property
    def spread(self) -> tuple[float, float, float]:
        """(slowest, median, fastest) sample in GB/s."""
        g = self.samples_gbps
        return min(g), statistics.median(g), max(g)

    @property
    def noisy(self) -> bool:
        lo, _, hi = self.spread
        return hi / lo - 1 > NOISY_SPREAD

    def describe(self) -> str:
        """``"33.1 GB/s (best of 9 reads of 512 MiB, 2 threads; samples 27.0-33.1, median 31.8)"``."""
        lo, mid, hi = self.spread
        size = f"{self.nbytes / MIB:.0f} MiB" if self.nbytes >= MIB else f"{self.nbytes} B"
        text = (f"{self.gbps:.1f} GB/s (best of {len(self.samples_s)} reads of {size}, {self.threads} threads; "
                f"samples {lo:.1f}-{hi:.1f}, median {mid:.1f})")
        if self.noisy:
            text += f"; the samples spread by {hi / lo - 1:.0%}: the machine is busy, expect other runs to differ"
        return text


class ReadMeter:
    """One buffer read again and again: take samples between other work, then :meth:`result`.

    ``offloadkit bench kernels`` takes a sample in every round, next to the kernels it compares with
    the read, so a neighbour's burst of load hits both sides of a ratio. The first read (compiling the
    kernel, warming the TLB) is not timed.
    """

    def __init__(self, arrays: Sequence[np.ndarray] | None = None, nbytes: int = READ_BYTES) -> None:
        self.arrays = list(arrays) if arrays is not None else [read_buffer(nbytes)]
        self.nbytes = sum(int(a.nbytes) for a in self.arrays)
        self.threads = numba.get_num_threads()
        self.samples_s: list[float] = []
        stream_read(self.arrays)

    def sample(self) -> float:
        """One timed read; returns its seconds."""
        t0 = time.perf_counter()
        stream_read(self.arrays)
        dt = time.perf_counter() - t0
        self.samples_s.append(dt)
        return dt

    def result(self, since: int = 0) -> ReadMeasurement:
        """The samples taken so far (from sample number ``since`` on), at least one."""
        if len(self.samples_s) <= since:
            self.sample()
        return ReadMeasurement(self.nbytes, self.threads, tuple(self.samples_s[since:]))


def measure_read(arrays: Sequence[np.ndarray] | None = None, *, nbytes: int = READ_BYTES,
                 repeats: int = READ_REPEATS, budget_s: float = READ_BUDGET_S) -> ReadMeasurement:
    """The memory read of this machine with all Numba threads (the policy in the module docstring).

    ``arrays`` reads those instead of a fresh :data:`READ_BYTES` buffer (tests, explorations); every
    figure offloadkit prints as "the memory read" uses the default.
    """
    meter = ReadMeter(arrays, nbytes)
    spent = 0.0
    while len(meter.samples_s) < repeats or (spent < budget_s and len(meter.samples_s) < MAX_SAMPLES):
        spent += meter.sample()
    return meter.result()


def read_gbps(arrays: Sequence[np.ndarray], repeats: int = 5) -> float:
    """Best-of-``repeats`` read of ``arrays`` (GB/s): :func:`measure_read` without a time budget."""
    return measure_read(arrays, repeats=repeats, budget_s=0.0).gbps


__all__ = ["MIB", "READ_BYTES", "ReadMeasurement", "ReadMeter", "measure_read", "read_buffer", "read_gbps",
           "stream_read"]
