"""Which experts a model's routers choose: counts per layer, measured by running the reference.

Expert popularity drives the partitioner (a hot expert earns GPU rows, docs/DESIGN.md section 5), and it
is how one sees that a trained router has learned something: a random router spreads tokens evenly,
a trained one does not. Later issues record full traces; this module only counts.
"""

from __future__ import annotations

import math

import torch


def expert_counts(model, token_ids: list[int]) -> dict[int, torch.Tensor]:
    """Run one causal forward over ``token_ids``; return {layer: picks per expert (int64 [E])}."""
    routing: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        model.forward(torch.tensor([token_ids]), routing=routing)
    n_experts = model.spec.n_experts
    return {layer: torch.bincount(sel.flatten(), minlength=n_experts) for layer, sel in sorted(routing.items())}


def normalized_entropy(counts: torch.Tensor) -> float:
    """Entropy of the pick distribution divided by log(E): 1.0 is perfectly uniform."""
    p = counts.double() / max(int(counts.sum()), 1)
    h = -sum(float(x) * math.log(float(x)) for x in p if x > 0)
    return h / math.log(len(counts)) if len(counts) > 1 else 1.0


def usage_bar(counts: torch.Tensor, width: int = 24) -> str:
    """A one-line text histogram of expert picks: ``▇▃▁▅...``."""
    bars = " ▁▂▃▄▅▆▇█"
    top = max(int(counts.max()), 1)
    return "".join(bars[round(8 * int(c) / top)] for c in counts)[:width]
