"""Plotly figures of a model's anatomy: where its bytes are and which experts its tokens use.

Notebook 01 draws these; they take :class:`ModelSpec` objects (from published configs, no weights)
or routing counts measured by :mod:`offloadkit.model.expert_usage`, and say which in their titles:
"computed from published configs" (no machine involved) or "measured" with the run and machine named.
"""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from offloadkit.model.spec import ModelSpec
from offloadkit.model.summary import KIND_LABELS, breakdown

GIB = 2**30
#: Block kinds grouped the way a memory plan sees them.
GROUPS = {
    "experts (routed)": ("expert",),
    "dense FFN / shared expert": ("ffn", "shared_expert", "shared_gate"),
    "attention": ("attn_qkv", "attn_o"),
    "embedding + lm_head": ("embed", "lm_head"),
    "norms + routers": ("attn_norm", "ffn_norm", "final_norm", "router"),
}


def bytes_by_kind_figure(specs: list[ModelSpec], gpu_gib: float | None = 24.0) -> go.Figure:
    """Stacked bars: GiB of weights per block group for each model (from published configs)."""
    fig = go.Figure()
    names = [s.name or s.arch for s in specs]
    for group, kinds in GROUPS.items():
        values = [sum(r.bytes_ for r in breakdown(s) if r.kind in kinds) / GIB for s in specs]
        fig.add_bar(name=group, x=names, y=values,
                    hovertemplate="%{x}<br>" + group + ": %{y:.1f} GiB<extra></extra>")
    if gpu_gib:
        fig.add_hline(y=gpu_gib, line_dash="dash", annotation_text=f"a {gpu_gib:g} GiB GPU")
    fig.update_layout(barmode="stack", yaxis_title="weights (GiB, stored dtype)",
                      title="Where the bytes are — computed from published configs (no weights; not measured, "
                            "not simulated)")
    return fig


def active_vs_total_figure(specs: list[ModelSpec]) -> go.Figure:
    """Grouped bars: total parameters against parameters a token actually uses."""
    names = [s.name or s.arch for s in specs]
    fig = go.Figure()
    fig.add_bar(name="total", x=names, y=[s.total_params / 1e9 for s in specs])
    fig.add_bar(name="active per token", x=names, y=[s.active_params / 1e9 for s in specs])
    fig.update_layout(barmode="group", yaxis_title="parameters (billions)",
                      title="A token uses a fraction of a MoE model — computed from published configs (not measured, "
                            "not simulated)")
    return fig


def layer_bytes_table(spec: ModelSpec) -> list[tuple[str, int]]:
    """(label, bytes) for one layer of ``spec``, kinds merged (experts summed)."""
    rows: dict[str, int] = {}
    for b in spec.layer_blocks(0):
        label = KIND_LABELS[b.kind]
        rows[label] = rows.get(label, 0) + spec.bytes_of(b.params)
    return list(rows.items())


def expert_usage_figure(counts: dict[int, torch.Tensor], label: str) -> go.Figure:
    """Heatmap of the share of tokens each expert received, per layer (a measured run)."""
    layers = sorted(counts)
    z = [(counts[layer].double() / counts[layer].sum()).tolist() for layer in layers]
    fig = go.Figure(go.Heatmap(z=z, x=[f"expert {e}" for e in range(len(z[0]))],
                               y=[f"layer {layer}" for layer in layers], colorscale="Viridis",
                               colorbar_title="share", hovertemplate="%{y}, %{x}: %{z:.2f}<extra></extra>"))
    fig.update_layout(title=f"Expert choices — measured: {label}")
    return fig
