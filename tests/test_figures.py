"""The course's figures (``offloadkit.viz``): what they draw and what their titles say.

Rendering needs a browser, so these tests read the figures' data and layout: the roof each roofline
draws, where a marker line and its label land on a log axis, and that every title says measured,
simulated or computed, and on what.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import plotly.graph_objects as go
import pytest
from sim_fixtures import desktop

from offloadkit.hardware.profile import Curve
from offloadkit.hardware.stream import ReadMeasurement
from offloadkit.model.zoo import load_spec
from offloadkit.plan.costmodel import CostModel
from offloadkit.runtime.timeline import TaskRecord, Timeline
from offloadkit.viz import anatomy, cpu_kernels, hardware

READ = ReadMeasurement(2**29, 2, (0.0200, 0.0160, 0.0250))  # best 33.6 GB/s


@pytest.mark.parametrize("axis", ["log", "linear"])
def test_a_marker_line_and_its_label_stay_at_the_value_on_any_axis(axis):
    """``add_vline(annotation_text=...)`` put the label at 10^56 on a log axis and stretched the axis to it."""
    fig = go.Figure(go.Scatter(x=[1, 512], y=[1, 100]))
    fig.update_xaxes(type=axis)
    cpu_kernels.vline(fig, 56, "switch")
    (shape,), (note,) = fig.layout.shapes, fig.layout.annotations
    assert shape.x0 == shape.x1 == 56  # shapes speak data units
    assert note.x == pytest.approx(math.log10(56) if axis == "log" else 56) and note.text == "switch"
    assert note.xref == "x" and note.yref == "y domain"


def test_cpu_roofline_draws_the_roof_of_this_run_and_names_the_machine():
    points = [{"n": n, "path": p, "gflops": g} for n, p, g in
              [(1, "decode", 30.0), (8, "decode", 90.0), (8, "prefill", 20.0), (512, "prefill", 110.0)]]
    fig = cpu_kernels.roofline_figure(points, 105.0, READ, 2, 56, "Test CPU, 2 threads", "bf16 expert")
    roof = fig.data[0]
    assert roof.line.dash == "dash" and "33.6 GB/s" in roof.name and "105 GFLOP/s" in roof.name
    want = np.minimum(105.0, READ.gbps * 2 * np.asarray(roof.x) / 2)
    assert np.allclose(roof.y, want) and roof.x[0] == 1 and roof.x[-1] == pytest.approx(512)
    assert [t.name for t in fig.data[1:]] == ["decode kernel", "prefill kernel"]
    assert fig.layout.xaxis.type == "log" and fig.layout.annotations[0].x == pytest.approx(math.log10(56))
    assert fig.layout.title.text == "bf16 expert — measured on Test CPU, 2 threads"


def test_steps_figure_puts_the_measured_read_and_its_spread_over_the_bars():
    steps = [{"step": "1 naive", "gbps": 3.0, "ms": 40.0}, {"step": "3 vectorized", "gbps": 40.0, "ms": 3.0}]
    fig = cpu_kernels.steps_figure(steps, READ, "Test CPU, 2 threads", "y = W x")
    assert fig.layout.shapes[0].y0 == pytest.approx(READ.gbps)
    assert "best of 3; samples 21-34" in fig.layout.annotations[0].text
    assert fig.layout.yaxis.range[1] >= 40.0  # the tallest bar and its label stay inside
    assert fig.layout.title.text.endswith("measured on Test CPU, 2 threads")


def test_task_kinds_figure_averages_over_decode_steps_only():
    records = [TaskRecord("cpu", "embed", 0.0, 1.0, kind="embed", step=0),  # the prefill: left out
               TaskRecord("cpu", "e", 1.0, 1.003, kind="expert", step=1),
               TaskRecord("cpu", "e", 2.0, 2.001, kind="expert", step=2),
               TaskRecord("cpu", "n", 2.001, 2.0015, kind="attn_norm", step=2)]
    fig = cpu_kernels.task_kinds_figure(Timeline("measured", "Test CPU, 2 threads", records), "tiny")
    assert list(fig.data[0].x) == ["expert", "attn_norm"]
    assert np.allclose(fig.data[0].y, [2000.0, 250.0])  # µs per decode step over 2 steps
    assert "measured on Test CPU, 2 threads" in fig.layout.title.text


def _measured(profile):
    stamp = "measured by offloadkit profile on 2026-11-30: a test"
    return replace(profile, name="measured-box", sources={k: stamp for k in profile.sources} | {
        "cpu.dram_bandwidth_gbps": stamp})


@pytest.mark.parametrize("measured", [False, True])
def test_profile_roofline_draws_each_lanes_roof_and_says_simulated_on_what(measured):
    profile = _measured(desktop()) if measured else desktop()
    spec = load_spec("mixtral-8x7b")
    fig = hardware.roofline_figure(profile, spec)
    roofs = [t for t in fig.data if t.name.startswith(("cpu roof", "gpu roof"))]
    assert [t.name.split()[0] for t in roofs] == ["cpu", "gpu"]
    cm = CostModel(profile, spec)
    for roof, (rate, bw) in zip(roofs, [(cm.cpu_rate, cm.cpu_bw), (cm.gpu_rate, cm.gpu_bw)], strict=True):
        want = np.minimum(rate, bw * 2 * np.asarray(roof.x) / cm.weight_bytes) / 1e9
        assert np.allclose(roof.y, want) and max(roof.y) == pytest.approx(rate / 1e9)  # the ridge is inside
    title = fig.layout.title.text
    assert "simulated (cost model)" in title and profile.name in title
    assert ("measured: test cpu, 16 cores, test gpu" in title) == measured
    assert ("spec sheets" in title) != measured
    block = hardware.block_time_figure(profile, spec).layout.title.text
    assert "simulated (cost model)" in block and profile.name in block


def test_profile_roofline_shows_a_measured_curve_beside_the_cost_model_that_floors_it():
    """A curve measured on a cache-resident weight beats the DRAM roof; the cost model does not."""
    fast = Curve("cpu_expert_bf16", (1, 2, 512), (1e-13, 1e-13, 1e-12), params=10**6)  # 10 TB/s at n=1
    spec = load_spec("mixtral-8x7b")
    profile = _measured(desktop(curves={"cpu_expert_bf16": fast}))
    fig = hardware.roofline_figure(profile, spec)
    measured = next(t for t in fig.data if t.name == "cpu: the probe's measured curve, scaled to this block")
    model = next(t for t in fig.data if t.name.startswith("cpu: the cost model (the curve"))
    roof = dict(zip(fig.data[0].x, fig.data[0].y, strict=True))
    assert list(measured.x) == [1, 2, 512] and measured.y[0] > 10 * roof[1]  # above the roof, as measured
    assert model.y[0] == pytest.approx(roof[1], rel=0.01)  # the cost model stops at the DRAM read


def test_catalog_figure_marks_the_measured_machine():
    fig = hardware.catalog_figure([desktop(), _measured(desktop())])
    assert list(fig.data[0].x) == ["test-4090", "measured-box (measured)"]
    assert "spec sheets" in fig.layout.title.text and "(measured)" in fig.layout.title.text


def test_anatomy_titles_say_where_their_numbers_come_from():
    specs = [load_spec("mixtral-8x7b")]
    for fig in (anatomy.bytes_by_kind_figure(specs), anatomy.active_vs_total_figure(specs)):
        assert "computed from published configs" in fig.layout.title.text
