"""Plotly figures of hardware profiles: the lanes' rooflines and the catalog side by side.

A roofline says how fast a weight block can be multiplied on a lane as a function of the tokens
that share it: with ``n`` tokens a bf16 weight does ``2n`` FLOPs per 2 bytes read, so decode
(``n`` small) is bound by bandwidth and prefill (``n`` large) by FLOP rate. The same figure shows
the PCIe link as a third "lane": streaming a weight costs its bytes over the wire whatever ``n`` is.

Figures are drawn from profiles through the cost model, so their titles say **simulated (cost
model)** and on which profile, and whether that profile was measured (on which CPU and GPU) or comes
from the catalog (spec sheets times effective fractions). The roofline draws each lane's roof, the
``min(FLOP rate, bandwidth x intensity)`` of the profile, beside the cost model's points; where the
profile carries a measured curve, the curve's own points too (the cost model uses the curve but never
prices a task faster than its bytes can be read, so a curve measured on a cache-resident weight can
lie above the roof while the cost model does not).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from offloadkit.hardware.profile import HardwareProfile
from offloadkit.plan.costmodel import CostModel

TOKENS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def provenance(profile: HardwareProfile) -> str:
    """``"measured"`` for a profile the probe wrote, else ``"spec sheet"``."""
    measured = any("measured by offloadkit profile" in s for s in profile.sources.values())
    return "measured" if measured else "spec sheet"


def where(profile: HardwareProfile) -> str:
    """``"measured-host (measured: AMD EPYC 7B13, 2 cores, no GPU)"`` or ``"rtx4090-desktop (spec sheets ...)"``."""
    if provenance(profile) == "measured":
        gpu = profile.gpu.name if profile.gpu is not None else "no GPU"
        return f"{profile.name} (measured: {profile.cpu.name}, {profile.cpu.cores} cores, {gpu})"
    return f"{profile.name} (spec sheets × effective fractions)"


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


LANE_COLORS = {"cpu": "#1f77b4", "gpu (resident)": "#2ca02c", "h2d (stream it)": "#d62728"}


def _rate_and_bandwidth(cm: CostModel, lane: str) -> tuple[float, float]:
    """FLOP/s and bytes/s of ``lane`` (``cpu`` / ``gpu``) as the cost model holds them."""
    return (cm.cpu_rate, cm.cpu_bw) if lane == "cpu" else (cm.gpu_rate, cm.gpu_bw)


def roof_gflops(cm: CostModel, lane: str, tokens: Sequence[float]) -> list[float]:
    """The roof of ``lane`` (``cpu`` / ``gpu``): ``min(FLOP rate, bandwidth x 2 n / weight bytes)`` in GFLOP/s."""
    rate, bw = _rate_and_bandwidth(cm, lane)
    return [min(rate, bw * 2 * n / cm.weight_bytes) / 1e9 for n in tokens]


def roofline_figure(profile: HardwareProfile, spec, params: int | None = None,
                    tokens: Sequence[int] = TOKENS) -> go.Figure:
    """Effective GFLOP/s of one weight block per lane against the tokens sharing it (log-log), with each roof."""
    params = params or 3 * spec.hidden_size * spec.expert_intermediate_size
    dense = np.logspace(np.log10(tokens[0]), np.log10(tokens[-1]), 80)
    cm = CostModel(profile, spec)
    fig = go.Figure()
    for lane, secs in block_time_curves(profile, spec, params, tokens).items():
        if lane.startswith("h2d"):
            continue
        name = lane.split()[0]
        rate, bw = _rate_and_bandwidth(cm, name)
        fig.add_scatter(x=dense, y=roof_gflops(cm, name, dense), mode="lines",
                        line={"dash": "dash", "color": LANE_COLORS[lane]},
                        name=f"{name} roof: min({rate / 1e9:,.0f} GFLOP/s, {bw / 1e9:,.0f} GB/s × intensity)",
                        hoverinfo="skip")
        curve = cm.cpu_curve if name == "cpu" else cm.gpu_curve
        if curve is not None:  # what the probe measured, before the cost model floors it at the roof
            fig.add_scatter(x=list(curve.tokens), y=[2 * params * n / curve.time_s(n, params) / 1e9
                                                     for n in curve.tokens],
                            mode="markers", marker={"symbol": "x", "size": 9, "color": LANE_COLORS[lane]},
                            name=f"{name}: the probe's measured curve, scaled to this block",
                            hovertemplate="%{x} tokens: %{y:.0f} GFLOP/s<extra>measured</extra>")
        gflops = [2 * params * n / s / 1e9 for n, s in zip(tokens, secs, strict=True)]
        label = f"{lane}: the cost model" + (" (the curve, never faster than the bandwidth)" if curve else "")
        fig.add_scatter(x=list(tokens), y=gflops, mode="lines+markers", name=label,
                        line={"color": LANE_COLORS[lane]},
                        hovertemplate="%{x} tokens: %{y:.0f} GFLOP/s<extra>" + lane + "</extra>")
    fig.update_xaxes(type="log", title="tokens sharing the weight (decode ← → prefill)")
    fig.update_yaxes(type="log", title="effective GFLOP/s")
    fig.update_layout(title=f"Roofline of a {params / 1e6:.0f} M-parameter {spec.dtype} block — simulated (cost "
                            f"model)<br>on {where(profile)}", height=460, margin={"t": 90},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.2, "x": 0})
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
    fig.update_layout(title=f"One {params / 1e6:.0f} M-parameter {spec.dtype} block: time against tokens — "
                            f"simulated (cost model)<br>on {where(profile)}", margin={"t": 90})
    return fig


def catalog_figure(profiles: Sequence[HardwareProfile]) -> go.Figure:
    """Grouped bars: DRAM, GPU memory and PCIe H2D bandwidth of each profile (effective GB/s)."""
    names = [p.name + (" (measured)" if provenance(p) == "measured" else "") for p in profiles]
    fig = go.Figure()
    fig.add_bar(name="CPU DRAM", x=names, y=[p.cpu.dram_bandwidth_gbps for p in profiles])
    fig.add_bar(name="GPU memory", x=names, y=[p.gpu.memory_bandwidth_gbps if p.gpu else 0 for p in profiles])
    fig.add_bar(name="PCIe H2D (pinned)", x=names, y=[p.link.h2d_pinned_gbps if p.link else 0 for p in profiles])
    fig.update_layout(barmode="group", yaxis_type="log", yaxis_title="effective GB/s",
                      title="The three pipes of each machine — catalog profiles: spec sheets × effective "
                            "fractions;<br>profiles marked (measured): measured by offloadkit profile",
                      margin={"t": 90})
    return fig
