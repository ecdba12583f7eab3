"""Chapter 05's figures and helpers (offloadkit/viz/streaming.py): what they compute, draw and say.

The figures are read, not rendered: their traces' data and their titles, which must say measured (with
the machine, and the loopback device's warning) or simulated / catalog figures (with the profile). The
sizes of the pinned ring are checked against the :class:`WeightStreamer` they mirror; the measuring
helpers run the hybrid engine on a tiny model on the loopback device, where one staging buffer must
never let a weight copy run beside the compute of a streamed slice.
"""

from __future__ import annotations

import math

import pytest
import torch
from sim_fixtures import cpu_only, desktop, tiny

from offloadkit.plan.plans import Plan, Workload, plan_blocks, units
from offloadkit.runtime.devices import LoopbackDevice
from offloadkit.runtime.sim import simulate
from offloadkit.runtime.streaming import WeightStreamer
from offloadkit.runtime.timeline import TaskRecord, Timeline
from offloadkit.viz import streaming as vs

LOOPBACK_LANES = "gpu/h2d/d2h lanes: CPU threads standing in for a GPU, not GPU figures"


def _rec(lane, name, t0, t1, kind="", layer=0, bytes_=0, step=0):
    return TaskRecord(lane, name, t0, t1, layer, kind, bytes_, 0, step)


def _timeline(source="simulated", machine="test-4090", records=(), **meta):
    return Timeline(source, machine, list(records), dict(meta))


def _two_copies(serial: bool) -> list[TaskRecord]:
    """Two 1 MB copies and the computes they feed: one after the other, or the second copy under the first compute."""
    second = (3.0, 5.0) if serial else (2.0, 4.0)
    return [_rec("h2d", "L0.expert0.w", 0.0, 2.0, "weights", bytes_=10**6),
            _rec("gpu", "L0.expert0", 2.0, 3.0, "expert"),
            _rec("h2d", "L0.expert1.w", *second, "weights", bytes_=10**6),
            _rec("gpu", "L0.expert1", second[1], second[1] + 1.0, "expert"),
            _rec("gpu", "L0.attention", 3.2, 3.6, "attention")]  # not fed by a copy: never counts


# ---- 1. pinned vs pageable ----------------------------------------------------------------------------------

def test_catalog_rates_come_from_each_profiles_link_and_the_figure_says_where_they_come_from():
    (rates,) = vs.catalog_link_rates([desktop(), cpu_only()])  # a profile without a link has no bars
    assert (rates.h2d_pinned, rates.h2d_pageable, rates.d2h_pinned, rates.d2h_pageable) == (25.0, 8.0, 24.0, 7.0)
    assert "test-4090" in rates.name and "test link" in rates.name
    assert rates.ratio("h2d") == pytest.approx(25.0 / 8.0) and rates.ratio("d2h") == pytest.approx(24.0 / 7.0)
    fig = vs.pinned_vs_pageable_figure([rates], "simulated/catalog figures (spec sheets × effective fractions)")
    assert [t.name for t in fig.data] == list(vs.COPY_KINDS)
    assert [t.y[0] for t in fig.data] == [25.0, 8.0, 24.0, 7.0]
    assert "simulated/catalog figures" in fig.layout.title.text
    assert fig.layout.annotations[0].text == "<b>3.1×</b>" and fig.layout.annotations[0].x == rates.name
    assert fig.layout.yaxis.range[1] > fig.layout.annotations[0].y > 25.0  # the ratio sits above the bars, inside


def test_measured_rates_ask_for_each_copy_once():
    asked = []

    def fake_copy(direction, pinned, nbytes):
        asked.append((direction, pinned, nbytes))
        return {("h2d", True): 50.0, ("h2d", False): 20.0, ("d2h", True): 45.0, ("d2h", False): 15.0}[direction, pinned]

    r = vs.measured_link_rates("Test GPU", 2**20, copy=fake_copy)
    assert sorted(asked) == sorted((d, p, 2**20) for d in ("h2d", "d2h") for p in (True, False))
    assert (r.name, r.h2d_pinned, r.h2d_pageable, r.d2h_pinned, r.d2h_pageable) == ("Test GPU", 50.0, 20.0, 45.0, 15.0)
    fig = vs.pinned_vs_pageable_figure([r], "measured on Test GPU, 1 MiB copies")
    assert "measured on Test GPU" in fig.layout.title.text and fig.layout.annotations[0].text == "<b>2.5×</b>"


# ---- 2. plans and timelines ---------------------------------------------------------------------------------

def test_streaming_plan_keeps_attention_resident_and_streams_expert_rows():
    spec, _ = tiny()
    plan = vs.streaming_plan(spec, 2, expert_share=0.25)
    for b in plan_blocks(spec):
        got = plan.gg_rows.get(b.name, 0)
        if b.kind == "expert":
            assert got == b.rows // 4  # 128 rows: whole rows, not 128-row chunks
        elif b.kind == "embed":
            assert got == 0
        else:
            assert got == units(b)
    assert plan.staging_buffers == 2 and plan.assign == "threshold" and plan.stream_min_tokens == 1
    assert all(plan.kv_on_gpu) and plan.streams and "2 staging buffers" in plan.name
    assert not any(b.kind == "expert" for b in plan_blocks(spec) if b.name in vs.streaming_plan(spec, 1).gg_rows)
    balance = vs.streaming_plan(spec, 1, assign="balance")
    assert balance.assign == "balance" and balance.stream_min_tokens is None
    assert balance.name == "stream experts (balance), 1 staging buffer"


def test_large_experts_keep_resident_rows_in_whole_chunks():
    from offloadkit.model.zoo import load_spec

    mixtral = load_spec("mixtral-8x7b")
    plan = vs.streaming_plan(mixtral, 1, expert_share=0.2)
    assert plan.gg_rows["L0.expert0"] == 2816  # 0.2 x 14336 = 2867, down to a multiple of 128


def test_overlap_counts_only_copies_beside_the_compute_they_feed():
    serial, overlapped = _timeline(records=_two_copies(True)), _timeline(records=_two_copies(False))
    assert vs.copy_compute_overlap_s(serial) == 0.0  # the attention at 3.2-3.6 s runs beside a copy, but is not fed
    assert vs.copy_compute_overlap_s(overlapped) == pytest.approx(1.0)  # copy 2 (2-4 s) under compute 1 (2-3 s)
    assert vs.overlap_s(serial, vs.is_weight_copy, lambda r: r.lane == "gpu") == pytest.approx(0.4)
    assert vs.copies_s(serial) == pytest.approx(4.0) and vs.streamed_compute_s(serial) == pytest.approx(2.0)
    assert vs.copy_gbps(serial) == pytest.approx(2e6 / 4.0 / 1e9)
    assert vs.copy_gbps(_timeline()) == 0.0


def test_overlap_of_unions_counts_each_instant_once():
    tl = _timeline(records=[_rec("h2d", "a", 0, 4), _rec("gpu", "b", 1, 2), _rec("gpu", "c", 1.5, 3),
                            _rec("gpu", "d", 5, 6)])
    assert vs.overlap_s(tl, lambda r: r.lane == "h2d", lambda r: r.lane == "gpu") == pytest.approx(2.0)


def test_rebase_keeps_one_step_from_zero_with_its_provenance():
    tl = _timeline("measured", "Test CPU + loopback", [_rec("cpu", "a", 10.0, 11.0, step=0),
                                                        _rec("gpu", "b", 10.5, 12.5, step=0),
                                                        _rec("cpu", "c", 20.0, 21.0, step=1)], lanes=LOOPBACK_LANES)
    first = vs.rebase(tl, 0)
    assert [(r.name, r.start_s, r.end_s) for r in first.records] == [("a", 0.0, 1.0), ("b", 0.5, 2.5)]
    assert first.source == "measured" and first.machine == "Test CPU + loopback" and first.meta == tl.meta
    assert vs.step_s(tl, 0) == pytest.approx(2.5) and vs.step_s(tl, None) == pytest.approx(11.0)
    assert vs.provenance(first) == f"measured on Test CPU + loopback — {LOOPBACK_LANES}"
    assert vs.provenance(_timeline(lanes=LOOPBACK_LANES)) == "simulated on test-4090"


def test_median_run_is_the_middle_step_time():
    runs = [_timeline(records=[_rec("gpu", "x", 0, t)]) for t in (3.0, 1.0, 2.0, 4.0)]
    assert vs.median_run(runs).makespan_s == 2.0
    assert vs.median_run(runs[:3]).makespan_s == 2.0


def test_staging_figure_stacks_one_panel_per_buffer_count_and_says_simulated_on_what():
    tls = {1: _timeline(records=_two_copies(True)), 2: _timeline(records=_two_copies(False))}
    fig = vs.staging_figure(tls, what="Test prefill")
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0].startswith("<b>1 staging buffer</b>: whole step 6000.0 ms")
    assert "both at once 0.0 ms" in titles[0] and "both at once 1000.0 ms" in titles[1]
    assert titles[1].startswith("<b>2 staging buffers</b>: whole step 5000.0 ms")
    assert "copies 4000.0 ms" in titles[0] and "streamed compute 2000.0 ms" in titles[0]
    assert fig.layout.title.text.startswith("Test prefill<br><sup>simulated on test-4090")
    assert "simulated" in fig.layout.xaxis2.title.text  # the shared time axis, at the bottom panel
    assert {t.legendgroup for t in fig.data} == {"weights", "expert", "attention"}
    assert sum(bool(t.showlegend) for t in fig.data) == 3  # each kind once in the legend, not once per panel
    weights = next(t for t in fig.data if t.name == "weights")
    assert list(weights.base) == [0.0, 3000.0] and list(weights.x) == [2000.0, 2000.0]
    assert list(fig.layout.yaxis.categoryarray) == ["h2d", "gpu"]


def test_staging_figure_window_keeps_the_chosen_layers_and_a_measured_title_warns_about_the_loopback():
    recs = [*_two_copies(True), _rec("gpu", "L1.expert0", 7.0, 8.0, "expert", layer=1)]
    tl = _timeline("measured", "Test CPU, 2 threads + loopback", recs, lanes=LOOPBACK_LANES)
    fig = vs.staging_figure({1: tl}, layers=(0, 0), what="Window")
    assert all("L1." not in name for t in fig.data for name, _ in t.customdata)
    assert "Window, layer 0" in fig.layout.title.text
    assert "measured on Test CPU, 2 threads + loopback" in fig.layout.title.text
    assert "CPU threads standing in for a GPU, not GPU figures" in fig.layout.title.text
    assert "whole step 8000.0 ms" in fig.layout.annotations[0].text  # the step, not the window
    assert fig.layout.margin.t > 64 + 24  # room for the wrapped provenance lines above the first panel


# ---- 3. measured beside simulated ---------------------------------------------------------------------------

def test_measured_vs_simulated_puts_each_on_its_own_axis_and_names_both_machines():
    m = _timeline("measured", "Test CPU + loopback", [_rec("gpu", "a", 0, 0.02), _rec("h2d", "b", 0, 0.01)],
                  lanes=LOOPBACK_LANES)
    s = _timeline("simulated", "test-4090", [_rec("gpu", "a", 0, 0.0002), _rec("h2d", "b", 0, 0.0004)])
    fig = vs.measured_vs_simulated_figure(m, s, "Test step")
    top, bottom = (a.text for a in fig.layout.annotations)
    assert top.startswith("<b>measured</b>: 20.00 ms on Test CPU + loopback")
    assert bottom == "<b>simulated</b>: 0.400 ms on test-4090"
    assert fig.layout.xaxis.title.text == "ms (measured)" and fig.layout.xaxis2.title.text == "ms (simulated)"
    assert fig.layout.xaxis2.matches is None  # not shared: the two differ by orders of magnitude
    assert LOOPBACK_LANES in fig.layout.title.text
    with pytest.raises(ValueError, match="measured and a simulated"):
        vs.measured_vs_simulated_figure(s, m)


def test_lane_busy_figure_draws_each_lanes_busy_time_on_a_log_axis():
    m = _timeline("measured", "Test CPU + loopback", [_rec("gpu", "a", 0, 0.02), _rec("cpu", "b", 0, 0.005)])
    s = _timeline("simulated", "test-4090", [_rec("gpu", "a", 0, 0.0002), _rec("cpu", "b", 0, 0.001)])
    fig = vs.lane_busy_figure(m, s, "Test")
    measured, simulated = fig.data
    assert (measured.name, simulated.name) == ("measured", "simulated")
    assert list(measured.x) == ["cpu", "gpu"] and list(measured.y) == pytest.approx([5.0, 20.0])
    assert list(simulated.y) == pytest.approx([1.0, 0.2])
    assert fig.layout.yaxis.type == "log"
    lo, hi = fig.layout.yaxis.range
    assert lo < math.log10(0.2) and hi > math.log10(20.0)
    assert "20× longer measured" in fig.layout.title.text
    title = fig.layout.title.text
    assert "measured on Test CPU + loopback" in title and "simulated on test-4090" in title


# ---- 4. the pinned ring -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("budget", "pinned", "mode"), [(2**40, True, "pinned"), (1, True, "ring"),
                                                        (2**40, False, "pageable")])
def test_streamer_sizing_is_what_the_weight_streamer_allocates(budget, pinned, mode):
    spec, weights = tiny()
    plan = Plan("t", {b.name: b.rows // 3 if b.rows else 1 for b in plan_blocks(spec)}, (True, False),
                stream_min_tokens=4, staging_buffers=2, pinned=pinned)
    sizing = vs.streamer_sizing(spec, plan, budget)
    with LoopbackDevice() as dev:
        streamer = WeightStreamer(spec, weights, plan, dev, pinned_budget_bytes=budget)
        assert (sizing.mode, sizing.slot_bytes, sizing.streamed_blocks) == (mode, streamer.slot_bytes,
                                                                            len(streamer.streamed))
        pinned_bytes = (sum(t.numel() * t.element_size() for p in streamer.pinned_blocks.values() for t in p.values())
                        + sum(t.numel() * t.element_size() for t in streamer.ring))
    assert sizing.pinned_bytes == pinned_bytes
    assert sizing.ring_bytes == 2 * sizing.slot_bytes and sizing.budget_bytes == budget


def test_a_plan_that_never_streams_needs_no_ring():
    spec, _ = tiny()
    sizing = vs.streamer_sizing(spec, Plan("cpu", {}, (False, False)), 1)
    assert (sizing.streamed_blocks, sizing.host_bytes, sizing.ring_bytes, sizing.pinned_bytes) == (0, 0, 0, 0)


def test_streamer_figure_shows_the_rows_the_budget_and_the_ring():
    sizing = vs.StreamerSizing("ring", 196, 64 * 2**30, 32 * 2**30, 2**30 // 3, 2)
    fig = vs.streamer_figure(sizing, "Test model", "computed from the plan's shapes")
    (bars,) = fig.data
    assert list(bars.x) == pytest.approx([64.0, 32.0, 2 / 3])
    assert list(bars.text) == ["64.00 GiB", "32.00 GiB", "0.67 GiB"]
    assert bars.y[2].startswith("ring: 2 pinned slots")
    assert "<b>ring</b>" in fig.layout.title.text and "computed from the plan's shapes" in fig.layout.title.text
    assert fig.layout.xaxis.range[1] > 64.0


# ---- the measuring helpers, on the loopback device -----------------------------------------------------------

def test_staging_runs_measure_the_engine_and_one_buffer_never_overlaps_a_copy_with_its_compute():
    spec, weights = tiny()
    prompt = torch.randint(0, spec.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    runs = vs.staging_runs(spec, weights, desktop(), LoopbackDevice, prompt, buffers=(1, 2), repeats=2)
    assert sorted(runs) == [1, 2] and all(len(v) == 2 for v in runs.values())
    for k, tls in runs.items():
        for tl in tls:
            assert tl.source == "measured" and "loopback" in tl.machine
            assert tl.meta["lanes"] == LOOPBACK_LANES
            assert min(r.start_s for r in tl.records) == pytest.approx(0.0, abs=1e-9)
            assert {r.step for r in tl.records} == {0}
            assert any(vs.is_weight_copy(r) for r in tl.records)
            if k == 1:  # copy i waits for the compute that read copy i - 1, and compute i for copy i
                assert vs.copy_compute_overlap_s(tl) <= 1e-6


def test_simulated_staging_only_overlaps_with_two_buffers():
    spec, _ = tiny()
    over = {}
    for k in (1, 2):
        r = simulate(spec, desktop(), vs.streaming_plan(spec, k), Workload(6, 0), "uniform")
        over[k] = vs.copy_compute_overlap_s(vs.rebase(r.timeline, 0))
    assert over[1] == 0.0 and over[2] > 0.0
