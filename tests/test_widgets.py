"""The what-if profiles, the plan tuner of chapter 06 and the token-assignment figures of chapter 07.

The tuner is driven the way a notebook user drives it, through its controls, without a browser: each
test changes one control and checks that the figures' data moved the way the cost model says it must
(more GPU memory: more GG rows and no slower decode; a slower PCIe generation: a slower prefill; more
DRAM bandwidth: faster CPU-bound decode; ...). No assertion is on wall time.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from sim_fixtures import cpu_only, desktop

from offloadkit.errors import ProfileError
from offloadkit.hardware.catalog import load_profile
from offloadkit.hardware.whatif import link_shape, pcie_peak_gbps, what_if
from offloadkit.model.zoo import load_spec
from offloadkit.paths import data_dir
from offloadkit.plan.costmodel import CostModel
from offloadkit.plan.partition import partition
from offloadkit.plan.plans import Workload
from offloadkit.plan.routing import RoutingTrace
from offloadkit.viz import assignment as va
from offloadkit.viz.plan_tuner import PlanTuner, trace

# ---- what-if profiles ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rtx4090():
    return load_profile("rtx4090-desktop")


@pytest.mark.parametrize(("gen", "peak", "pinned", "pageable"), [(3, 15.75, 12.6, 3.78), (5, 63.0, 50.4, 15.12)])
def test_pcie_generation_changes_the_peak_and_keeps_the_effective_fractions(rtx4090, gen, peak, pinned, pageable):
    p = what_if(rtx4090, pcie_gen=gen)
    assert (p.link.h2d_pinned_gbps, p.link.d2h_pinned_gbps) == (pinned, pinned)
    assert (p.link.h2d_pageable_gbps, p.link.d2h_pageable_gbps) == (pageable, pageable)
    assert p.derivations["link.h2d_pinned_gbps"].peak == peak
    assert p.derivations["link.h2d_pinned_gbps"].effective == rtx4090.derivations["link.h2d_pinned_gbps"].effective
    assert link_shape(p) == (gen, 16) and "what-if" in p.sources["link.h2d_pinned_gbps"]
    assert CostModel(p, load_spec("mixtral-8x7b")).h2d_pinned == pytest.approx(pinned * 1e9)
    assert p.cpu == rtx4090.cpu and p.gpu == rtx4090.gpu


def test_pcie_rates_per_generation_and_lane_count():
    assert [pcie_peak_gbps(g) for g in (3, 4, 5)] == [15.75, 31.5, 63.0]
    x8 = load_profile("rtx4060ti16-desktop")  # a PCIe 4.0 x8 card keeps its 8 lanes
    assert link_shape(x8) == (4, 8)
    assert what_if(x8, pcie_gen=5).derivations["link.h2d_pinned_gbps"].peak == 31.5


def test_gpu_memory_and_dram_and_the_name(rtx4090):
    p = what_if(rtx4090, gpu_gib=16, pcie_gen=3, dram_gbps=50)
    assert p.name == "rtx4090-desktop (what-if: 16 GiB GPU, PCIe 3, 50 GB/s DRAM)"
    assert (p.gpu.usable_memory_gib, p.gpu.memory_gib) == (16.0, 17.0)  # the base's 1 GiB reserve added back
    assert p.gpu.usable_memory_bytes == 16 * 2**30
    assert p.cpu.dram_bandwidth_gbps == 50.0 and "cpu.dram_bandwidth_gbps" not in p.derivations
    assert p.path is None and rtx4090.gpu.usable_memory_gib == 23.0  # the base is untouched
    again = what_if(p, gpu_gib=12)  # a what-if of a what-if names each change once, the latest value
    assert again.name == "rtx4090-desktop (what-if: 12 GiB GPU, PCIe 3, 50 GB/s DRAM)"


def test_no_change_is_the_base(rtx4090):
    assert what_if(rtx4090) is rtx4090
    assert what_if(rtx4090, gpu_gib=23, pcie_gen=4, dram_gbps=62.4) is rtx4090


@pytest.mark.parametrize("kw", [{"gpu_gib": 0}, {"gpu_gib": -4}, {"gpu_gib": math.nan}, {"gpu_gib": math.inf},
                                {"gpu_gib": True}, {"dram_gbps": 0.0}, {"dram_gbps": -50}, {"dram_gbps": "50"},
                                {"pcie_gen": 2}, {"pcie_gen": 6}, {"pcie_gen": "4"}, {"pcie_gen": True}])
def test_nonsense_is_refused(rtx4090, kw):
    with pytest.raises(ProfileError):
        what_if(rtx4090, **kw)


def test_gpu_changes_need_a_gpu_and_a_link_named_by_generation():
    with pytest.raises(ProfileError, match="no GPU"):
        what_if(cpu_only(), gpu_gib=16)
    with pytest.raises(ProfileError, match="no PCIe link"):
        what_if(cpu_only(), pcie_gen=4)
    assert what_if(cpu_only(), dram_gbps=80).cpu.dram_bandwidth_gbps == 80.0
    with pytest.raises(ProfileError, match="effective fraction"):  # no spec peak, no generation in the name
        what_if(desktop(), pcie_gen=5)
    named = desktop()
    named = replace(named, link=replace(named.link, name="PCIe 4.0 x16"))  # a measured-like profile: no derivations
    p = what_if(named, pcie_gen=5)
    assert p.link.h2d_pinned_gbps == pytest.approx(25.0 / 31.5 * 63.0)


# ---- the plan tuner --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral():
    return load_spec("mixtral-8x7b")


@pytest.fixture
def tuner(mixtral, rtx4090):
    return PlanTuner(mixtral, rtx4090, workload=Workload(512, 128), zipf=1.2)


def decode(t: PlanTuner, policy: str) -> float:
    return trace(t.fig_speed, policy).y[1]


def prefill(t: PlanTuner, policy: str) -> float:
    return trace(t.fig_speed, policy).y[0]


def memory(t: PlanTuner, part: str, policy: str = "scheinfer") -> float:
    bar = trace(t.fig_plan, part)
    return bar.y[list(bar.x).index(policy)]


def expert_share(t: PlanTuner) -> float:
    return float(np.mean(trace(t.fig_plan, "routed experts").y))


def test_the_tuner_draws_every_policy_and_the_bound_simulated_on_the_profile(tuner):
    assert [t.meta for t in tuner.fig_speed.data] == ["scheinfer", "llamacpp", "fiddler", "ktransformers", "bound"]
    assert list(tuner.fig_speed.data[0].x) == ["prefill<br>512 tokens", "decode<br>128 tokens"]
    for fig in (tuner.fig_speed, tuner.fig_speedup, tuner.fig_plan):
        assert "simulated on rtx4090-desktop" in fig.layout.title.text
    bound = trace(tuner.fig_speed, "bound").y
    for policy in ("scheinfer", "llamacpp", "fiddler", "ktransformers"):  # no policy beats the bound
        assert prefill(tuner, policy) <= bound[0] * (1 + 1e-9) and decode(tuner, policy) <= bound[1] * (1 + 1e-9)
    c = tuner.comparison
    assert list(trace(tuner.fig_speedup, "decode").y) == [c.speedup(b, "decode") for b in
                                                          ("llamacpp", "fiddler", "ktransformers")]
    assert tuner.last_redraw_s > 0 and tuner.last_compute_s <= tuner.last_redraw_s
    assert "simulated on" in tuner.status.value


def test_more_gpu_memory_means_more_gg_rows_and_no_slower_decode(tuner):
    before = (decode(tuner, "scheinfer"), memory(tuner, "weights"), expert_share(tuner))
    speed = tuner.fig_speed.data[0]
    tuner.controls["gpu_gib"].value = 32  # the slider's observer redraws
    assert tuner.fig_speed.data[0] is speed  # the traces are updated in place, not rebuilt
    assert decode(tuner, "scheinfer") >= before[0]
    assert memory(tuner, "weights") > before[1] and expert_share(tuner) > before[2]
    assert trace(tuner.fig_plan, "usable").y[0] == 32
    assert "what-if: 32 GiB GPU" in tuner.fig_plan.layout.title.text
    assert tuner.profile.gpu.usable_memory_gib == 32


def test_a_slower_pcie_generation_slows_the_streaming_prefill(tuner):
    before = prefill(tuner, "scheinfer")
    tuner.controls["pcie_gen"].value = 3
    assert prefill(tuner, "scheinfer") < before
    assert "PCIe 3" in tuner.fig_speed.layout.title.text
    tuner.controls["pcie_gen"].value = 5
    assert prefill(tuner, "scheinfer") > before


def test_more_dram_bandwidth_speeds_up_cpu_bound_decode(tuner):
    before = {p: decode(tuner, p) for p in ("llamacpp", "ktransformers", "scheinfer")}
    tuner.controls["dram_gbps"].value = 120
    for policy, tps in before.items():
        assert decode(tuner, policy) > tps, policy


def test_a_longer_generation_is_shown_and_needs_more_kv_cache(tuner):
    kv = memory(tuner, "kv_cache")
    tuner.controls["gen_tokens"].value = 256
    assert tuner.comparison.workload.gen_tokens == 256
    assert trace(tuner.fig_speed, "scheinfer").x[1] == "decode<br>256 tokens"
    assert memory(tuner, "kv_cache") > kv
    assert "pp512+tg256" in tuner.fig_speed.layout.title.text


def test_a_longer_prompt_shares_each_weight_read_among_more_tokens(tuner):
    before, acts = prefill(tuner, "scheinfer"), memory(tuner, "activations")
    tuner.controls["prompt_tokens"].value = 1024
    assert trace(tuner.fig_speed, "scheinfer").x[0] == "prefill<br>1024 tokens"
    assert prefill(tuner, "scheinfer") > before  # the copies cost the same, the tokens doubled
    assert memory(tuner, "activations") > acts


def test_routing_skew_pays_off_for_fiddlers_hot_experts_not_for_whole_layers(tuner):
    tuner.controls["zipf"].value = 0.0
    assert "routing uniform" in tuner.fig_speed.layout.title.text
    uniform = {p: decode(tuner, p) for p in ("fiddler", "llamacpp", "scheinfer")}
    tuner.controls["zipf"].value = 2.0
    assert "routing zipf:2" in tuner.fig_speed.layout.title.text
    assert decode(tuner, "fiddler") > 1.2 * uniform["fiddler"]  # its resident experts are the hot ones
    assert decode(tuner, "scheinfer") > uniform["scheinfer"]
    # llama.cpp keeps whole layers: every token reads two experts per layer wherever they are
    assert decode(tuner, "llamacpp") == pytest.approx(uniform["llamacpp"], rel=0.02)


def test_set_changes_several_controls_with_one_redraw(tuner, monkeypatch):
    calls = []
    monkeypatch.setattr(tuner, "_update", lambda: calls.append(tuner.values()))
    tuner.set(gpu_gib=16, pcie_gen=3, dram_gbps=50)
    assert len(calls) == 1 and calls[0]["gpu_gib"] == 16 and calls[0]["pcie_gen"] == 3
    with pytest.raises(KeyError, match="the controls are"):
        tuner.set(gpu_memory=16)


def test_a_policy_that_does_not_fit_is_shown_as_such(tuner):
    tuner.set(gpu_gib=4, prompt_tokens=4096)  # the activations of a 4096-token prompt leave no room
    assert trace(tuner.fig_speed, "fiddler").name == "fiddler (cannot run)"
    assert list(trace(tuner.fig_speed, "fiddler").y) == [None, None]
    assert trace(tuner.fig_speedup, "decode").y[1] is None
    assert "cannot run" in tuner.status.value
    assert prefill(tuner, "scheinfer") > 0


# ---- token assignment (chapter 07) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_trace():
    return RoutingTrace.load("demo-mixtral-pydoc.npz")


def test_trace_counts_are_the_trace_files_own_bincount(demo_trace):
    with np.load(data_dir() / "traces" / "demo-mixtral-pydoc.npz") as z:
        experts, steps = z["experts"].astype(np.int64), z["step_tokens"]
    n = demo_trace.n_experts
    every = np.stack([np.bincount(layer.ravel(), minlength=n) for layer in experts])
    prompt = np.stack([np.bincount(layer[:steps[0]].ravel(), minlength=n) for layer in experts])
    np.testing.assert_array_equal(va.trace_counts(demo_trace), every)
    np.testing.assert_array_equal(va.trace_counts(demo_trace, slice(0, 1)), prompt)
    np.testing.assert_array_equal(va.trace_counts(demo_trace, slice(1, None)), every - prompt)
    assert every.sum() == experts.size and prompt.sum(axis=1).tolist() == [steps[0] * demo_trace.top_k] * 4
    fig = va.expert_counts_figure(every, "measured: the demo trace", demo_trace.layers)
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), every)


def test_balance_leans_on_the_cpu_at_decode_and_on_streaming_at_prefill(mixtral, rtx4090):
    c = va.balance_curve(mixtral, rtx4090)
    assert c.streamed_share == sorted(c.streamed_share)  # more tokens, more rows streamed
    assert c.streamed_share[0] < 0.5 < c.streamed_share[-1]
    for best, cpu, stream in zip(c.balanced_s, c.cpu_only_s, c.stream_all_s, strict=True):
        assert best <= min(cpu, stream) * (1 + 1e-12)
    fig = va.balance_figure(c, rtx4090.name)
    assert "simulated" in fig.layout.title.text and fig.layout.xaxis.type == "log"


@pytest.fixture(scope="module")
def mixtral_plan(mixtral, rtx4090):
    return partition(mixtral, rtx4090, Workload(64, 4), "zipf:1.2", polish_evals=0)


def test_a_steps_assignment_covers_every_row_of_the_blocks_it_uses(mixtral, rtx4090, mixtral_plan):
    counts = np.zeros((mixtral.n_layers, mixtral.n_experts), dtype=int)
    counts[:, 0], counts[:, 5] = 40, 24  # 64 tokens, top-2: every token to experts 0 and 5
    splits = va.step_assignment(mixtral, mixtral_plan, rtx4090, 64, counts)
    rows = {b.name: b.rows for b in mixtral.blocks() if b.rows}
    for s in splits:
        assert s.gg + s.cg + s.cc == (rows.get(s.name) or s.rows) and min(s.gg, s.cg, s.cc) >= 0
        assert s.gg == min(mixtral_plan.gg_rows.get(s.name, 0), s.rows)
    experts = [s for s in splits if s.kind == "expert"]
    assert {s.name.split(".")[1] for s in experts} == {"expert0", "expert5"}
    assert {s.tokens for s in experts if s.name.endswith("expert0")} == {40}
    assert any(s.cg for s in splits)  # 64 tokens: the balance streams some host rows
    cpu_rule = va.step_assignment(mixtral, replace(mixtral_plan, assign="cpu"), rtx4090, 64, counts)
    assert not any(s.cg for s in cpu_rule) and sum(s.cc for s in cpu_rule) == sum(s.cc + s.cg for s in splits)
    labels, mib = va.assignment_data(splits)
    assert labels == [str(i) for i in range(mixtral.n_layers)] + ["head"]
    assert sum(mib["cg"]) == pytest.approx(sum(s.cg * s.bytes_per_row for s in splits) / 2**20)


def test_the_step_scrubber_redraws_the_step_it_is_moved_to(mixtral, rtx4090, mixtral_plan):
    scrubber = va.StepScrubber(mixtral, rtx4090, mixtral_plan, Workload(64, 4), "zipf:1.2")
    assert scrubber.slider.max == 4 and "prefill" in scrubber.fig_assignment.layout.title.text
    bars = scrubber.fig_assignment.data[0]
    scrubber.slider.value = 3
    assert scrubber.fig_assignment.data[0] is bars  # in place
    assert "decode step 3" in scrubber.fig_assignment.layout.title.text
    assert "decode step 3" in scrubber.fig_timeline.layout.title.text
    records = [r for r in scrubber.result.timeline.records if r.step == 3]
    drawn = sum(sum(t.x) for t in scrubber.fig_timeline.data if t.x is not None)
    assert drawn == pytest.approx(sum(r.duration_s for r in records) * 1e3)
    _, mib = va.assignment_data(scrubber.splits(3))
    assert list(scrubber.fig_assignment.data[0].y) == pytest.approx(mib["gg"])
    scrubber.show(0)
    assert scrubber.slider.value == 0 and "prefill" in scrubber.fig_timeline.layout.title.text
