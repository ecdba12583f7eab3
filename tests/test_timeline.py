"""Timelines of the simulator: Chrome trace round trip and the plotly drawing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sim_fixtures import desktop

from offloadkit.plan.plans import Workload
from offloadkit.runtime.sim import simulate
from offloadkit.runtime.timeline import LANES, Timeline
from offloadkit.viz.timeline import LEGEND_PER_ROW, figure_height, timeline_figure, write_timeline_html


@pytest.fixture(scope="module")
def timeline() -> Timeline:
    return simulate("mixtral-8x7b", desktop(), "ngl:4", Workload(64, 3), "zipf:1.2").timeline


def test_chrome_trace_round_trip(tmp_path, timeline):
    path = timeline.write_chrome_trace(tmp_path / "trace.json")
    data = json.loads(path.read_text())
    events = data["traceEvents"]
    meta = [e for e in events if e["ph"] == "M"]
    tasks = [e for e in events if e["ph"] == "X"]
    assert len(tasks) == len(timeline)
    for e in tasks:
        assert {"ph", "name", "ts", "dur", "pid", "tid", "args"} <= e.keys()
        assert isinstance(e["name"], str) and e["dur"] >= 0 and e["ts"] >= 0
        assert {"layer", "bytes", "flops", "step"} <= e["args"].keys()
    threads = {e["tid"]: e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert sorted(threads.values()) == sorted(LANES)  # this plan uses all four lanes
    assert {e["tid"] for e in tasks} <= set(threads)
    process = [e for e in meta if e["name"] == "process_name"]
    assert len(process) == 1 and "simulated on test-4090" in process[0]["args"]["name"]
    assert data["otherData"]["source"] == "simulated" and data["otherData"]["machine"] == "test-4090"
    # times survive the trip (microseconds) and lanes map back
    by_name = {(r.name, r.step): r for r in timeline}
    e = tasks[len(tasks) // 2]
    r = by_name[(e["name"], e["args"]["step"])]
    assert e["ts"] == pytest.approx(r.start_s * 1e6) and e["dur"] == pytest.approx(r.duration_s * 1e6)
    assert threads[e["tid"]] == r.lane


def test_timeline_dict_round_trip(timeline):
    again = Timeline.from_dict(json.loads(json.dumps(timeline.to_dict())))
    assert again.records == timeline.records and again.label == timeline.label


def test_figure_has_one_bar_trace_per_kind_on_a_linear_axis(timeline):
    fig = timeline_figure(timeline)
    kinds = {r.kind for r in timeline}
    assert {t.name for t in fig.data} == kinds and len(fig.data) == len(kinds)
    assert all(t.type == "bar" and t.orientation == "h" and t.base is not None for t in fig.data)
    assert sum(len(t.x) for t in fig.data) == len(timeline)
    assert fig.layout.barmode == "overlay" and fig.layout.xaxis.type != "date"
    assert "simulated on test-4090" in fig.layout.title.text
    assert list(fig.layout.yaxis.categoryarray) == ["d2h", "h2d", "gpu", "cpu"]
    experts = next(t for t in fig.data if t.name == "expert")
    name, layer, nbytes, ms = experts.customdata[0]
    assert name.startswith("L") and ".expert" in name and "MiB" in nbytes and ms > 0
    assert "%{customdata[0]}" in experts.hovertemplate


@pytest.mark.parametrize("step", [None, 0, 1])
def test_every_kind_is_in_a_legend_with_room_for_it(timeline, step):
    """A legend beside a 320 px figure showed 6 of 12 kinds; below the lanes, in rows, it shows them all."""
    fig = timeline_figure(timeline, step=step)
    tl = timeline if step is None else timeline.select(step=step)
    kinds = {r.kind for r in tl}
    shown = [t.name for t in fig.data if t.showlegend is not False]
    assert sorted(shown) == sorted(kinds) and len(shown) == len(set(shown))
    legend = fig.layout.legend
    assert legend.orientation == "h" and legend.y < 0 and legend.yanchor == "top"  # below the plot
    rows = -(-len(kinds) // LEGEND_PER_ROW)
    assert legend.entrywidthmode == "fraction" and legend.entrywidth * LEGEND_PER_ROW <= 1
    assert fig.layout.height == figure_height(len(tl.lanes()), len(kinds))
    assert figure_height(4, len(kinds)) - figure_height(4, 0) >= rows * 20  # every legend row gets its room
    assert figure_height(4, 12) > figure_height(4, 5) > figure_height(2, 5)
    assert timeline_figure(timeline, step=step, height=300).layout.height == 300


def test_figure_of_one_step_and_html(tmp_path, timeline):
    fig = timeline_figure(timeline, step=2)
    assert sum(len(t.x) for t in fig.data) == len(timeline.select(step=2))
    assert "decode step 2" in fig.layout.title.text
    out = write_timeline_html(timeline, str(tmp_path / "t.html"), step=0, offline=False)
    assert "simulated on test-4090" in Path(out).read_text()
