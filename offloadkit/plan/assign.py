"""Token assignment: at every step, split each block's host rows between the CPU (CC) and streaming (CG).

Only GG rows are a memory decision; the host rows of a block (``rows - gg``) may run on the CPU or be
copied over PCIe and run on the GPU, and that boundary is free to move at every step
(docs/DESIGN.md section 6). :class:`TokenAssigner` is the one place that decides it, by the plan's
rule (``plan.assign``):

- ``balance`` (ScheInfer's token assignment, offloadkit's formulation): within a layer, minimise
  ``max(C, H, G)``, the busy time of the ``cpu``, ``h2d`` and ``gpu`` lanes, where computing ``c``
  rows of a block with ``n`` tokens costs the CPU ``c * a(n)`` (``a`` grows with ``n``: reading the
  rows, or their FLOPs) and streaming ``s`` rows costs the link ``s * p`` whatever ``n`` is (plus the
  GPU's ``s * g(n)``). Blocks are taken in decreasing ``a / p`` (most tokens first): streaming a
  prefix of them and one boundary block split at a row chunk is optimal for ``max(C, H)`` with linear
  costs (an exchange argument, as for the fractional knapsack); a pass of one-chunk moves then
  repairs what per-slice overheads, the GPU lane and chunk rounding leave. Decode (``n = 1``) leans
  on the CPU, prefill on streaming.
- ``threshold`` (llama.cpp's op offload): all host rows stream when the op has ``>= stream_min_tokens``
  tokens (every token of the step for the experts of a layer: they are one ``MUL_MAT_ID`` op), else none.
- ``fiddler`` (Fiddler's ``src/fiddler/mixtral.py``): each non-resident expert runs whole on the CPU
  when ``tokens * latency_cpu < latency_copy`` (the CPU's time grows with its tokens, a copy's does
  not), else it is copied whole; dense host blocks run on the CPU.
- ``cpu``: host rows always run on the CPU.

Honest about timing: the attention projections and a dense FFN are split when the layer starts (from
the token count), each balanced on its own because what follows needs all its rows; the routed experts
and a shared expert are split together after the router ran, from its real choices (their copies
cannot start before). Prices come from the :class:`~offloadkit.plan.costmodel.CostModel`, cached per
block and token count, so a layer costs microseconds (``benchmarks/plan_speed.py``). The same loads,
summed barrier by barrier (:meth:`TokenAssigner.layer_time`), are what the partition optimises.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

from offloadkit.model.spec import Block, ModelSpec
from offloadkit.plan.costmodel import CostModel
from offloadkit.plan.plans import Plan, head_block

#: Row chunk that GG boundaries and CC/CG boundaries are aligned to (kernels stay efficient on whole tiles).
DEFAULT_CHUNK = 128
#: Steps with at most this many blocks to split also try moving two blocks at once (see ``_pair_pass``).
PAIR_PASS_MAX = 10
#: Steps whose blocks have at most this many possible splits in all are searched exhaustively.
EXACT_MAX = 4096
#: A block of at most this many chunks is coarse: a split with one is searched exhaustively (when small).
COARSE_CHUNKS = 8
#: Kernel launches (GPU) or calls (CPU) of a slice of each block kind; the step builder uses the same table.
SLICE_LAUNCHES = {"attn_qkv": 3, "attn_o": 1, "expert": 3, "shared_expert": 3, "ffn": 3, "lm_head": 1}
BARRIER_KINDS = ("attn_qkv", "attn_o", "ffn")


def chunk_of(plan: Plan, block: Block) -> int:
    """The row chunk of ``block`` under ``plan`` (``plan.meta["chunk"]``, default 128, at most the block)."""
    return max(1, min(int(plan.meta.get("chunk", DEFAULT_CHUNK)), block.rows or 1))


class Item:
    """One block's host rows at one step, with its per-row and per-slice prices (seconds)."""

    __slots__ = ("host", "chunk", "a", "p", "g", "fc", "fs", "fg", "tokens")

    def __init__(self, host: int, chunk: int, a: float, p: float, g: float, fc: float, fs: float, fg: float,
                 tokens: int) -> None:
        self.host, self.chunk, self.a, self.p, self.g = host, chunk, a, p, g
        self.fc, self.fs, self.fg, self.tokens = fc, fs, fg, tokens

    def options(self) -> list[int]:
        """Streamed rows this block may take: multiples of its chunk, and all its host rows."""
        return sorted({*range(0, self.host, self.chunk), self.host})


def lane_loads(items: Sequence[Item], streamed: Sequence[int], base: tuple[float, float, float]
               ) -> tuple[float, float, float]:
    """(cpu, h2d, gpu) busy seconds of a layer when item ``i`` streams ``streamed[i]`` rows."""
    c, h, g = base
    for it, s in zip(items, streamed, strict=True):
        if s < it.host:
            c += it.fc + (it.host - s) * it.a
        if s:
            h += it.fs + s * it.p
            g += it.fg + s * it.g
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


def _pair_search(items: Sequence[Item], streamed: list[int], loads: tuple[float, float, float], best: float,
                 part: Callable[[Item, int], tuple[float, float, float]]
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
        pi, pj = part(a, streamed[i]), part(b, streamed[j])
        rest = (c - pi[0] - pj[0], h - pi[1] - pj[1], g - pi[2] - pj[2])
        opts = a.options()

        def best_j(si: int, a: Item = a, b: Item = b, rest: tuple[float, float, float] = rest) -> tuple[float, int]:
            return _best_second(a, b, rest, si, part)

        lo, hi = 0, len(opts) - 1
        while hi - lo > 2:
            m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
            if best_j(opts[m1])[0] <= best_j(opts[m2])[0]:
                hi = m2
            else:
                lo = m1
        v, si, sj = _argmin_pair(best_j, opts, lo, hi)
        if v < best - 1e-15:
            qi, qj = part(a, si), part(b, sj)
            streamed[i], streamed[j] = si, sj
            c, h, g = rest[0] + qi[0] + qj[0], rest[1] + qi[1] + qj[1], rest[2] + qi[2] + qj[2]
            return True, c, h, g, max(c, h, g)
    return False, c, h, g, best


def _best_second(a: Item, b: Item, rest: tuple[float, float, float], si: int,
                  part: Callable[[Item, int], tuple[float, float, float]]) -> tuple[float, int]:
    """(time, split of ``b``) when ``a`` streams ``si`` rows and the others load the lanes with ``rest``."""
    qi = part(a, si)
    c1, h1, g1 = rest[0] + qi[0], rest[1] + qi[1], rest[2] + qi[2]
    full = c1 + b.fc + b.host * b.a
    s1 = (full - h1 - b.fs) / (b.a + b.p) if b.a + b.p > 0 else b.host
    s2 = (full - g1 - b.fg) / (b.a + b.g) if b.a + b.g > 0 else b.host
    out = (math.inf, 0)
    for sj in {0, b.host, *_aligned(max(0.0, min(s1, s2)), b), *_aligned(max(0.0, max(s1, s2)), b)}:
        if 0 <= sj <= b.host:
            qj = part(b, sj)
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

    def part(it: Item, s: int) -> tuple[float, float, float]:
        return ((it.fc + (it.host - s) * it.a) if s < it.host else 0.0,
                (it.fs + s * it.p) if s else 0.0, (it.fg + s * it.g) if s else 0.0)

    for _ in range(8):
        improved = False
        for i, it in enumerate(items):  # coordinate descent: each block to its best split, the others fixed
            cur = streamed[i]
            pc, ph, pg = part(it, cur)
            rest = (c - pc, h - ph, g - pg)
            full = rest[0] + it.fc + it.host * it.a
            s1 = (full - rest[1] - it.fs) / (it.a + it.p) if it.a + it.p > 0 else it.host
            s2 = (full - rest[2] - it.fg) / (it.a + it.g) if it.a + it.g > 0 else it.host
            cands = {max(0, cur - it.chunk), min(it.host, cur + it.chunk), 0, it.host,
                     *_aligned(max(0.0, min(s1, s2)), it), *_aligned(max(0.0, max(s1, s2)), it)}
            for s in cands - {cur}:
                if not 0 <= s <= it.host:
                    continue
                qc, qh, qg = part(it, s)
                nc, nh, ng = rest[0] + qc, rest[1] + qh, rest[2] + qg
                v = max(nc, nh, ng)
                if v < best - 1e-15:
                    best, cur, improved = v, s, True
                    c, h, g = nc, nh, ng
            streamed[i] = cur
        # moves of two blocks at once, where they can matter: coarse blocks, or the GPU lane binding
        if not improved and len(items) <= PAIR_PASS_MAX and (thorough or g >= max(c, h)):
            improved, c, h, g, best = _pair_pass(items, streamed, (c, h, g), best, part)
        if not improved and pairs and len(items) <= PAIR_PASS_MAX:
            improved, c, h, g, best = _pair_search(items, streamed, (c, h, g), best, part)
        if not improved:
            break
    return streamed


def _pair_pass(items: Sequence[Item], streamed: list[int], loads: tuple[float, float, float], best: float,
               part: Callable[[Item, int], tuple[float, float, float]]
               ) -> tuple[bool, float, float, float, float]:
    """Move two blocks at once (each to a neighbouring chunk, none or all): what a single move cannot do
    when blocks are a chunk or two (then the split is a small knapsack). First improvement is applied."""
    c, h, g = loads
    for i, j in itertools.combinations(range(len(items)), 2):
        a, b = items[i], items[j]
        si, sj = streamed[i], streamed[j]
        pi, pj = part(a, si), part(b, sj)
        for ni in {max(0, si - a.chunk), min(a.host, si + a.chunk), 0, a.host} - {si}:
            qi = part(a, ni)
            for nj in {max(0, sj - b.chunk), min(b.host, sj + b.chunk), 0, b.host} - {sj}:
                qj = part(b, nj)
                nc = c - pi[0] - pj[0] + qi[0] + qj[0]
                nh = h - pi[1] - pj[1] + qi[1] + qj[1]
                ng = g - pi[2] - pj[2] + qi[2] + qj[2]
                v = max(nc, nh, ng)
                if v < best - 1e-15:
                    streamed[i], streamed[j] = ni, nj
                    return True, nc, nh, ng, v
    return False, c, h, g, best


class TokenAssigner:
    """Decides every step's CC / CG split under one plan; see the module docstring.

    ``dense(layer, n)`` -> {block name: streamed rows} for the layer's dense blocks; ``experts(layer,
    n, counts, dense)`` -> streamed rows per expert, after the router; ``head(n)`` -> streamed rows of
    the lm_head. Rows are counted from the block's first host row: CG is ``[gg, gg + s)``, CC the rest.
    """

    def __init__(self, spec: ModelSpec, plan: Plan, cost: CostModel) -> None:
        self.spec, self.plan, self.cost, self.rule = spec, plan, cost, plan.assign
        #: per layer: the barrier blocks (attention projections, dense FFN), the shared expert, the routed experts
        self.layers: list[tuple[list[Block], Block | None, list[Block]]] = []
        for layer in range(spec.n_layers):
            blocks = list(spec.layer_blocks(layer))
            shared = [b for b in blocks if b.kind == "shared_expert"]
            self.layers.append(([b for b in blocks if b.kind in BARRIER_KINDS], shared[0] if shared else None,
                                [b for b in blocks if b.kind == "expert"]))
        self.head_block = head_block(spec)
        #: the blocks outside the layers by kind (embed, final_norm, lm_head), for the step builder
        self.head_blocks = {b.kind: b for b in spec.blocks() if b.layer is None}
        self.h2d_bw = 0.0
        if cost.has_gpu:
            self.h2d_bw = cost.h2d_pinned if plan.pinned else cost.h2d_pageable
        self._price: dict[tuple[int, int, int, int], tuple[float, float]] = {}
        self._items: dict[tuple[str, int], Item] = {}
        self._dense: dict[tuple[int, int], dict[str, int]] = {}
        self._resident: dict[tuple[str, int], float] = {}

    # ---- prices ---------------------------------------------------------------------------------------

    def prices(self, block: Block, tokens: int) -> tuple[float, float]:
        """(CPU, GPU) seconds per row of ``block`` at ``tokens`` tokens, overheads excluded (cached)."""
        launches = SLICE_LAUNCHES.get(block.kind, 1)
        key = (block.params, block.rows, tokens, launches)
        hit = self._price.get(key)
        if hit is None:
            c = self.cost
            a = (c.matmul_s("cpu", block.params, tokens, 0.0, launches) - c.cpu_overhead * launches) / block.rows
            g = 0.0
            if c.has_gpu:
                g = (c.matmul_s("gpu", block.params, tokens, 0.0, launches) - c.gpu_overhead * launches) / block.rows
            hit = self._price[key] = (max(a, 0.0), max(g, 0.0))
        return hit

    def item(self, block: Block, tokens: int) -> Item:
        """The host rows of ``block`` at a step where ``tokens`` tokens use it (cached; do not modify)."""
        key = (block.name, tokens)
        hit = self._items.get(key)
        if hit is None:
            hit = self._items[key] = self._item(block, tokens)
        return hit

    def _item(self, block: Block, tokens: int) -> Item:
        host = block.rows - min(self.plan.gg_rows.get(block.name, 0), block.rows)
        a, g = self.prices(block, tokens)
        c = self.cost
        launches = SLICE_LAUNCHES.get(block.kind, 1)
        row_bytes = block.params * c.weight_bytes / block.rows
        p = row_bytes / self.h2d_bw if self.h2d_bw else math.inf
        return Item(host, chunk_of(self.plan, block), a, p, g, c.cpu_overhead * launches,
                    c.link_latency if c.has_gpu else 0.0, c.gpu_overhead * launches, tokens)

    def resident_load(self, block: Block, tokens: int) -> float:
        """GPU seconds of the GG rows of ``block`` at ``tokens`` tokens (the gpu lane's fixed load)."""
        key = (block.name, tokens)
        hit = self._resident.get(key)
        if hit is None:
            gg = min(self.plan.gg_rows.get(block.name, 0), block.rows)
            hit = self._resident[key] = gg * self.prices(block, tokens)[1] if gg else 0.0
        return hit

    # ---- decisions ------------------------------------------------------------------------------------

    def dense(self, layer: int, n: int) -> dict[str, int]:
        """Streamed rows of the layer's attention projections and dense FFN at a step of ``n`` tokens,
        decided when the layer starts. Each is a barrier (what follows needs all its rows), so each is
        balanced on its own. (Cached per layer and ``n``.)"""
        key = (layer, n)
        hit = self._dense.get(key)
        if hit is None:
            out = {}
            for b in self.layers[layer][0]:
                if b.rows > self.plan.gg_rows.get(b.name, 0):
                    s = self._decide([self.item(b, n)], n, (0.0, 0.0, self.resident_load(b, n)))[0]
                    if s:
                        out[b.name] = s
            hit = self._dense[key] = out
        return hit

    def moe(self, layer: int, n: int, counts: Sequence[int]) -> tuple[int, list[int]]:
        """Streamed rows of the shared expert (0 without one) and of each routed expert, after the router
        chose ``counts`` (tokens per expert): they run side by side, so they are balanced together."""
        _, shared, blocks = self.layers[layer]
        out = [0] * len(blocks)
        if self.rule == "cpu" or not self.cost.has_gpu:
            return 0, out
        idx = [e for e, c in enumerate(counts) if c and blocks[e].rows > self.plan.gg_rows.get(blocks[e].name, 0)]
        items = [self.item(blocks[e], int(counts[e])) for e in idx]
        if self.rule == "fiddler":  # Fiddler's rule, per expert: tokens x latency_cpu against latency_copy
            for e, it in zip(idx, items, strict=True):
                latency_cpu = (it.fc + it.host * self.prices(blocks[e], 1)[0]) * it.tokens
                out[e] = it.host if latency_cpu > it.fs + it.host * it.p else 0
            return 0, out
        g0 = sum(self.resident_load(b, int(k)) for b, k in zip(blocks, counts, strict=True) if k)
        if shared is not None:
            g0 += self.resident_load(shared, n)
            if shared.rows > self.plan.gg_rows.get(shared.name, 0):
                items.append(self.item(shared, n))
        split = self._decide(items, n, (0.0, 0.0, g0))
        for e, s in zip(idx, split[:len(idx)], strict=True):
            out[e] = s
        return (split[-1] if len(split) > len(idx) else 0), out

    def experts(self, layer: int, n: int, counts: Sequence[int]) -> list[int]:
        """Streamed rows per routed expert of ``layer`` (see :meth:`moe`)."""
        return self.moe(layer, n, counts)[1]

    def _decide(self, items: list[Item], op_tokens: int, base: tuple[float, float, float]) -> list[int]:
        if self.rule == "cpu" or self.rule == "fiddler" or not self.cost.has_gpu:
            return [0] * len(items)
        if self.rule == "threshold":
            go = self.plan.stream_min_tokens is not None and op_tokens >= self.plan.stream_min_tokens
            return [it.host if go else 0 for it in items]
        return balance(items, base)

    def _loads(self, block: Block, tokens: int, streamed: int) -> tuple[float, float, float]:
        """(cpu, h2d, gpu) seconds of one block at ``tokens`` tokens with ``streamed`` host rows streamed."""
        it = self.item(block, tokens)
        g = self.resident_load(block, tokens)
        c = it.fc + (it.host - streamed) * it.a if streamed < it.host else 0.0
        h = it.fs + streamed * it.p if streamed else 0.0
        if streamed:
            g += it.fg + streamed * it.g
        return c, h, g

    def phase_loads(self, layer: int, n: int, counts: Sequence[int]) -> list[tuple[float, float, float]]:
        """The layer's barriers in order, each as (cpu, h2d, gpu) seconds of weight work (attention and norms
        left out): the attention projections, then a dense FFN or the experts (routed and shared together)."""
        barriers, shared, blocks = self.layers[layer]
        dense = self.dense(layer, n)
        out = [self._loads(b, n, dense.get(b.name, 0)) for b in barriers]
        if blocks:
            s_shared, cg = self.moe(layer, n, counts)
            parts = [self._loads(blocks[e], int(k), cg[e]) for e, k in enumerate(counts) if k]
            if shared is not None:
                parts.append(self._loads(shared, n, s_shared))
            out.append(tuple(map(sum, zip(*parts, strict=True))) if parts else (0.0, 0.0, 0.0))  # type: ignore
        return out

    def layer_loads(self, layer: int, n: int, counts: Sequence[int]) -> tuple[float, float, float]:
        """(cpu, h2d, gpu) seconds of the layer's weight work, all barriers together."""
        return tuple(map(sum, zip(*self.phase_loads(layer, n, counts), strict=True)))  # type: ignore[return-value]

    def layer_time(self, layer: int, n: int, counts: Sequence[int]) -> float:
        """The planner's estimate of the layer's weight time: the busiest lane of each barrier, summed."""
        return sum(map(max, self.phase_loads(layer, n, counts)))

    def head_loads(self, n: int) -> tuple[float, float, float]:
        """(cpu, h2d, gpu) seconds of the lm_head at a step sampling ``n`` positions."""
        return self._loads(self.head_block, n, self.head(n))

    def head(self, n: int) -> int:
        """Streamed rows of the lm_head at a step that samples ``n`` positions."""
        b = self.head_block
        if b.rows <= self.plan.gg_rows.get(b.name, 0):
            return 0
        return self._decide([self.item(b, n)], n, (0.0, 0.0, self.resident_load(b, n)))[0]


__all__ = ["DEFAULT_CHUNK", "SLICE_LAUNCHES", "Item", "TokenAssigner", "balance", "chunk_of", "lane_loads",
           "layer_objective"]
