"""The search inside token assignment: the best chunk-aligned CC / CG split of one barrier's host rows.

A barrier (docs/DESIGN.md section 6) is a set of blocks whose host rows run at once: each block ``i``
has ``host`` rows, costing the CPU ``a`` seconds per row it computes, the link ``p`` and the GPU ``g``
per row it streams, plus a fixed cost per non-empty slice. :func:`balance` chooses the streamed rows
``s_i`` (multiples of the chunk, or all) minimising the busiest lane, ``max(C, H, G)``:

- few chunks in all: exhaustive search (:func:`exact_split`; the split is a small knapsack there, where
  no greedy is safe);
- otherwise a prefix of the blocks ordered by ``a / p`` streams and one boundary block is split where
  the CPU meets the busier other lane (optimal for two lanes and linear costs, by an exchange argument;
  other orders are tried when the GPU binds), then repair moves: each block to its best split with
  the others fixed, and for a few blocks two blocks at once.

It knows nothing of models or plans: :class:`~offloadkit.plan.assign.TokenAssigner` prices the items
from the cost model and calls it. offloadkit's own search; it is small, runs inside the decode loop
(tens of microseconds a layer, ``benchmarks/plan_speed.py``), and an LP solver's call overhead alone
would exceed that.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

#: Steps with at most this many blocks to split also try moving two blocks at once.
PAIR_PASS_MAX = 10
#: Steps whose blocks have at most this many possible splits in all are searched exhaustively.
EXACT_MAX = 4096
#: A block of at most this many chunks is coarse: a split with one is searched exhaustively (when small).
COARSE_CHUNKS = 8


class Item:
    """One block's host rows at one step, with its per-row and per-slice prices (seconds)."""

    __slots__ = ("host", "chunk", "a", "p", "g", "fc", "fs", "fg", "tokens")

    def __init__(self, host: int, chunk: int, a: float, p: float, g: float, fc: float, fs: float, fg: float,
                 tokens: int) -> None:
        self.host, self.chunk, self.a, self.p, self.g = host, chunk, a, p, g
        self.fc, self.fs, self.fg, self.tokens = fc, fs, fg, tokens

    def loads(self, s: int) -> tuple[float, float, float]:
        """(cpu, h2d, gpu) seconds of this block's host rows when ``s`` of them stream."""
        return ((self.fc + (self.host - s) * self.a) if s < self.host else 0.0,
                (self.fs + s * self.p) if s else 0.0, (self.fg + s * self.g) if s else 0.0)

    def options(self) -> list[int]:
        """Streamed rows this block may take: multiples of its chunk, and all its host rows."""
        return sorted({*range(0, self.host, self.chunk), self.host})


def lane_loads(items: Sequence[Item], streamed: Sequence[int], base: tuple[float, float, float]
               ) -> tuple[float, float, float]:
    """(cpu, h2d, gpu) busy seconds of a layer when item ``i`` streams ``streamed[i]`` rows."""
    c, h, g = base
    for it, s in zip(items, streamed, strict=True):
        dc, dh, dg = it.loads(s)
        c, h, g = c + dc, h + dh, g + dg
    return c, h, g


def layer_objective(items: Sequence[Item], streamed: Sequence[int], base: tuple[float, float, float]) -> float:
    """What ``balance`` minimises: the busiest lane of the layer."""
    return max(lane_loads(items, streamed, base))


def _aligned(s: float, it: Item) -> list[int]:
    if s >= it.host:
        return [it.host]
    lo = int(s // it.chunk) * it.chunk
    return [lo, min(lo + it.chunk, it.host)]


def balance(items: Sequence[Item], base: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> list[int]:
    """Streamed rows per item minimising :func:`layer_objective` (see the module docstring)."""
    n = len(items)
    if n == 0:
        return []
    coarse = any(it.host <= COARSE_CHUNKS * it.chunk for it in items)
    if coarse and math.prod(min(it.host // it.chunk + 2, EXACT_MAX + 1) for it in items) <= EXACT_MAX:
        # blocks of a few chunks: the split is a small knapsack, where no greedy is safe; search it
        return exact_split(items, base)
    # Which blocks stream first: the most CPU time saved per second of link (a / p), per second of GPU
    # (a / g), or of a mix of both; with one lane binding beside the CPU one order is optimal, with both
    # none is (the weights of the mix are the LP's duals, unknown here), so a few are tried and the best
    # split kept, then repaired by the moves of _polish.
    best: tuple[float, list[int]] | None = None
    for k, cost in enumerate((lambda it: it.p, lambda it: it.g, lambda it: it.p + it.g, lambda it: it.p + 3 * it.g,
                              lambda it: 3 * it.p + it.g)):
        streamed, lower = _prefix_split(items, base, cost)
        c, h, g = lane_loads(items, streamed, base)
        v = max(c, h, g)
        if best is None or v < best[0] - 1e-15:
            best = (v, streamed)
        if k == 0 and g < max(c, h):  # the GPU does not bind: a / p is the order (the usual case)
            if not coarse and v <= 1.005 * lower:  # within 0.5% of the two-lane optimum: single moves left
                return _polish(items, streamed, base, thorough=False, pairs=False)
            break
    assert best is not None
    return _polish(items, best[1], base, thorough=coarse)


def _pair_search(items: Sequence[Item], streamed: list[int], loads: tuple[float, float, float], best: float
                 ) -> tuple[bool, float, float, float, float]:
    """Re-split two blocks jointly, the others fixed: with three lanes the best split can have two
    partly streamed blocks, which no move of one chunk reaches. For each pair, a ternary search over the
    first block's chunks (the best time for a given first split is convex in it), the second block set
    at the chunk where the CPU meets the busier other lane. First improvement is applied."""
    c, h, g = loads
    partial = [k for k, it in enumerate(items) if 0 < streamed[k] < it.host]
    for i, j in itertools.permutations(range(len(items)), 2):
        if i not in partial and j not in partial:  # an optimum moves a partly streamed block
            continue
        a, b = items[i], items[j]
        pi, pj = a.loads(streamed[i]), b.loads(streamed[j])
        rest = (c - pi[0] - pj[0], h - pi[1] - pj[1], g - pi[2] - pj[2])
        opts = a.options()

        def best_j(si: int, a: Item = a, b: Item = b, rest: tuple[float, float, float] = rest
                   ) -> tuple[float, int]:
            return _best_second(a, b, rest, si)

        lo, hi = 0, len(opts) - 1
        while hi - lo > 2:
            m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
            if best_j(opts[m1])[0] <= best_j(opts[m2])[0]:
                hi = m2
            else:
                lo = m1
        v, si, sj = _argmin_pair(best_j, opts, lo, hi)
        if v < best - 1e-15:
            qi, qj = a.loads(si), b.loads(sj)
            streamed[i], streamed[j] = si, sj
            c, h, g = rest[0] + qi[0] + qj[0], rest[1] + qi[1] + qj[1], rest[2] + qi[2] + qj[2]
            return True, c, h, g, max(c, h, g)
    return False, c, h, g, best


def _best_second(a: Item, b: Item, rest: tuple[float, float, float], si: int) -> tuple[float, int]:
    """(time, split of ``b``) when ``a`` streams ``si`` rows and the others load the lanes with ``rest``."""
    qi = a.loads(si)
    c1, h1, g1 = rest[0] + qi[0], rest[1] + qi[1], rest[2] + qi[2]
    full = c1 + b.fc + b.host * b.a
    s1 = (full - h1 - b.fs) / (b.a + b.p) if b.a + b.p > 0 else b.host
    s2 = (full - g1 - b.fg) / (b.a + b.g) if b.a + b.g > 0 else b.host
    out = (math.inf, 0)
    for sj in {0, b.host, *_aligned(max(0.0, min(s1, s2)), b), *_aligned(max(0.0, max(s1, s2)), b)}:
        if 0 <= sj <= b.host:
            qj = b.loads(sj)
            out = min(out, (max(c1 + qj[0], h1 + qj[1], g1 + qj[2]), sj))
    return out


def _argmin_pair(best_j: Callable[[int], tuple[float, int]], opts: list[int], lo: int, hi: int
                 ) -> tuple[float, int, int]:
    """(time, first split, second split) of the best first split among ``opts[lo..hi]``."""
    out = (math.inf, 0, 0)
    for k in range(lo, hi + 1):
        v, sj = best_j(opts[k])
        if v < out[0]:
            out = (v, opts[k], sj)
    return out


def exact_split(items: Sequence[Item], base: tuple[float, float, float]) -> list[int]:
    """The best split by exhaustive search: a plain loop for a few combinations, else vectorised."""
    opts = [it.options() for it in items]
    if math.prod(len(o) for o in opts) <= 64:
        return list(min(itertools.product(*opts), key=lambda s: layer_objective(items, s, base)))
    shape = [len(o) for o in opts]
    totals = [np.full(shape, float(b0)) for b0 in base]
    for i, (it, o) in enumerate(zip(items, opts, strict=True)):
        s = np.asarray(o, dtype=np.float64)
        loads = (np.where(s < it.host, it.fc + (it.host - s) * it.a, 0.0), np.where(s > 0, it.fs + s * it.p, 0.0),
                 np.where(s > 0, it.fg + s * it.g, 0.0))
        view = [-1 if d == i else 1 for d in range(len(items))]
        for lane in range(3):
            totals[lane] = totals[lane] + loads[lane].reshape(view)
    best = np.unravel_index(int(np.argmin(np.maximum(np.maximum(totals[0], totals[1]), totals[2]))), shape)
    return [int(o[k]) for o, k in zip(opts, best, strict=True)]


def _prefix_split(items: Sequence[Item], base: tuple[float, float, float],
                  stream_cost: Callable[[Item], float]) -> tuple[list[int], float]:
    """Stream a prefix of the blocks ordered by ``a / stream_cost`` (then most tokens first) and split one
    boundary block at the chunk where the CPU meets the busier of the link and the GPU. Also returns the
    best time with the boundary block split at any row (no chunk rounding): with the GPU lane idle and
    the order ``a / p`` that is a lower bound on every split (the two-lane LP's optimum)."""
    n = len(items)
    order = sorted(range(n), key=lambda i: (-(items[i].a / stream_cost(items[i])) if stream_cost(items[i]) > 0
                                            else -math.inf, -items[i].tokens, i))
    c0, h0, g0 = base
    cpu = c0 + sum(it.fc + it.host * it.a for it in items)
    h2d, gpu = h0, g0
    best_val, best_k, best_s = max(cpu, h2d, gpu), 0, 0
    lower = best_val
    for k, i in enumerate(order):
        it = items[i]
        cj = cpu - it.fc - it.host * it.a  # the other items' loads, block i out
        full = cj + it.fc + it.host * it.a
        s1 = (full - h2d - it.fs) / (it.a + it.p) if it.a + it.p > 0 else it.host
        s2 = (full - gpu - it.fg) / (it.a + it.g) if it.a + it.g > 0 else it.host
        cont = max(0.0, min(s1, s2, it.host))  # the continuous balance point: no chunk rounding
        c = cj + it.fc + (it.host - cont) * it.a
        lower = min(lower, max(c, h2d + it.fs + cont * it.p, gpu + it.fg + cont * it.g))
        for s in {0, it.host, *_aligned(max(0.0, min(s1, s2)), it)}:
            c = cj + (it.fc + (it.host - s) * it.a if s < it.host else 0.0)
            h = h2d + (it.fs + s * it.p if s else 0.0)
            g = gpu + (it.fg + s * it.g if s else 0.0)
            v = max(c, h, g)
            if v < best_val - 1e-15:
                best_val, best_k, best_s = v, k, s
        cpu, h2d, gpu = cj, h2d + it.fs + it.host * it.p, gpu + it.fg + it.host * it.g
    streamed = [0] * n
    for k in range(best_k):
        streamed[order[k]] = items[order[k]].host
    streamed[order[best_k]] = best_s
    return streamed, lower


def _polish(items: Sequence[Item], streamed: list[int], base: tuple[float, float, float],
            thorough: bool = True, pairs: bool = True) -> list[int]:
    """One-chunk moves (and whole-block flips) while they lower the busiest lane, then, for a few blocks,
    moves of two blocks at once; at most a few passes. The lane loads are updated by each move's
    difference, so a pass of single moves costs O(items)."""
    c, h, g = lane_loads(items, streamed, base)
    best = max(c, h, g)


    for _ in range(8):
        improved = False
        for i, it in enumerate(items):  # coordinate descent: each block to its best split, the others fixed
            cur = streamed[i]
            pc, ph, pg = it.loads(cur)
            rest = (c - pc, h - ph, g - pg)
            full = rest[0] + it.fc + it.host * it.a
            s1 = (full - rest[1] - it.fs) / (it.a + it.p) if it.a + it.p > 0 else it.host
            s2 = (full - rest[2] - it.fg) / (it.a + it.g) if it.a + it.g > 0 else it.host
            cands = {max(0, cur - it.chunk), min(it.host, cur + it.chunk), 0, it.host,
                     *_aligned(max(0.0, min(s1, s2)), it), *_aligned(max(0.0, max(s1, s2)), it)}
            for s in cands - {cur}:
                if not 0 <= s <= it.host:
                    continue
                qc, qh, qg = it.loads(s)
                nc, nh, ng = rest[0] + qc, rest[1] + qh, rest[2] + qg
                v = max(nc, nh, ng)
                if v < best - 1e-15:
                    best, cur, improved = v, s, True
                    c, h, g = nc, nh, ng
            streamed[i] = cur
        # moves of two blocks at once, where they can matter: coarse blocks, or the GPU lane binding
        if not improved and len(items) <= PAIR_PASS_MAX and (thorough or g >= max(c, h)):
            improved, c, h, g, best = _pair_pass(items, streamed, (c, h, g), best)
        if not improved and pairs and len(items) <= PAIR_PASS_MAX:
            improved, c, h, g, best = _pair_search(items, streamed, (c, h, g), best)
        if not improved:
            break
    return streamed


def _pair_pass(items: Sequence[Item], streamed: list[int], loads: tuple[float, float, float], best: float
               ) -> tuple[bool, float, float, float, float]:
    """Move two blocks at once (each to a neighbouring chunk, none or all): what a single move cannot do
    when blocks are a chunk or two (then the split is a small knapsack). First improvement is applied."""
    c, h, g = loads
    for i, j in itertools.combinations(range(len(items)), 2):
        a, b = items[i], items[j]
        si, sj = streamed[i], streamed[j]
        pi, pj = a.loads(si), b.loads(sj)
        for ni in {max(0, si - a.chunk), min(a.host, si + a.chunk), 0, a.host} - {si}:
            qi = a.loads(ni)
            for nj in {max(0, sj - b.chunk), min(b.host, sj + b.chunk), 0, b.host} - {sj}:
                qj = b.loads(nj)
                nc = c - pi[0] - pj[0] + qi[0] + qj[0]
                nh = h - pi[1] - pj[1] + qi[1] + qj[1]
                ng = g - pi[2] - pj[2] + qi[2] + qj[2]
                v = max(nc, nh, ng)
                if v < best - 1e-15:
                    streamed[i], streamed[j] = ni, nj
                    return True, nc, nh, ng, v
    return False, c, h, g, best


__all__ = ["COARSE_CHUNKS", "EXACT_MAX", "PAIR_PASS_MAX", "Item", "balance", "exact_split", "lane_loads",
           "layer_objective"]
