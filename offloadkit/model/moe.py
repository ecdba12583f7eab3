"""The feed-forward math every engine shares: SwiGLU over row slices, the routers, expert dispatch.

These are the pieces the engine reuses when it splits a block into CC / CG / GG row slices
(docs/DESIGN.md section 3), so they are plain functions over tensors, not modules:

- :func:`swiglu` computes ``W2[:, r0:r1] · (silu(W1[r0:r1] x) ⊙ W3[r0:r1] x)``; the partials over
  any split of the intermediate rows sum to the full output.
- :func:`route_softmax_topk` (Mixtral, Qwen2-MoE) and :func:`route_sparsemixer` (PhiMoE at
  inference) turn router logits into (weights, experts) per token, as transformers 5.23 does.
- :func:`dispatch_experts` runs each chosen expert once over the tokens that chose it and adds the
  weighted outputs back, with out-of-place ``index_add`` so autograd can train through it.

Weights are widened to the activations' dtype *at use*, after slicing, so a bf16 memory-mapped
expert is never copied whole. Nothing here is fast; it is meant to be obviously right. It refuses to
do routing in training mode (PhiMoE's Gumbel sampling, jitter noise): the oracle is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

#: ``expert(e, x) -> y``: expert ``e`` applied to the rows ``x`` [n, H] that chose it.
ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


def _use(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``w`` widened (or narrowed) to ``like``'s dtype and device; a no-op when they already match."""
    return w.to(device=like.device, dtype=like.dtype)


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
           rows: tuple[int, int] | None = None) -> torch.Tensor:
    """SwiGLU FFN ``y = W2 · (silu(W1 x) ⊙ W3 x)`` over intermediate rows ``[r0, r1)`` (all if None).

    ``x`` [..., H]; ``w_gate``, ``w_up`` [I, H]; ``w_down`` [H, I] (the Hub layout). Computes in
    ``x.dtype``. ``swiglu(x, *w, rows=(0, g)) + swiglu(x, *w, rows=(g, I)) == swiglu(x, *w)`` up to
    summation order.
    """
    if rows is not None:
        r0, r1 = rows
        if not 0 <= r0 <= r1 <= w_gate.shape[0]:
            raise ValueError(f"rows {rows} outside the intermediate dimension [0, {w_gate.shape[0]})")
        w_gate, w_up, w_down = w_gate[r0:r1], w_up[r0:r1], w_down[:, r0:r1]
    h = F.silu(F.linear(x, _use(w_gate, x))) * F.linear(x, _use(w_up, x))
    return F.linear(h, _use(w_down, x))


# ---- routers ---------------------------------------------------------------------------------------


def route_softmax_topk(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen2-MoE routing: softmax over all experts, keep the ``top_k`` largest, and
    renormalize them to sum to 1 if ``normalize``. ``logits`` [N, E] -> (weights f32 [N, k], experts [N, k])."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def _sparsemixer_mask(scores: torch.Tensor, top: torch.Tensor, jitter_eps: float) -> torch.Tensor:
    """True where an expert's score is too far below ``top`` to share the gate (relative gap > 2 eps)."""
    factor = scores.abs().clamp(min=top)
    return ((top - scores) / factor) > (2 * jitter_eps)


def route_sparsemixer(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer, top-2, inference branch (``training=False`` in transformers).

    Expert 1 is the argmax; its weight is its softmax share among the experts whose score is within
    a relative ``2 * jitter_eps`` of the max. Expert 2 is the argmax with expert 1 removed; its weight
    is its softmax share among the remaining experts within ``2 * jitter_eps`` of *that* max.
    ``logits`` [N, E] -> (weights [N, 2], experts [N, 2]).
    """
    scores = logits
    with torch.no_grad():
        top1, first = scores.max(dim=-1, keepdim=True)
        mask1 = _sparsemixer_mask(scores, top1, jitter_eps)
    w1 = torch.softmax(scores.masked_fill(mask1, float("-inf")), dim=-1).gather(-1, first)

    without_first = torch.scatter(scores, -1, first, float("-inf"))
    with torch.no_grad():
        top2, second = without_first.max(dim=-1, keepdim=True)
        mask2 = _sparsemixer_mask(scores, top2, jitter_eps)
    w2 = torch.softmax(without_first.masked_fill(mask2, float("-inf")), dim=-1).gather(-1, second)
    return torch.cat((w1, w2), dim=-1), torch.cat((first, second), dim=-1)


# ---- dispatch --------------------------------------------------------------------------------------


def dispatch_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                     expert: ExpertFn) -> torch.Tensor:
    """``y[n] = sum_j weights[n, j] * expert(experts[n, j], x[n])`` for ``x`` [N, H].

    Loops over the experts that were chosen (not over tokens): each runs once on the rows that chose
    it, and its weighted output is added back with an out-of-place ``index_add``.
    """
    out = torch.zeros_like(x)
    for e in torch.unique(experts).tolist():
        token, slot = torch.where(experts == e)
        y = expert(int(e), x[token]) * weights[token, slot, None].to(x.dtype)
        out = out.index_add(0, token, y)
    return out


__all__ = ["ExpertFn", "dispatch_experts", "route_softmax_topk", "route_sparsemixer", "swiglu"]
