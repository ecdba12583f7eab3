"""Plotly figures of hardware profiles: the lanes' rooflines and the catalog side by side.

A roofline says how fast a weight block can be multiplied on a lane as a function of the tokens
that share it: with ``n`` tokens a bf16 weight does ``2n`` FLOPs per 2 bytes read, so decode
(``n`` small) is bound by bandwidth and prefill (``n`` large) by FLOP rate. The same figure shows
the PCIe link as a third "lane": streaming a weight costs its bytes over the wire whatever ``n`` is.

Figures are drawn from profiles; their titles say whether the profile is measured or spec-sheet
(a catalog profile is spec sheets times effective fractions — neither measured nor simulated).
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from offloadkit.hardware.profile import HardwareProfile
from offloadkit.plan.costmodel import CostModel

TOKENS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def provenance(profile: HardwareProfile) -> str:
    """``"measured"`` for a profile the probe wrote, else ``"spec sheet"``."""
    measured = any("measured by offloadkit profile" in s for s in profile.sources.values())
    return "measured" if measured else "spec sheet"


def block_time_curves(profile: HardwareProfile, spec, params: int,
                      tokens: Sequence[int] = TOKENS) -> dict[str, list[float]]:
    """Seconds to apply a ``params`` weight block to ``n`` tokens on each lane (and to stream it)."""
    cm = CostModel(profile, spec)
    curves = {"cpu": [cm.matmul_s("cpu", params, n) for n in tokens]}
    if profile.gpu is not None:
        curves["gpu (resident)"] = [cm.matmul_s("gpu", params, n) for n in tokens]
    if profile.link is not None:
        copy = cm.copy_s("h2d", params * spec.bytes_per_param)
        curves["h2d (stream it)"] = [copy] * len(tokens)
    return curves


def roofline_figure(profile: HardwareProfile, spec, params: int | None = None,
                    tokens: Sequence[int] = TOKENS) -> go.Figure:
    """Effective GFLOP/s of one weight block per lane against the tokens sharing it (log-log)."""
    params = params or 3 * spec.hidden_size * spec.expert_intermediate_size
    fig = go.Figure()
    for lane, secs in block_time_curves(profile, spec, params, tokens).items():
        if lane.startswith("h2d"):
            continue
        gflops = [2 * params * n / s / 1e9 for n, s in zip(tokens, secs, strict=True)]
        fig.add_scatter(x=list(tokens), y=gflops, mode="lines+markers", name=lane,
                        hovertemplate="%{x} tokens: %{y:.0f} GFLOP/s<extra>" + lane + "</extra>")
    fig.update_xaxes(type="log", title="tokens sharing the weight (decode ← → prefill)")
    fig.update_yaxes(type="log", title="effective GFLOP/s")
    fig.update_layout(title=f"Roofline of {profile.name} ({provenance(profile)}), "
                            f"a {params / 1e6:.0f} M-parameter {spec.dtype} block")
    return fig


def block_time_figure(profile: HardwareProfile, spec, params: int | None = None,
                      tokens: Sequence[int] = TOKENS) -> go.Figure:
    """Time to compute one weight block for ``n`` tokens: CPU, resident GPU, or stream-then-GPU."""
    params = params or 3 * spec.hidden_size * spec.expert_intermediate_size
    fig = go.Figure()
    for lane, secs in block_time_curves(profile, spec, params, tokens).items():
        fig.add_scatter(x=list(tokens), y=[s * 1e3 for s in secs], mode="lines+markers", name=lane)
    fig.update_xaxes(type="log", title="tokens")
    fig.update_yaxes(type="log", title="ms (cost model)")
    fig.update_layout(title=f"One {params / 1e6:.0f} M-parameter block on {profile.name} "
                            f"(cost model over the {provenance(profile)} profile)")
    return fig


def catalog_figure(profiles: Sequence[HardwareProfile]) -> go.Figure:
    """Grouped bars: DRAM, GPU memory and PCIe H2D bandwidth of each profile (effective GB/s)."""
    names = [p.name for p in profiles]
    fig = go.Figure()
    fig.add_bar(name="CPU DRAM", x=names, y=[p.cpu.dram_bandwidth_gbps for p in profiles])
    fig.add_bar(name="GPU memory", x=names, y=[p.gpu.memory_bandwidth_gbps if p.gpu else 0 for p in profiles])
    fig.add_bar(name="PCIe H2D (pinned)", x=names, y=[p.link.h2d_pinned_gbps if p.link else 0 for p in profiles])
    fig.update_layout(barmode="group", yaxis_type="log", yaxis_title="effective GB/s",
                      title="The three pipes of each machine (catalog: spec sheets × effective fractions)")
    return fig
