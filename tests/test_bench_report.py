"""The HTML benchmark report and the speedup explorer of chapter 09.

The report is checked against the run it was made from, recomputed here from the raw samples (mean,
sample sd, per-round ratios, simulated / measured), never against the module's own helpers; the page must
open offline (plotly.js inlined once, no script loaded from anywhere) and keep its measured / simulated
labels in every edge case: offloadkit alone, no simulated column, a single row, no timelines. The
explorer is driven through its controls like tests/test_widgets.py drives the plan tuner, and its bars are
held to the numbers in ``data/results/paper_experiment.json`` read here with plain ``json``. No assertion
is on wall time (the redraw target is in benchmarks/widget_redraw.py).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import replace

import numpy as np
import pytest
from plotly.offline import get_plotlyjs
from sim_fixtures import cpu_engine_timeline

from offloadkit.bench import report
from offloadkit.bench.results import BenchRow, BenchRun, Ratio
from offloadkit.errors import OffloadkitError
from offloadkit.paths import data_dir
from offloadkit.viz.benchmarks import PaperExperiment, SpeedupExplorer, measured_speedups, trace

MACHINE = "Test CPU (AVX2)"
SIM = "simulated on profile test-epyc ({} policy)"
PAPER_JSON = data_dir() / "results" / "paper_experiment.json"


# ---- fixtures: a run made by hand, its timelines measured on a tiny model --------------------------

@pytest.fixture(scope="module")
def timelines() -> dict:
    """One measured prefill (12 tokens) and one decode step of the CPU engine on a tiny Mixtral."""
    timeline = cpu_engine_timeline()
    return {"prefill": timeline.select(step=0).to_dict(), "decode": timeline.select(step=1).to_dict()}


def make_run(timelines: dict, *, llama: bool = True, sim: bool = True) -> BenchRun:
    """bench-x in bf16 at 1 and 2 threads, pp32 and tg8, 3 rounds; llama.cpp ~10 % faster; a fixed read trace."""
    rng = np.random.default_rng(1)
    rows, ratios = [], []
    for threads in (1, 2):
        for n_prompt, n_gen in ((32, 0), (0, 8)):
            base = (100.0 if n_prompt else 20.0) * threads
            ok = list(base * rng.uniform(0.9, 1.1, 3))
            ll = list(1.1 * base * rng.uniform(0.9, 1.1, 3))
            kw = dict(model="bench-x", size_bytes=3 * 2**29, params=750_000_000, backend="CPU", threads=threads,
                      dtype="bfloat16", n_prompt=n_prompt, n_gen=n_gen)
            rows.append(BenchRow(engine="offloadkit", policy="cpu-only", samples_ts=ok,
                                 sim_ts=1.3 * base if sim else None, sim_label=SIM.format("cpu-only") if sim else "",
                                 **kw))
            if llama:
                rows.append(BenchRow(engine="llama.cpp", policy="ngl 0", samples_ts=ll,
                                     sim_ts=0.9 * base if sim else None,
                                     sim_label=SIM.format("llamacpp") if sim else "", **kw))
                per_round = [a / b for a, b in zip(ok, ll, strict=True)]
                ratios.append(Ratio("bench-x", "bfloat16", threads, rows[-1].test, per_round))
    return BenchRun(machine=MACHINE, rows=rows, ratios=ratios, read_gbps=[31.0, 58.5, 40.25, 29.0],
                    timelines=timelines, meta={"repetitions": 3, "date": "2026-12-01T03:00:00",
                                               "skipped": [] if llama else ["llama.cpp: not built; run make bench"]})


@pytest.fixture(scope="module")
def run(timelines) -> BenchRun:
    return make_run(timelines)


def scripts_with_src(page: str) -> list[str]:
    return re.findall(r"<script[^>]*\bsrc\s*=", page, flags=re.IGNORECASE)


def table_text(page: str) -> str:
    return page[page.index("<table>"):page.index("</table>")]


# ---- the page ---------------------------------------------------------------------------------------

def test_page_opens_offline_with_plotly_inlined_once(tmp_path, run):
    page = report.write_html(run, tmp_path / "report.html").read_text()
    assert scripts_with_src(page) == []
    assert page.count(get_plotlyjs()) == 1
    assert page.count('class="plotly-graph-div"') == 6  # read, speed, ratio, sim, prefill, decode


def test_table_holds_each_row_mean_sd_ratio_and_simulated(run):
    table = table_text(report.report_html(run))
    ratios = {(r.threads, r.test): r.ratios for r in run.ratios}
    for row in run.rows:
        mean, sd = np.mean(row.samples_ts), np.std(row.samples_ts, ddof=1)
        assert f"{mean:.2f} ± {sd:.2f}" in table
        assert f"{row.sim_ts:.2f}</td><td class=\"num\">{row.sim_ts / mean:.2f}</td>" in table
        if row.engine == "offloadkit":
            r = ratios[(row.threads, row.test)]
            assert f"{np.mean(r):.2f} ± {np.std(r, ddof=1):.2f}" in table
    assert table.count("<tr>") == 1 + len(run.rows)
    assert "0.75 B" in table and "1.50 GiB" in table  # params and size as offloadkit bench prints them


def test_figures_show_the_run_and_say_measured_or_simulated(run):
    speed = report.speed_figure(run)
    assert f"measured on {MACHINE}" in speed.layout.title.text
    panels = [a.text.split(" ")[0] for a in speed.layout.annotations]  # subplot titles: "pp32 (measured)"
    assert panels == ["pp32", "tg8"]
    for t in speed.data:
        test = panels[int(t.xaxis[1:] or 1) - 1]
        rows = [r for r in run.rows if r.engine == t.name and r.test == test]
        assert list(t.x) == [f"bf16 · {r.threads} t" for r in rows]
        assert list(t.y) == pytest.approx([np.mean(r.samples_ts) for r in rows])
        assert list(t.error_y.array) == pytest.approx([np.std(r.samples_ts, ddof=1) for r in rows])
    assert all("(measured)" in a.text for a in speed.layout.annotations)
    assert speed.layout.yaxis.title.text == "tokens/s (measured)"

    ratio = report.ratio_figure(run)
    assert f"measured on {MACHINE}" in ratio.layout.title.text and "measured" in ratio.layout.yaxis.title.text
    assert list(ratio.data[0].y) == pytest.approx([np.mean(r.ratios) for r in run.ratios])

    sim = report.sim_figure(run)
    assert SIM.format("cpu-only") in sim.layout.title.text and SIM.format("llamacpp") in sim.layout.title.text
    assert f"measured on {MACHINE}" in sim.layout.title.text
    for t in sim.data:
        rows = [r for r in run.rows if r.engine == t.name]
        assert list(t.y) == pytest.approx([r.sim_ts / np.mean(r.samples_ts) for r in rows])
    band = sim.layout.shapes[0]
    assert (band.y0, band.y1) == pytest.approx((0.85, 1.15))


def test_the_memory_read_is_shown_with_the_warning(run):
    page = report.report_html(run)
    g = run.read_gbps
    assert f"{np.mean(g):.1f} ± {np.std(g, ddof=1):.1f} GB/s, min {min(g):.1f}, max {max(g):.1f}" in page
    assert "2× within an hour" in page
    fig = report.read_figure(run)
    assert list(fig.data[0].y) == g and f"measured on {MACHINE}" in fig.layout.title.text
    assert f"max / min {max(g) / min(g):.2f}" in fig.layout.title.text


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_step_timelines_are_measured_and_start_at_zero(run, phase):
    fig = report.step_figures(run)[phase]
    recs = run.timelines[phase]["records"]
    t0 = min(r["start_s"] for r in recs)
    bases = np.concatenate([np.asarray(t.base) for t in fig.data])
    widths = np.concatenate([np.asarray(t.x) for t in fig.data])
    assert bases.min() == pytest.approx(0.0)
    assert sorted(bases) == pytest.approx(sorted((r["start_s"] - t0) * 1e3 for r in recs))
    assert widths.sum() == pytest.approx(sum(r["end_s"] - r["start_s"] for r in recs) * 1e3)
    assert "measured on" in fig.layout.title.text and fig.layout.xaxis.title.text == "time (ms, measured)"
    assert ("prefill" if phase == "prefill" else "decode") in fig.layout.title.text


def test_offloadkit_alone_no_ratio_and_says_how_to_add_llamacpp(timelines):
    run = make_run(timelines, llama=False)
    page = report.report_html(run)
    assert report.ratio_figure(run) is None and "make bench" in page
    assert {t.name for t in report.speed_figure(run).data} == {"offloadkit"}
    assert "no llama.cpp rows" in report.speed_figure(run).layout.title.text
    assert "skipped: llama.cpp: not built; run make bench" in page
    assert table_text(page).count("<tr>") == 1 + 4 and scripts_with_src(page) == []


def test_no_simulated_column(timelines):
    run = make_run(timelines, sim=False)
    page = report.report_html(run)
    assert report.sim_figure(run) is None and "No row has a simulated figure" in page
    assert "<td class=\"num\">-</td><td class=\"num\">-</td></tr>" in table_text(page)


def test_a_single_row_no_timelines_no_read(run):
    one = BenchRun(machine=MACHINE, rows=[replace(run.rows[0], samples_ts=[50.0])])
    page = report.report_html(one)
    assert "50.00 ± 0.00" in table_text(page) and table_text(page).count("<tr>") == 2
    assert list(report.speed_figure(one).data[0].y) == [50.0]
    assert report.ratio_figure(one) is None and report.read_figure(one) is None
    assert report.step_figures(one) == {} and "This run holds no timelines" in page
    assert "No memory read was measured" in page
    assert page.count(get_plotlyjs()) == 1 and scripts_with_src(page) == []
    empty = report.report_html(BenchRun(machine=MACHINE))
    assert "This run holds no rows" in empty and "<script" not in empty  # no figure, so no plotly.js either


def test_values_are_escaped(run):
    odd = replace(run.rows[0], model="<script>alert(1)</script>")
    page = report.report_html(BenchRun(machine="A & B <cpu>", rows=[odd]))
    assert "<script>alert(1)</script>" not in table_text(page) and "&lt;script&gt;" in table_text(page)
    assert "<h1>offloadkit bench — measured on A &amp; B &lt;cpu&gt;</h1>" in page


def test_round_trip_through_json_draws_the_same(tmp_path, run):
    again = BenchRun.read_json(run.write_json(tmp_path / "run.json"))
    assert table_text(report.report_html(again)) == table_text(report.report_html(run))


# ---- the explorer: the simulated side ---------------------------------------------------------------

@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads(PAPER_JSON.read_text())


def expected_speedups(raw: dict, model: str, profile: str, phase: str) -> dict[str, list[float | None]]:
    """Per routing (short name): scheinfer's tokens/s over llamacpp's, fiddler's, ktransformers'."""
    ts = {(r["routing"], r["policy"]): r["tokens_per_s"] for r in raw["rows"]
          if r["model"] == model and r["profile"] == profile and r["phase"] == phase}
    out = {}
    for routing in {k[0] for k in ts}:
        name = "trace" if routing.startswith("trace") else routing
        out[name] = [ts[(routing, "scheinfer")] / ts[(routing, b)] if ts[(routing, b)] else None
                     for b in ("llamacpp", "fiddler", "ktransformers")]
    return out


@pytest.fixture(scope="module")
def explorer(run) -> SpeedupExplorer:
    return SpeedupExplorer(run=run)


@pytest.mark.parametrize(("model", "profile", "phase"), [
    ("mixtral-8x7b", "rtx4090-desktop", "prefill"), ("mixtral-8x7b", "t4-server-pcie3", "decode"),
    ("llama-2-70b", "rtx4060ti16-desktop", "overall"), ("qwen1.5-moe-a2.7b", "rtxa6000-workstation", "decode")])
def test_speedup_bars_are_the_experiments(explorer, raw, model, profile, phase):
    explorer.controls["model"].value = model  # one control at a time, as a user clicks
    explorer.controls["profile"].value = profile
    explorer.controls["phase"].value = phase
    want = expected_speedups(raw, model, profile, phase)
    shown = {t.meta.split(":", 1)[1]: t for t in explorer.fig.data if t.meta.startswith("simulated:") and t.visible}
    assert set(shown) == set(want)
    for name, values in want.items():
        assert list(shown[name].x) == ["llama.cpp", "Fiddler", "KTransformers"]
        assert [v if v is None else pytest.approx(v) for v in shown[name].y] == values
    lo, hi = raw["metadata"]["paper"]["ranges"][phase]
    band = next(s for s in explorer.fig.layout.shapes if s.legendgroup == "paper")
    assert (band.y0, band.y1) == (lo, hi) and "the paper's" in band.name
    assert f"simulated on {profile}" in shown[next(iter(want))].legendgrouptitle.text
    assert f"{phase}: {model} on {profile} (simulated" in explorer.fig.layout.title.text


def test_a_baseline_that_cannot_run_is_marked(explorer, raw):
    explorer.set(model="llama-2-70b", profile="t4-server-pcie3", phase="decode")
    marks = trace(explorer.fig, "cannot run")
    assert list(marks.y) == [None, 0.0, 0.0]  # Fiddler and KTransformers do not apply to a dense model
    assert all(t == "cannot run (dense)" for t in marks.text[1:])
    reason = next(r["error"] for r in raw["rows"] if r["model"] == "llama-2-70b" and r["profile"] == "t4-server-pcie3"
                  and r["policy"] == "fiddler")
    assert reason[:80] in marks.hovertext[1]


def test_unknown_control_and_missing_file(tmp_path, explorer):
    with pytest.raises(KeyError, match="no control"):
        explorer.set(gpu=3)
    with pytest.raises(OffloadkitError, match="benchmarks/paper.py"):
        PaperExperiment.load(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text('{"rows": []}')
    with pytest.raises(OffloadkitError, match="not the paper experiment"):
        PaperExperiment.load(tmp_path / "bad.json")


# ---- the explorer: the measured side ----------------------------------------------------------------

@pytest.mark.parametrize(("phase", "test"), [("prefill", "pp32"), ("decode", "tg8")])
def test_measured_bars_are_the_runs_ratios(explorer, run, phase, test):
    explorer.set(phase=phase)
    bars = trace(explorer.fig, "measured")
    mine = [r for r in run.ratios if r.test == test]
    assert list(bars.y) == pytest.approx([statistics.fmean(r.ratios) for r in mine])
    assert list(bars.error_y.array) == pytest.approx([np.std(r.ratios, ddof=1) for r in mine])
    assert [x.split("<br>")[-1] for x in bars.x] == [test, test]
    assert bars.marker.pattern.shape == "/"  # hatched: measured
    assert all(not t.marker.pattern.shape for t in explorer.fig.data if str(t.meta).startswith("simulated:"))
    assert f"measured</b> on {MACHINE}" in explorer.fig.layout.annotations[1].text
    assert "simulated" in explorer.fig.layout.annotations[0].text
    assert next(a for a in explorer.fig.layout.annotations if a.name == "no measured rows").text == ""


def test_measured_overall_combines_pp_and_tg_round_by_round(explorer, run):
    explorer.set(phase="overall")
    bars = trace(explorer.fig, "measured")
    rows = {(r.engine, r.threads, r.test): r.samples_ts for r in run.rows}
    want = []
    for threads in (1, 2):
        t = {e: [32 / p + 8 / g for p, g in zip(rows[(e, threads, "pp32")], rows[(e, threads, "tg8")], strict=True)]
             for e in ("offloadkit", "llama.cpp")}
        want.append(np.mean([b / a for a, b in zip(t["offloadkit"], t["llama.cpp"], strict=True)]))
    assert list(bars.y) == pytest.approx(want)
    assert [x.split("<br>")[-1] for x in bars.x] == ["pp32+tg8"] * 2


def test_without_llamacpp_the_measured_panel_says_make_bench(timelines):
    ex = SpeedupExplorer(run=make_run(timelines, llama=False), phase="decode")
    assert list(trace(ex.fig, "measured").y) == [] and measured_speedups(ex.run, "decode") == []
    assert "make bench" in next(a for a in ex.fig.layout.annotations if a.name == "no measured rows").text
    none = SpeedupExplorer(phase="prefill")
    assert "no measured rows" in next(a for a in none.fig.layout.annotations if a.name == "no measured rows").text
    assert "measured</b> on this machine" in none.fig.layout.annotations[1].text
