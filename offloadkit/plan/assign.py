"""Token assignment: at every step, split each block's host rows between the CPU (CC) and streaming (CG).

Only GG rows are a memory decision; the host rows of a block (``rows - gg``) may run on the CPU or be
copied over PCIe and run on the GPU, and that boundary is free to move at every step
(docs/DESIGN.md section 6). :class:`TokenAssigner` is the one place that decides it, by the plan's
rule (``plan.assign``):

- ``balance`` (ScheInfer's token assignment, offloadkit's formulation): within a layer, minimise
  ``max(C, H, G)``, the busy time of the ``cpu``, ``h2d`` and ``gpu`` lanes, where computing ``c``
  rows of a block with ``n`` tokens costs the CPU ``c * a(n)`` (``a`` grows with ``n``: reading the
  rows, or their FLOPs) and streaming ``s`` rows costs the link ``s * p`` whatever ``n`` is (plus the
  GPU's ``s * g(n)``); the search is :func:`~offloadkit.plan.split_search.balance`. Decode
  (``n = 1``) leans on the CPU, prefill on streaming.
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

import math
from collections.abc import Sequence

from offloadkit.model.spec import Block, ModelSpec
from offloadkit.plan.costmodel import CostModel
from offloadkit.plan.plans import Plan, head_block
from offloadkit.plan.split_search import Item, balance

#: Row chunk that GG boundaries and CC/CG boundaries are aligned to (kernels stay efficient on whole tiles).
DEFAULT_CHUNK = 128
#: Kernel launches (GPU) or calls (CPU) of a slice of each block kind; the step builder uses the same table.
SLICE_LAUNCHES = {"attn_qkv": 3, "attn_o": 1, "expert": 3, "shared_expert": 3, "ffn": 3, "lm_head": 1}
BARRIER_KINDS = ("attn_qkv", "attn_o", "ffn")


def chunk_of(plan: Plan, block: Block) -> int:
    """The row chunk of ``block`` under ``plan`` (``plan.meta["chunk"]``, default 128, at most the block)."""
    return max(1, min(int(plan.meta.get("chunk", DEFAULT_CHUNK)), block.rows or 1))


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
        c, h, g = self.item(block, tokens).loads(streamed)
        return c, h, g + self.resident_load(block, tokens)

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


__all__ = ["BARRIER_KINDS", "DEFAULT_CHUNK", "SLICE_LAUNCHES", "TokenAssigner", "chunk_of"]
