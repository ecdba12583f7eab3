"""The dashboards: the timeline explorer and the speedup board, driven through their controls.

Each test changes controls with ``.set()`` and checks the figure's data against what it must show:
the simulator's own records for the step, the paper experiment's file read independently, a measured
timeline in its own labelled panel. No assertion is on wall time (the redraw benchmark is
``benchmarks/widget_redraw.py --dashboard``).
"""

from __future__ import annotations

import json
import math

import ipywidgets as widgets
import pytest

from offloadkit.bench.results import BenchRow, BenchRun, Ratio
from offloadkit.hardware.catalog import load_profile
from offloadkit.model.zoo import load_spec
from offloadkit.paths import data_dir
from offloadkit.plan.partition import partition
from offloadkit.plan.plans import Workload
from offloadkit.plan.policies import make_plan
from offloadkit.runtime.sim import simulate
from offloadkit.runtime.timeline import TaskRecord, Timeline
from offloadkit.viz import dashboards as vd
from offloadkit.viz.controls import trace

MACHINE = "Test CPU 9000 (8 threads)"


@pytest.fixture(scope="module")
def mixtral():
    return load_spec("mixtral-8x7b")


@pytest.fixture(scope="module")
def rtx4090():
    return load_profile("rtx4090-desktop")


@pytest.fixture(scope="module")
def explorer():
    return vd.TimelineExplorer("mixtral-8x7b", "rtx4090-desktop", prompt=512, gen=16)


def kinds(fig, group: str = "simulated:") -> set[str]:
    return {t.name for t in fig.data if t.type == "bar" and str(t.meta).startswith(group)
            and not str(t.meta).endswith("utilisation") and len(t.x)}


def drawn_end_ms(fig, group: str = "simulated:") -> float:
    return max(max(b + x for b, x in zip(t.base, t.x, strict=True)) for t in fig.data
               if str(t.meta).startswith(group) and t.base is not None and len(t.x))


def utilisation(fig, group: str = "simulated:") -> dict[str, float]:
    t = trace(fig, f"{group}utilisation")
    return dict(zip(t.y, t.x, strict=True))


def loopback_timeline(sim: Timeline) -> Timeline:
    """A measured-like step on the loopback device: the simulated records x3, offset, labelled as the engine does."""
    recs = [TaskRecord(r.lane, r.name, 5 + 3 * r.start_s, 5 + 3 * r.end_s, r.layer, r.kind, r.bytes_, r.flops, 1)
            for r in sim.records]
    return Timeline("measured", f"{MACHINE} + loopback device", recs,
                    {"model": "mixtral-8x7b", "device": "loopback",
                     "lanes": "gpu/h2d/d2h lanes: CPU threads standing in for a GPU, not GPU figures"})


# ---- the pure functions ------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["llamacpp", "scheinfer"])
@pytest.mark.parametrize("step", [0, 3])
def test_a_steps_timeline_is_the_simulators_records_of_that_step(mixtral, rtx4090, policy, step):
    w = Workload(600, 4)  # llama.cpp prefills in two chunks of n_ubatch 512
    plan = (partition(mixtral, rtx4090, w, "zipf:1.2", polish_evals=0) if policy == "scheinfer"
            else make_plan(policy, mixtral, rtx4090, w, "zipf:1.2"))
    full = simulate(mixtral, rtx4090, plan, w, "zipf:1.2").timeline.select(step=step)
    t0 = min(r.start_s for r in full.records)
    mine = vd.step_timeline(mixtral, rtx4090, plan, w, "zipf:1.2", step)
    assert mine.source == "simulated" and mine.machine == "rtx4090-desktop"
    assert [(r.lane, r.name, r.kind) for r in mine.records] == [(r.lane, r.name, r.kind) for r in full.records]
    assert [r.start_s for r in mine.records] == pytest.approx([r.start_s - t0 for r in full.records], abs=1e-12)
    assert [r.end_s for r in mine.records] == pytest.approx([r.end_s - t0 for r in full.records], abs=1e-12)
    u = vd.lane_utilisation(mine)
    assert list(u)[:4] == ["cpu", "gpu", "h2d", "d2h"] and max(u.values()) <= 1 + 1e-12
    assert u["cpu"] == pytest.approx(sum(r.duration_s for r in full.records if r.lane == "cpu") / full.makespan_s)


def test_the_figure_without_a_simulation_says_why(mixtral):
    fig = vd.explorer_figure(None, error="plan X does not fit", profile="cpu-box")
    assert "simulated</b> on cpu-box" in fig.layout.title.text
    assert any("does not fit" in a.text for a in fig.layout.annotations)


# ---- the timeline explorer ---------------------------------------------------------------------------

def test_the_explorer_shows_the_step_its_lanes_utilisation_and_the_bound(explorer):
    explorer.set(policy="scheinfer", phase="decode", step=1, prompt=512)
    s = explorer.summary()
    assert s["source"] == "simulated" and s["step"] == 1 and "simulated</b> on rtx4090-desktop" in \
        explorer.figure.layout.title.text
    assert drawn_end_ms(explorer.figure) == pytest.approx(s["step_s"] * 1e3)
    u = utilisation(explorer.figure)
    assert u == pytest.approx({lane: 100 * v for lane, v in s["utilisation"].items()})
    assert s["bounding_lane"] == max(s["busy_s"], key=s["busy_s"].get)
    assert s["bound_s"] > 0 and s["gap_s"] == pytest.approx(s["step_s"] - s["bound_s"])
    assert 0 < s["fraction_of_bound"] <= 1 + 1e-9  # the step is no faster than the bound per step
    assert [sh.x0 for sh in explorer.figure.layout.shapes] == pytest.approx([s["bound_s"] * 1e3])
    assert isinstance(explorer.widget, widgets.VBox) and explorer.figure in explorer.widget.children
    assert hasattr(explorer, "_ipython_display_")


def test_switching_policy_changes_the_bounding_lane_and_the_bars(explorer):
    explorer.set(policy="scheinfer", phase="decode", step=2, prompt=512)
    sche, sche_kinds = explorer.summary(), kinds(explorer.figure)
    explorer.set(policy="llamacpp")
    llama, llama_kinds = explorer.summary(), kinds(explorer.figure)
    assert (sche["bounding_lane"], llama["bounding_lane"]) == ("h2d", "cpu")  # streams experts / CPU layers
    assert "weights" in sche_kinds and "weights" not in llama_kinds  # llama.cpp streams nothing at one token
    assert "llamacpp" in explorer.figure.layout.title.text
    bars = trace(explorer.figure, "simulated:utilisation")
    assert dict(zip(bars.y, bars.marker.color, strict=True))["cpu"] == vd.timeline_explorer.BOUND_COLOR


def test_prefill_and_decode_draw_different_steps(explorer):
    explorer.set(policy="llamacpp", phase="prefill", prompt=512)
    prefill = explorer.summary()
    assert prefill["step"] == 0 and explorer.controls["step"].disabled
    assert "weights" in kinds(explorer.figure)  # llama.cpp copies its CPU layers' weights for >= 32 tokens
    assert "prefill" in explorer.figure.layout.title.text
    explorer.set(phase="decode", step=3)
    assert explorer.summary()["step"] == 3 and "weights" not in kinds(explorer.figure)
    assert explorer.summary()["step_s"] < prefill["step_s"] / 10


def test_a_longer_prompt_makes_a_longer_prefill(explorer):
    times = []
    for p in (16, 64, 256, 1024):
        explorer.set(policy="scheinfer", phase="prefill", prompt=p)
        times.append(explorer.summary()["step_s"])
        assert drawn_end_ms(explorer.figure) == pytest.approx(times[-1] * 1e3)
        assert f"pp{p}+" in explorer.figure.layout.title.text
    assert times == sorted(times) and times[0] < times[-1]


def test_a_generation_length_bounds_the_step_slider(explorer):
    explorer.set(gen=32, step=30, phase="decode", policy="fiddler", prompt=512)
    assert explorer.controls["step"].max == 32 and explorer.summary()["step"] == 30
    explorer.set(gen=16, step=1, prompt=100)  # a prompt length off the slider's stops is added to them
    assert 100 in explorer.controls["prompt"].options and "pp100+tg16" in explorer.figure.layout.title.text
    explorer.set(prompt=512)


def test_a_measured_timeline_gets_its_own_panel_labelled_measured(explorer, tmp_path):
    explorer.set(policy="scheinfer", phase="decode", step=1, prompt=512)
    measured = loopback_timeline(explorer.simulated())
    explorer.load_measured(measured)
    try:
        fig = explorer.figure
        titles = [a.text for a in fig.layout.annotations]
        assert any(t.startswith("<b>measured</b> on Test CPU 9000") and "CPU threads, not GPU figures" in t
                   for t in titles)
        assert "<b>measured</b> on Test CPU 9000" in fig.layout.title.text
        assert kinds(fig, "measured:") == kinds(fig, "simulated:")
        assert {t.xaxis for t in fig.data if str(t.meta).startswith("measured:")} == {"x3", "x4"}
        assert drawn_end_ms(fig, "measured:") == pytest.approx(3 * explorer.summary()["step_s"] * 1e3)
        assert explorer.summary()["measured"]["source"] == "measured"
        # the saved Chrome trace of it reads back the same
        path = measured.write_chrome_trace(tmp_path / "m.json")
        back = vd.timeline_from_file(path)
        assert (back.source, back.machine, len(back)) == ("measured", measured.machine, len(measured))
        def rows(tl: Timeline) -> list:
            return sorted((r.lane, r.name, r.kind, r.step, round(r.start_s, 9)) for r in tl.records)

        assert rows(back) == rows(measured)  # the trace is in start order
        explorer.load_measured(path)
        assert explorer.summary()["measured"]["step_s"] == pytest.approx(measured.makespan_s)
        explorer.load_measured(measured.to_dict())  # as a BenchRun's timelines hold them
        assert explorer.summary()["measured"]["machine"] == measured.machine
        explorer.set(step=2)  # the same step selection: the measured timeline has no step 2
        assert explorer.summary()["measured"] is None
        assert any("has steps 1–1" in a.text for a in explorer.figure.layout.annotations)
    finally:
        explorer.load_measured(None)
    assert not kinds(explorer.figure, "measured:")


def test_export_writes_the_shown_records_as_a_perfetto_trace(explorer, tmp_path):
    explorer.set(policy="ktransformers", phase="decode", step=4, prompt=512)
    explorer.load_measured(loopback_timeline(explorer.simulated()).select())
    try:
        explorer.set(step=1)
        path = explorer.export_trace(tmp_path)
        assert path.parent == tmp_path.resolve() and path.name.endswith(".trace.json")
        data = json.loads(path.read_text())
        xs = [e for e in data["traceEvents"] if e["ph"] == "X"]
        sim, meas = explorer.shown
        assert {e["pid"] for e in xs} == {1, 2} and len(xs) == len(sim) + len(meas)
        assert sorted(e["name"] for e in xs if e["pid"] == 1) == sorted(r.name for r in sim.records)
        assert [s["source"] for s in data["otherData"]["shown"]] == ["simulated", "measured"]
        again = vd.timeline_from_chrome_trace(data, pid=2)
        assert again.source == "measured" and again.meta["device"] == "loopback"
        explorer.export_dir.value = str(tmp_path / "sub")
        explorer._export_clicked()  # the button: into the folder of the text box, and says where
        written = list((tmp_path / "sub").glob("*.trace.json"))
        assert len(written) == 1 and str(written[0].resolve()) in explorer.export_status.value
    finally:
        explorer.export_dir.value = "."
        explorer.load_measured(None)
        for p in tmp_path.glob("*.trace.json"):
            p.unlink()


def test_objects_a_policy_that_cannot_run_and_a_cpu_only_profile(mixtral):
    cpu = load_profile("rtx4090-desktop")
    from dataclasses import replace

    cpu = replace(cpu, name="cpu-box", gpu=None, link=None)
    x = vd.TimelineExplorer(mixtral, cpu, policy="cpu-only", phase="decode", step=1, prompt=16, gen=2)
    s = x.summary()
    assert s["profile"] == "cpu-box" and s["bounding_lane"] == "cpu" and s["bound_s"] is None
    assert "simulated</b> on cpu-box" in x.figure.layout.title.text
    x.set(policy="scheinfer")
    assert x.summary()["error"] and "cannot run" in x.status.value


def test_precompute_fills_the_cache_for_every_prompt(explorer):
    explorer.set(policy="llamacpp", phase="prefill", prompt=512)
    explorer.precompute((16, 32))
    assert ("mixtral-8x7b", "rtx4090-desktop", "llamacpp", 16, 16, "uniform", 0) in explorer._steps


# ---- the speedup board -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads((data_dir() / "results" / "paper_experiment.json").read_text())


def expected(raw: dict, model: str, profile: str, baseline: str, phase: str, routing: str) -> float | None:
    """scheinfer's tokens/s over the baseline's, read from the file's rows directly."""
    ts = {}
    for r in raw["rows"]:
        rname = "trace" if r["routing"].startswith("trace") else r["routing"]
        if (r["model"], r["profile"], r["phase"]) == (model, profile, phase) and rname in (routing, "dense"):
            ts[r["policy"]] = r["tokens_per_s"]
    a, b = ts.get("scheinfer"), ts.get(baseline)
    return a / b if a and b else None


def make_run() -> BenchRun:
    rows, ratios = [], []
    for n_prompt, n_gen in ((32, 0), (0, 8)):
        kw = dict(model="bench-x", size_bytes=2**30, params=500_000_000, backend="CPU", threads=2, dtype="bfloat16",
                  n_prompt=n_prompt, n_gen=n_gen)
        rows += [BenchRow(engine="offloadkit", policy="cpu-only", samples_ts=[10.0, 11.0, 12.0], **kw),
                 BenchRow(engine="llama.cpp", policy="ngl 0", samples_ts=[9.0, 10.0, 11.0], **kw)]
        ratios.append(Ratio("bench-x", "bfloat16", 2, rows[-1].test, [10 / 9, 11 / 10, 12 / 11]))
    return BenchRun(machine=MACHINE, rows=rows, ratios=ratios)


@pytest.mark.parametrize(("phase", "baseline", "routing"), [("overall", "llamacpp", "uniform"),
                                                            ("prefill", "fiddler", "zipf:1.2"),
                                                            ("decode", "ktransformers", "trace")])
def test_the_grid_has_one_cell_per_model_and_profile_with_the_experiments_speedup(raw, phase, baseline, routing):
    board = vd.SpeedupBoard()
    board.set(phase=phase, baseline=baseline, routing=routing)
    models = list(dict.fromkeys(r["model"] for r in raw["rows"]))
    profiles = list(dict.fromkeys(r["profile"] for r in raw["rows"]))
    hm = trace(board.figure, "simulated")
    assert list(hm.y) == models and list(hm.x) == profiles
    assert len(hm.customdata) * len(hm.customdata[0]) == len(models) * len(profiles)
    for i, m in enumerate(models):
        for j, p in enumerate(profiles):
            want, got = expected(raw, m, p, baseline, phase, routing), hm.customdata[i][j]
            if want is None:
                assert math.isnan(got) and hm.text[i][j] == "–", (m, p)
            else:
                assert got == pytest.approx(want, rel=1e-12), (m, p)
                assert hm.z[i][j] == pytest.approx(math.log2(want)) and hm.text[i][j] == f"{want:.2f}×"
    title = board.figure.layout.title.text
    assert "simulated" in title and phase in title and vd.speedup_board.BASELINE_NAMES[baseline] in title
    assert isinstance(board.widget, widgets.VBox)


def test_measured_rows_are_labelled_measured_on_the_machine():
    run = make_run()
    board = vd.SpeedupBoard(models=["mixtral-8x7b", "llama-2-13b"], profiles=["rtx4090-desktop"], measured=run,
                            phase="decode")
    hm = trace(board.figure, "measured")
    assert list(hm.y) == ["measured · bench-x · bf16 · 2 t · tg8"] and list(hm.x) == [f"measured on {MACHINE}"]
    assert hm.customdata[0][0] == pytest.approx(sum([10 / 9, 11 / 10, 12 / 11]) / 3)
    assert f"<b>measured</b> on {MACHINE}" in board.figure.layout.title.text
    assert len(trace(board.figure, "simulated").customdata) == 2
    board.set(baseline="fiddler")  # measured runs compare with llama.cpp only
    assert not any(t.meta == "measured" for t in board.figure.data)
    assert any("llama.cpp only" in a.text for a in board.figure.layout.annotations)


def test_a_case_the_experiment_lacks_is_simulated_here(monkeypatch):
    from offloadkit.runtime import compare

    calls = []
    real = compare.compare_policies

    def spy(*a, **kw):
        calls.append(a[1].name)
        return real(*a, **kw)

    monkeypatch.setattr(compare, "compare_policies", spy)
    board = vd.SpeedupBoard(models=["llama-2-7b"], profiles=["rtx4090-desktop"], phase="decode")
    assert calls == ["rtx4090-desktop"] and board.grid.computed == {("llama-2-7b", "rtx4090-desktop")}
    cell = trace(board.figure, "simulated").customdata[0][0]
    c = board.computed[("llama-2-7b", "rtx4090-desktop", "uniform")]
    assert cell == pytest.approx(c.speedup("llamacpp", "decode"))
    board.set(phase="prefill")
    assert calls == ["rtx4090-desktop"]  # computed once


def test_a_real_measured_cpu_engine_timeline_is_drawn_as_measured(explorer):
    from sim_fixtures import cpu_engine_timeline

    timeline = cpu_engine_timeline()
    explorer.set(phase="decode", step=1, policy="scheinfer", prompt=512)
    explorer.load_measured(timeline)
    try:
        m = explorer.summary()["measured"]
        assert m["source"] == "measured" and m["bounding_lane"] == "cpu" and m["utilisation"]["gpu"] == 0
        assert not vd.is_loopback(timeline)
        assert not any("CPU threads" in a.text for a in explorer.figure.layout.annotations)
    finally:
        explorer.load_measured(None)
