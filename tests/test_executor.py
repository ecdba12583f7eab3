"""The hybrid executor on the loopback device (offloadkit/runtime/executor.py, engine.py; docs/DESIGN.md section 9).

Every generation here is checked against :class:`~offloadkit.model.reference.ReferenceModel` (the
independent forward), with the engine built ``check=True`` so that each measured step's schedule is also
checked for data flow (every value on the right device before it was read) and staging (no staging
buffer overwritten before its reader ended). Nothing asserts how long anything took: the loopback
device's lanes are CPU threads, and only the *order* of what they did is a fact.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import Counter

import pytest
import torch
from hybrid_fixtures import model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sim_fixtures import CPU, GPU, LINK, desktop, tiny

from offloadkit.errors import DeviceError, ExecutorError, PlanError, TaskGraphError
from offloadkit.hardware.profile import Curve, HardwareProfile
from offloadkit.hardware.whatif import what_if
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.spec import ModelSpec
from offloadkit.plan.plans import ASSIGN_RULES, Plan, Workload, all_gpu, gpu_bytes, plan_blocks, units
from offloadkit.plan.policies import POLICIES, make_plan
from offloadkit.runtime.devices import LoopbackDevice
from offloadkit.runtime.engine import HybridEngine, measure_generation
from offloadkit.runtime.lane_math import LaneMath
from offloadkit.runtime.sim import simulate
from offloadkit.runtime.slices import slice_nbytes
from offloadkit.runtime.stepgraph import StepBuilder
from offloadkit.runtime.streaming import check_staging, default_pinned_budget
from offloadkit.runtime.tasks import Task, TaskGraph, check_dataflow
from offloadkit.runtime.timeline import LANES

ARCHS = ("mixtral", "llama", "qwen2_moe", "phimoe")
#: A prompt of >= 32 tokens, so that llama.cpp's op offload (threshold rule) really streams the CPU layers.
PROMPT, NEW = 40, 4
WORKLOAD = Workload(PROMPT, NEW)
WAIT_S = 30.0  # every bound of these runs: far beyond what a tiny model takes, short of hanging the suite


# ---- helpers ---------------------------------------------------------------------------------------------



def prompt_of(spec: ModelSpec, tokens: int = PROMPT, batch: int = 1, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, spec.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@functools.cache
def reference_tokens(arch: str, dtype: str = "float32") -> list[int]:
    spec, weights = model(arch, dtype)
    return ReferenceModel(spec, weights).greedy(prompt_of(spec), NEW)[0].tolist()


def shrunk(spec: ModelSpec) -> HardwareProfile:
    """The test desktop with a GPU holding 60% of what the whole tiny model needs: every policy must split."""
    return what_if(desktop(), gpu_gib=0.6 * gpu_bytes(all_gpu(spec), spec, WORKLOAD) / 2**30)


def engine(spec, weights, plan, profile=None, device=None, **kw) -> HybridEngine:
    kw.setdefault("workload", WORKLOAD)
    return HybridEngine(spec, weights, plan, profile or desktop(), device or LoopbackDevice(), check=True,
                        wait_s=WAIT_S, **kw)


def kinds_of(timeline) -> set[tuple[str, str]]:
    return {(r.kind, r.lane) for r in timeline.records}


def splits(timeline) -> bool:
    """Whether a measured run both streamed weights (CG) and computed expert/FFN rows on the CPU (CC)."""
    k = kinds_of(timeline)
    return ("weights", "h2d") in k and bool({("expert", "cpu"), ("ffn", "cpu")} & k)


def hybrid_greedy(eng: HybridEngine, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy ``n`` tokens [B, n] through ``eng.forward`` (any batch), on a fresh cache."""
    cache = eng.new_cache(prompt.shape[0], prompt.shape[1] + n)
    logits = eng.forward(prompt, cache)
    out = [logits[:, -1].argmax(-1)]
    for _ in range(n - 1):
        logits = eng.forward(out[-1][:, None], cache)
        out.append(logits[:, -1].argmax(-1))
    return torch.stack(out, dim=1)



# ---- 1. every policy's plan gives the reference's tokens --------------------------------------------------

#: (arch, policy) -> what the policy's refusal says, on the shrunk profile: every other pair must plan.
REFUSALS = {("llama", "fiddler"): "Mixture-of-Experts models only",
            ("llama", "ktransformers"): "does not fit",  # attention + FFN + head exceed 60% of the model
            **{(arch, "gpu-only"): "does not fit" for arch in ARCHS}}


@functools.cache
def policy_run(arch: str, policy: str, dtype: str = "float32"):
    spec, weights = model(arch, dtype)
    profile = shrunk(spec)
    plan = make_plan(policy, spec, profile, WORKLOAD)
    with engine(spec, weights, plan, profile) as eng:
        return plan, measure_generation(eng, prompt_of(spec), NEW)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_policy_plan_generates_the_reference_tokens(arch: str, policy: str, no_leftover_threads) -> None:
    spec, _ = model(arch)
    refusal = REFUSALS.get((arch, policy))
    if refusal is not None:
        with pytest.raises(PlanError, match=refusal):
            make_plan(policy, spec, shrunk(spec), WORKLOAD)
        pytest.skip(f"{policy} refuses {arch} on a GPU of 60% of the model (a PlanError saying {refusal!r})")
    plan, run = policy_run(arch, policy)
    assert run.tokens == reference_tokens(arch)
    assert run.prompt_tokens == PROMPT and len(run.tokens) == NEW
    assert sorted({r.step for r in run.timeline.records}) == list(range(NEW))
    if policy != "cpu-only":
        assert plan.uses_gpu and {r.lane for r in run.timeline.records} > {"cpu"}


@pytest.mark.parametrize("arch", ARCHS)
def test_policies_really_split_the_model_on_a_small_gpu(arch: str) -> None:
    """Non-vacuity of the test above: on the shrunk GPU, some policy both streams weights over h2d (CG) and runs
    expert/FFN rows on the CPU lane (CC), and ScheInfer's plan keeps part of the model off the GPU."""
    runs = {p: policy_run(arch, p) for p in POLICIES if (arch, p) not in REFUSALS and p != "cpu-only"}
    assert any(splits(run.timeline) for _, run in runs.values()), {p: sorted(kinds_of(r.timeline))
                                                                    for p, (_, r) in runs.items()}
    plan, run = runs["scheinfer"]
    spec, _ = model(arch)
    rows = {b.name: units(b) for b in plan_blocks(spec)}
    assert any(plan.gg_rows.get(n, 0) < u for n, u in rows.items())  # not everything resident
    assert any(plan.gg_rows.get(n, 0) > 0 for n in rows)  # not nothing resident
    assert ("weights", "h2d") in kinds_of(run.timeline)  # and it streams


@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_only_where_it_fits(arch: str, no_leftover_threads) -> None:
    spec, weights = model(arch)
    plan = make_plan("gpu-only", spec, desktop(), WORKLOAD)
    with engine(spec, weights, plan) as eng:
        run = measure_generation(eng, prompt_of(spec), NEW)
    assert run.tokens == reference_tokens(arch)
    assert not any(r.lane == "cpu" and r.kind not in ("embed",) for r in run.timeline.records)


@pytest.mark.parametrize("arch", ["mixtral", "llama"])
@pytest.mark.parametrize("policy", ["scheinfer", "llamacpp"])
def test_bf16_checkpoints_generate_the_reference_tokens(arch: str, policy: str, no_leftover_threads) -> None:
    """bf16 weights (the tiny ones converted) against the reference on the same bf16 weights."""
    spec, weights = model(arch, "bfloat16")
    assert spec.dtype == "bfloat16" and weights["model.embed_tokens.weight"].dtype == torch.bfloat16
    plan, run = policy_run(arch, policy, "bfloat16")
    assert run.tokens == reference_tokens(arch, "bfloat16")
    assert ("weights", "h2d") in kinds_of(run.timeline)


def test_a_batch_of_two_through_forward(no_leftover_threads) -> None:
    spec, weights = model("qwen2_moe")
    prompt = prompt_of(spec, 9, batch=2, seed=4)
    gg = {b.name: b.rows // 2 if b.rows else 1 for b in plan_blocks(spec)}
    plan = Plan("test-hybrid", gg, (True, False), staging_buffers=2, assign="balance")
    with engine(spec, weights, plan, workload=Workload(9, 3, 2)) as eng:
        got = hybrid_greedy(eng, prompt, 3)
    assert torch.equal(got, ReferenceModel(spec, weights).greedy(prompt, 3))


# ---- 2. random plans: the reference's tokens, and the simulator's tasks -----------------------------------


@st.composite
def random_cases(draw, spec: ModelSpec):
    gg = {}
    for b in plan_blocks(spec):
        u = units(b)
        gg[b.name] = draw(st.one_of(st.just(0), st.just(u), st.integers(0, u)))  # any row count, chunk or not
    rule = draw(st.sampled_from(ASSIGN_RULES))
    prompt = draw(st.integers(1, 12))
    plan = Plan("random", gg, tuple(draw(st.booleans()) for _ in range(spec.n_layers)), label="random",
                assign=rule, stream_min_tokens=draw(st.integers(1, 6)) if rule == "threshold" else None,
                staging_buffers=draw(st.integers(1, 3)), pinned=draw(st.booleans()),
                ubatch=draw(st.one_of(st.none(), st.integers(1, prompt))), serial=draw(st.booleans()))
    budget = draw(st.one_of(st.none(), st.just(0), st.integers(0, 2**20)))
    return plan, budget, prompt, draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 99))


def measured_tasks(timeline) -> Counter:
    return Counter((r.step, r.lane, r.name) for r in timeline.records)


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(data=st.data())
def test_random_plans_generate_the_reference_tokens_and_the_simulated_tasks(arch: str, data) -> None:
    spec, weights = model(arch)
    plan, budget, p, n, batch, seed = data.draw(random_cases(spec))
    prompt = prompt_of(spec, p, batch, seed)
    ref = ReferenceModel(spec, weights)
    with engine(spec, weights, plan, workload=Workload(p, n, batch), pinned_budget_bytes=budget) as eng:
        streamer = eng.executor.streamer
        host = sum(slice_nbytes(spec, b, b.rows - streamer.gg(b)) for b in streamer.streamed)
        limit = default_pinned_budget() if budget is None else budget
        assert streamer.mode == ("pageable" if not plan.pinned else "pinned" if host <= limit else "ring")
        got = hybrid_greedy(eng, prompt, n)
        measured = eng.timeline
    assert not any(t.is_alive() for t in eng.executor.threads.values())  # closing joined the lanes
    assert not any(s.thread.is_alive() for s in eng.device.streams)  # and the device's streams
    assert torch.equal(got, ref.greedy(prompt, n))
    sim = simulate(spec, desktop(), plan, Workload(p, n - 1, batch), weights=ref, prompt_ids=prompt)
    assert torch.equal(torch.cat(sim.tokens, dim=1), got)
    assert measured_tasks(measured) == measured_tasks(sim.timeline)


def test_the_random_plans_reach_every_staging_mode() -> None:
    """Non-vacuity of the property above: its three host-side modes all occur with streamed blocks."""
    spec, weights = model("mixtral")
    gg = {b.name: b.rows // 3 if b.rows else 1 for b in plan_blocks(spec)}
    plan = Plan("t", gg, (True, True), assign="balance")
    modes = {}
    for pinned, budget in ((False, None), (True, 0), (True, None)):
        with engine(spec, weights, dataclasses.replace(plan, pinned=pinned), pinned_budget_bytes=budget) as eng:
            modes[(pinned, budget)] = eng.executor.streamer.mode
            assert eng.executor.streamer.streamed
    assert modes == {(False, None): "pageable", (True, 0): "ring", (True, None): "pinned"}


# ---- 3. the measured timeline's labels --------------------------------------------------------------------


def test_the_measured_timeline_says_what_it_is() -> None:
    plan, run = policy_run("mixtral", "scheinfer")
    tl = run.timeline
    assert tl.source == "measured"
    assert "loopback" in tl.machine and "measured" in tl.label
    assert tl.meta["device"] == "loopback"
    assert "not GPU figures" in tl.meta["lanes"]
    assert tl.meta["plan"] == plan.name and tl.meta["policy"] == "scheinfer"
    assert {r.lane for r in tl.records} <= set(LANES)
    assert all(r.end_s >= r.start_s >= 0 for r in tl.records)


def test_each_lane_runs_its_tasks_one_after_another_in_issue_order(no_leftover_threads) -> None:
    """An order (not a duration): a lane's tasks, in issue order, never overlap on the measured clock."""
    spec, weights = model("phimoe")
    gg = {b.name: b.rows // 3 if b.rows else (b.layer or 0) % 2 for b in plan_blocks(spec)}
    plan = Plan("test-hybrid", gg, (True, False), stream_min_tokens=4, staging_buffers=2)
    with engine(spec, weights, plan, workload=Workload(9, 3)) as eng:
        measure_generation(eng, prompt_of(spec, 9), 3)
        steps = list(eng.last_steps)
        eng.forward(prompt_of(spec, 9))  # a fresh cache: one more prefill, kept in last_steps
        steps += eng.last_steps
    for run in steps:
        for lane in LANES:
            spans = [(s, e) for t, s, e in zip(run.graph.tasks, run.start_s, run.end_s, strict=True)
                     if t.lane == lane]
            assert all(a[1] <= b[0] + 1e-6 for a, b in zip(spans, spans[1:], strict=False)), lane


# ---- 4. the schedule checks catch ordering bugs ------------------------------------------------------------


def _staging_graph() -> TaskGraph:
    return TaskGraph([
        Task(0, "h2d", "weights", "L0.expert0.cg.w", writes=("W:L0.expert0.cg",)),
        Task(1, "gpu", "expert", "L0.expert0.cg", deps=(0,), reads=("W:L0.expert0.cg",)),
        Task(2, "h2d", "weights", "L0.expert1.cg.w", writes=("W:L0.expert1.cg",)),  # should wait for task 1
        Task(3, "gpu", "expert", "L0.expert1.cg", deps=(2,), reads=("W:L0.expert1.cg",)),
    ])


def test_check_staging_catches_a_copy_into_a_buffer_still_being_read() -> None:
    g = _staging_graph()
    start, end = [0.0, 1.0, 1.5, 3.0], [1.0, 2.0, 2.5, 4.0]  # copy 2 starts at 1.5, its reader of slot 0 ends at 2
    with pytest.raises(TaskGraphError, match=r"copy 'L0.expert1.cg.w' overwrote staging buffer 0 .*"
                                             r"'L0.expert0.cg' read it"):
        check_staging(g, {0: 0, 2: 0}, start, end)
    check_staging(g, {0: 0, 2: 1}, start, end)  # two buffers: no reuse, no race
    check_staging(g, {0: 0, 2: 0}, [0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 2.5, 4.0])  # after the reader: fine


def _streaming_run(staging_buffers: int = 1):
    spec, weights = model("mixtral")
    gg = {b.name: b.rows // 4 if b.rows else 1 for b in plan_blocks(spec)}
    plan = Plan("test-stream", gg, (True, True), stream_min_tokens=1, staging_buffers=staging_buffers)
    with engine(spec, weights, plan, workload=Workload(9, 2)) as eng:
        eng.forward(prompt_of(spec, 9))
        return eng.last_steps[0]


def test_the_real_schedule_passes_the_staging_check_and_a_perturbed_one_does_not(no_leftover_threads) -> None:
    run = _streaming_run(staging_buffers=1)
    check_staging(run.graph, run.slot_of, run.start_s, run.end_s)  # the executor's own schedule: no race
    check_dataflow(run.graph, run.start_s, run.end_s, eps=1e-6)
    index = {t.id: i for i, t in enumerate(run.graph.tasks)}
    copies = [t for t in run.graph.tasks if t.kind == "weights"]
    assert len(copies) >= 2 and set(run.slot_of) == {t.id for t in copies} and set(run.slot_of.values()) == {0}
    first, second = copies[0], copies[1]
    reader = next(t for t in run.graph.tasks if f"W:{first.name.removesuffix('.w')}" in t.reads)
    assert reader.id in second.deps  # the graph makes the reuse wait for the reader
    start = list(run.start_s)
    start[index[second.id]] = run.end_s[index[reader.id]] - 1e-3  # as if the copy had not waited
    with pytest.raises(TaskGraphError, match="overwrote staging buffer 0"):
        check_staging(run.graph, run.slot_of, start, run.end_s, eps=1e-6)


def test_check_dataflow_catches_a_consumer_starting_before_its_copy_ended() -> None:
    g = TaskGraph([
        Task(0, "cpu", "ffn_norm", "L0.ffn_norm", writes=("L0.xf@cpu",)),
        Task(1, "h2d", "activation", "L0.xf@cpu>gpu", deps=(0,), reads=("L0.xf@cpu",), writes=("L0.xf@cpu",)),
        Task(2, "gpu", "expert", "L0.expert0", deps=(1,), reads=("L0.xf@cpu",)),
    ])
    with pytest.raises(TaskGraphError, match=r"task 'L0.expert0' reads L0.xf@cpu on the gpu .* ready only at"):
        check_dataflow(g, [0.0, 1.0, 1.5], [1.0, 2.0, 3.0])  # measured: the expert began before the copy ended
    check_dataflow(g, [0.0, 1.0, 2.0], [1.0, 2.0, 3.0])


def test_check_dataflow_catches_a_perturbed_measured_step(no_leftover_threads) -> None:
    run = _streaming_run(staging_buffers=2)
    tasks = run.graph.tasks
    i = next(i for i, t in enumerate(tasks) if t.kind == "activation" and t.lane == "h2d")
    j = next(j for j, t in enumerate(tasks) if t.lane == "gpu" and tasks[i].writes[0] in t.reads)
    start = list(run.start_s)
    start[j] = run.end_s[i] - 1e-3
    with pytest.raises(TaskGraphError, match=f"task {tasks[j].name!r} reads"):
        check_dataflow(run.graph, start, run.end_s, eps=1e-6)


def test_check_true_catches_an_executor_that_ignores_cross_stream_waits(monkeypatch, no_leftover_threads) -> None:
    """A mutation: device streams that never wait for each other's events (copies slowed so the race is
    certain) must not produce a step quietly."""
    from offloadkit.runtime import devices

    monkeypatch.setattr(devices._LoopbackStream, "wait_event", lambda self, event: None)
    spec, weights = model("mixtral")
    gg = {b.name: b.rows // 4 if b.rows else 1 for b in plan_blocks(spec)}
    plan = Plan("test-stream", gg, (True, True), stream_min_tokens=1, staging_buffers=2)
    eng = engine(spec, weights, plan, device=LoopbackDevice(copy_delay_s=0.02), workload=Workload(9, 2))
    with eng, pytest.raises((ExecutorError, DeviceError, TaskGraphError)):  # a task read what was not there yet
        eng.forward(prompt_of(spec, 9))


def test_check_true_catches_a_graph_without_the_staging_wait(monkeypatch, no_leftover_threads) -> None:
    """A mutation: weight copies that do not wait for the reader of their staging buffer's previous contents
    (the gpu's expert slices made slow, so the copy certainly lands while the reader runs)."""
    orig_stream, orig_expert = StepBuilder.stream_weights, LaneMath._expert

    def no_wait(self, block, pname, rows, after=None):
        saved, self.weight_users = self.weight_users, []
        try:
            return orig_stream(self, block, pname, rows, after)
        finally:
            self.weight_users = saved

    def slow(self, task):
        if self.side == "gpu":
            time.sleep(0.02)
        return orig_expert(self, task)

    monkeypatch.setattr(StepBuilder, "stream_weights", no_wait)
    monkeypatch.setattr(LaneMath, "_expert", slow)
    spec, weights = model("mixtral")
    gg = {b.name: 0 for b in plan_blocks(spec)}
    plan = Plan("test-stream", gg, (True, True), stream_min_tokens=1, staging_buffers=1)
    eng = engine(spec, weights, plan, workload=Workload(9, 2))
    with eng, pytest.raises(TaskGraphError, match="overwrote staging buffer 0"):
        eng.forward(prompt_of(spec, 9))


# ---- a profile measured by `offloadkit profile` (with the CPU engine's prices) --------------------------------


def measured_profile() -> HardwareProfile:
    """The test desktop with a hand-made ``[cpu_lane]``, as ``offloadkit profile`` writes one: the cost model then
    prices the CPU engine's work between tasks as tasks of their own (``host_step``, ``host_moe_layer``...)."""
    from offloadkit.hardware.profile import CpuLaneProfile
    from offloadkit.plan.cpu_lane import CLASSES, curve_key

    lane = CpuLaneProfile("hand", attention_keys=(1, 100), attention_gflops=((10.0, 40.0),),
                          attention_head_dims=(16,),
                          task_us={"attn_norm": 5.0, "expert": 20.0, "host_step": 30.0, "host_moe_layer": 40.0,
                                   "host_layer": 50.0})
    curves = {curve_key(c, dt, w): Curve(curve_key(c, dt, w), (1, 64), spp) for c in CLASSES
              for w, spp in ((32, (1e-11, 1e-10)), (128, (4e-11, 4e-10))) for dt in ("bfloat16", "float32")}
    return HardwareProfile("test-measured", "a measured desktop", CPU, GPU, LINK, curves, cpu_lane=lane)


@pytest.mark.parametrize("arch", ["mixtral", "llama"])
def test_a_profile_with_a_measured_cpu_lane_runs(arch: str, no_leftover_threads) -> None:
    """The graph the simulator prices for such a profile has ``host_*`` tasks on the cpu lane; the executor runs
    the same graph, so it must accept them (they compute nothing)."""
    spec, weights = model(arch)
    gg = {b.name: b.rows // 3 if b.rows else 1 for b in plan_blocks(spec)}
    plan = Plan("test-hybrid", gg, (True, False), assign="balance")
    with engine(spec, weights, plan, measured_profile()) as eng:
        run = measure_generation(eng, prompt_of(spec), NEW)
    assert run.tokens == reference_tokens(arch)
    assert "host_step" in {r.kind for r in run.timeline.records}


def test_the_simulator_with_numerics_takes_a_measured_cpu_lane_too() -> None:
    """The numerics executor runs the same graph, ``host_*`` tasks included, and still gives the reference's tokens."""
    spec, weights = model("mixtral")
    gg = {b.name: b.rows // 3 if b.rows else 1 for b in plan_blocks(spec)}
    plan = Plan("test-hybrid", gg, (True, False), assign="balance")
    prompt = prompt_of(spec)
    sim = simulate(spec, measured_profile(), plan, Workload(prompt.shape[1], NEW - 1),
                   weights=ReferenceModel(spec, weights), prompt_ids=prompt)
    assert [int(t) for t in torch.cat(sim.tokens, dim=1)[0]] == reference_tokens("mixtral")
    assert "host_step" in {r.kind for r in sim.timeline.records}


# ---- logits, not only tokens ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
@pytest.mark.parametrize("rule", ["threshold", "balance"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_steps_logits_equal_the_reference_forward(arch: str, rule: str, tied: bool,
                                                        no_leftover_threads) -> None:
    """Slices sum to the model's output up to f32 summation order: each step's logits against the reference's,
    with every block split three ways (``threshold`` at 1 token: all host rows stream, CG; ``balance``: the
    per-step CG/CC split). With tied embeddings the lm_head's GPU pieces are rows of the embedding table."""
    spec, weights = tiny(arch, layers=2, seed=7, tie_word_embeddings=tied) if tied else model(arch)
    gg = {b.name: b.rows // 3 if b.rows else (b.layer or 0) % 2 for b in plan_blocks(spec)}
    plan = Plan("test-hybrid", gg, (True, False), assign=rule, stream_min_tokens=1 if rule == "threshold" else None,
                staging_buffers=2)
    ref = ReferenceModel(spec, weights)
    prompt = prompt_of(spec, 7, seed=3)
    with engine(spec, weights, plan, workload=Workload(7, 3)) as eng:
        cache, ref_cache = eng.new_cache(1, 10), ref.new_cache(1, 10)
        ids = prompt
        for _ in range(3):
            got, want = eng.forward(ids, cache)[:, -1], ref.forward(ids, ref_cache)[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            ids = want.argmax(-1, keepdim=True)
        names = {r.name for r in eng.timeline.records}
    assert {"lm_head.gg", "L0.attn_qkv.gg", "L1.attn_o.gg"} <= names
    if rule == "threshold":
        assert {"lm_head.cg.w", "L0.attn_qkv.cg.w", "L1.attn_o.cg.w"} <= names


@pytest.mark.parametrize("arch", ["mixtral", "phimoe"])
def test_a_sliding_window_shorter_than_the_context(arch: str, no_leftover_threads) -> None:
    """Attention over the last ``sliding_window`` positions only, on either side (the GPU side's decode goes
    through the attention_decode kernel's twin), with a batch of two."""
    spec, weights = tiny(arch, layers=2, sliding_window=5)
    ref, unwindowed = ReferenceModel(spec, weights), ReferenceModel(*tiny(arch, layers=2))
    prompt = prompt_of(spec, 12, batch=2, seed=6)
    gg = {b.name: b.rows // 3 if b.rows else 1 for b in plan_blocks(spec)}
    plan = Plan("test-window", gg, (True, False), assign="balance", staging_buffers=2)
    with engine(spec, weights, plan, workload=Workload(12, 4, 2)) as eng:
        cache, ref_cache, wide_cache = eng.new_cache(2, 16), ref.new_cache(2, 16), unwindowed.new_cache(2, 16)
        ids = prompt
        differs = False
        for _ in range(4):
            got, want = eng.forward(ids, cache)[:, -1], ref.forward(ids, ref_cache)[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            differs |= not torch.allclose(unwindowed.forward(ids, wide_cache)[:, -1], want, rtol=1e-3, atol=1e-4)
            ids = want.argmax(-1, keepdim=True)
    assert differs  # the window really cut something off


def test_a_closed_engine_refuses_further_use(no_leftover_threads) -> None:
    spec, weights = model("llama")
    gg = {b.name: b.rows // 3 if b.rows else 1 for b in plan_blocks(spec)}
    eng = engine(spec, weights, Plan("t", gg, (True, False), assign="balance"), workload=Workload(9, 2))
    eng.forward(prompt_of(spec, 9))
    eng.close()
    assert eng.device.closed
    with pytest.raises(ExecutorError, match="shut down"):
        eng.forward(prompt_of(spec, 9))
    eng.close()  # twice is harmless
