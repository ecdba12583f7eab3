"""The simulator: schedule properties on random graphs, numerics against the reference, physics, CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sim_fixtures import cpu_only, desktop, tiny

from offloadkit.cli import main
from offloadkit.errors import PlanError
from offloadkit.hardware.toml_writer import save_profile
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.zoo import load_spec
from offloadkit.plan.costmodel import CostModel
from offloadkit.plan.plans import (
    Plan,
    Workload,
    all_cpu,
    all_gpu,
    first_n_layers_on_gpu,
    parse_plan,
    plan_blocks,
)
from offloadkit.plan.routing import record_trace
from offloadkit.runtime.sim import schedule, simulate
from offloadkit.runtime.tasks import Task, TaskGraph, critical_path_s
from offloadkit.runtime.timeline import LANES

# ---- schedule properties on random graphs ---------------------------------------------------------


@st.composite
def random_graphs(draw) -> TaskGraph:
    """A random DAG inserted in a shuffled order (so dependencies may point forward)."""
    n = draw(st.integers(1, 24))
    tasks = []
    for i in range(n):
        deps = draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True)) if i else []
        tasks.append(Task(i, draw(st.sampled_from(LANES)), "x", f"t{i}", deps=tuple(deps),
                          duration_s=draw(st.floats(0.0, 1.0))))
    return TaskGraph(draw(st.permutations(tasks)))


@settings(max_examples=150, deadline=None)
@given(random_graphs())
def test_schedule_respects_lanes_and_dependencies(g: TaskGraph) -> None:
    start, end = schedule(g)
    idx = {t.id: i for i, t in enumerate(g.tasks)}
    for i, t in enumerate(g.tasks):
        assert end[i] == pytest.approx(start[i] + t.duration_s)
        for d in t.deps:  # no task starts before its dependencies end
            assert start[i] >= end[idx[d]]
    for lane in LANES:  # no two tasks overlap on one lane
        spans = sorted((start[i], end[i]) for i, t in enumerate(g.tasks) if t.lane == lane)
        assert all(b[0] >= a[1] - 1e-12 for a, b in zip(spans, spans[1:], strict=False))
    makespan = max(end) - min(start)
    busiest = max(sum(t.duration_s for t in g.tasks if t.lane == lane) for lane in LANES)
    assert makespan >= busiest - 1e-9
    assert makespan >= critical_path_s(g) - 1e-9


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2**26), st.integers(1, 600)), min_size=1, max_size=20))
def test_one_lane_chain_takes_the_sum_of_its_cost_model_times(sizes) -> None:
    cost = CostModel(desktop(), load_spec("mixtral-8x7b"))
    durs = [cost.matmul_s("cpu", params, tokens) for params, tokens in sizes]
    g = TaskGraph(Task(i, "cpu", "expert", f"e{i}", deps=(i - 1,) if i else (), duration_s=d)
                  for i, d in enumerate(durs))
    start, end = schedule(g)
    assert max(end) == pytest.approx(sum(durs), rel=1e-12)


# ---- numerics: simulated with real tensors == the reference forward --------------------------------

def _plans(spec):
    return {"all-cpu": all_cpu(spec), "all-gpu": all_gpu(spec), "ngl:1": first_n_layers_on_gpu(spec, 1)}


def _reference_logits(model: ReferenceModel, prompt: torch.Tensor, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + len(tokens))
    out = [model.forward(prompt, cache)[:, -1]]
    out += [model.forward(t, cache)[:, -1] for t in tokens[:-1]]
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("plan_name", ["all-cpu", "all-gpu", "ngl:1"])
def test_simulated_numerics_equal_the_reference_forward(arch, plan_name):
    spec, weights = tiny(arch, layers=2)
    plan = _plans(spec)[plan_name]
    prompt = torch.randint(0, spec.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    result = simulate(spec, desktop(), plan, Workload(6, 3, 2), weights=weights, prompt_ids=prompt)
    ref = _reference_logits(ReferenceModel(spec, weights), prompt, result.tokens)
    assert len(result.logits) == 4
    for got, want in zip(result.logits, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert result.timeline.label == "simulated on test-4090" and result.timeline.meta["numerics"]


def test_numerics_through_split_and_streamed_slices():
    """A hybrid plan: a third of every block's rows resident, the rest streamed in prefill, CPU in decode."""
    spec, weights = tiny("mixtral", layers=2)
    gg = {b.name: b.rows // 3 if b.rows else (b.layer or 0) % 2 for b in plan_blocks(spec)}
    plan = Plan("test-hybrid", gg, (True, False), stream_min_tokens=8, staging_buffers=2)
    prompt = torch.randint(0, spec.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    result = simulate(spec, desktop(), plan, Workload(9, 2), weights=weights, prompt_ids=prompt)
    kinds = {(r.kind, r.lane) for r in result.timeline}
    assert {("weights", "h2d"), ("expert", "cpu"), ("expert", "gpu"), ("activation", "d2h")} <= kinds
    for got, want in zip(result.logits, _reference_logits(ReferenceModel(spec, weights), prompt, result.tokens),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_shapes_only_replays_a_trace_like_the_numerics_run():
    """The template path (shapes only, trace routing) times every task as the direct numerics path does."""
    spec, weights = tiny("mixtral", layers=2)
    model = ReferenceModel(spec, weights)
    prompt = torch.randint(0, spec.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    plan, w = first_n_layers_on_gpu(spec, 1), Workload(5, 4)
    trace = record_trace(model, prompt[0], 4)
    shapes = simulate(spec, desktop(), plan, w, trace)
    numerics = simulate(spec, desktop(), plan, w, weights=model, prompt_ids=prompt)
    assert shapes.step_s == pytest.approx(numerics.step_s[:5], rel=1e-12)
    assert [r.name for r in shapes.timeline] == [r.name for r in numerics.timeline if r.step <= 4]


# ---- physics -------------------------------------------------------------------------------------------

def test_all_gpu_beats_all_cpu_when_the_model_fits():
    spec, w = load_spec("llama-2-7b"), Workload(128, 16)
    gpu, cpu = (simulate(spec, desktop(), plan, w) for plan in ("all-gpu", "all-cpu"))
    assert gpu.decode_tokens_per_s > 5 * cpu.decode_tokens_per_s
    assert gpu.prefill_tokens_per_s > 20 * cpu.prefill_tokens_per_s
    assert gpu.bounding_lane("decode") == "gpu" and cpu.bounding_lane() == "cpu"


def test_cpu_decode_is_bytes_read_over_dram_bandwidth():
    spec = load_spec("mixtral-8x7b")
    r = simulate(spec, desktop(), "all-cpu", Workload(64, 8), record=False)
    # a decode token reads attention, 2 of 8 experts per layer, the router and lm_head (not the embedding table)
    touched = sum(b.params for b in spec.blocks() if b.kind not in ("embed", "expert"))
    touched += spec.n_layers * spec.top_k * 3 * spec.hidden_size * spec.intermediate_size
    roofline = spec.bytes_of(touched) / 60e9
    step = r.decode_s / 8
    assert roofline <= step <= 1.05 * roofline  # the rest: call overheads, activations and the KV cache


def test_mixtral_summary_and_bounding_lanes():
    r = simulate("mixtral-8x7b", desktop(), "ngl:6", Workload(512, 8), "zipf:1.2")
    assert r.timeline.source == "simulated" and r.timeline.machine == "test-4090"
    assert r.bounding_lane("prefill") == "h2d" and r.bounding_lane("decode") == "cpu"
    assert r.prefill_tokens_per_s == pytest.approx(512 / r.prefill_s)
    assert r.total_s == pytest.approx(r.timeline.makespan_s)
    assert sum(r.busy_s.values()) == pytest.approx(sum(x.duration_s for x in r.timeline))
    assert "simulated on test-4090" in r.table().splitlines()[0]
    assert json.loads(json.dumps(r.summary()))["source"] == "simulated"


def test_simulate_refuses_what_cannot_run():
    with pytest.raises(PlanError, match="over by"):
        simulate("mixtral-8x7b", desktop(), "all-gpu", Workload(16, 2))
    with pytest.raises(PlanError, match="has none"):
        simulate("mixtral-8x7b", cpu_only(), "ngl:2", Workload(16, 2))
    r = simulate("mixtral-8x7b", desktop(), "all-gpu", Workload(16, 2), check_memory=False, record=False)
    assert r.decode_tokens_per_s > 0 and len(r.timeline) == 0
    spec = load_spec("mixtral-8x7b")
    with pytest.raises(PlanError, match="places 2 layers"):
        simulate(spec, desktop(), dataclasses.replace(all_cpu(spec), kv_on_gpu=(False, False)), Workload(4, 1))


# ---- the CLI -------------------------------------------------------------------------------------------

def test_cli_simulate_prints_a_simulated_table_and_writes_files(tmp_path, capsys):
    profile = save_profile(desktop(name="cli-desktop"), tmp_path / "p.toml")
    trace, html = tmp_path / "t.json", tmp_path / "t.html"
    assert main(["simulate", "--profile", str(profile), "--plan", "ngl:4", "--prompt", "64", "--gen", "4",
                 "--routing", "zipf:1.1", "--trace", str(trace), "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "simulated on cli-desktop" in out and "prefill" in out and "decode" in out
    assert json.loads(trace.read_text())["otherData"]["source"] == "simulated"
    assert "simulated on cli-desktop" in html.read_text()


@pytest.mark.parametrize("args, message", [
    (["--plan", "all-gpu"], "over by"),
    (["--plan", "most"], "unknown plan 'most'"),
    (["--routing", "zipf:x"], "zipf routing"),
    (["--routing", "trace:/no/such.npz"], "cannot read routing trace"),
])
def test_cli_simulate_errors_are_one_line(tmp_path, capsys, args, message):
    profile = save_profile(desktop(name="cli-desktop"), tmp_path / "p.toml")
    assert main(["simulate", "--profile", str(profile), "--prompt", "16", "--gen", "2", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("offloadkit: error:") and message in err and "Traceback" not in err


# ---- plan parsing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["ngl8", "ngl=8", "NGL:8", "ngl:", "ngl:8 ", " all-cpu", "cpu", "gpu-only",
                                  "ngl:+8", "ngl:8.0"])
def test_parse_plan_refuses_what_is_not_exactly_a_known_form(text):
    with pytest.raises(PlanError) as e:
        parse_plan(text, load_spec("mixtral-8x7b"))
    assert str(e.value) == (f"unknown plan {text!r}: the plans are all-cpu, all-gpu, ngl:N (N decoder layers on "
                            f"the GPU, e.g. ngl:8)")


def test_parse_plan_refuses_a_negative_ngl():
    with pytest.raises(PlanError, match=r"plan 'ngl:-1': ngl:N takes N >= 0 layers on the GPU"):
        parse_plan("ngl:-1", load_spec("mixtral-8x7b"))


@pytest.mark.parametrize("n", [34, 40, 99, 999])
def test_ngl_past_the_layers_means_every_layer_as_in_llamacpp(n):
    spec = load_spec("mixtral-8x7b")
    plan, everything = parse_plan(f"ngl:{n}", spec), first_n_layers_on_gpu(spec, 33)
    assert dict(plan.gg_rows) == dict(everything.gg_rows) and plan.kv_on_gpu == everything.kv_on_gpu
    assert plan.label == "ngl:33" and plan.meta["requested"] == f"ngl:{n}"
    assert plan.meta["note"] == (f"ngl:{n} → all 32 layers + the output layer of mixtral-8x7b (ngl:33), "
                                 f"as in llama.cpp")
    for exact in (0, 32, 33):  # within range: exactly llama.cpp's -ngl N, no note
        p = parse_plan(f"ngl:{exact}", spec)
        assert p.label == f"ngl:{exact}" and "note" not in p.meta
    assert parse_plan("ngl:32", spec).gg_rows != plan.gg_rows  # ngl:32 leaves the output layer on the CPU


def test_prefill_only_has_no_decode_figures():
    r = simulate("mixtral-8x7b", desktop(), "ngl:4", Workload(64, 0), "uniform", record=False)
    assert r.workload.label == "pp64" and r.decode_s == 0
    table = r.table().splitlines()
    assert [line.split()[0] for line in table[2:]] == ["prefill", "total"]
    summary = r.summary()
    assert summary["decode_tokens_per_s"] is None and summary["bounding_lane"]["decode"] is None
    assert summary["prefill_tokens_per_s"] == pytest.approx(64 / r.prefill_s)
