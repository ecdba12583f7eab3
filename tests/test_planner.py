"""The ScheInfer planner: token assignment and the partition against exhaustive search, the policies'
invariants (memory, dominance, numerics), the bound, and the simulator's fast path against its builder.

Optimality is judged under the planner's own cost model (``layer_objective`` for one step's split,
``expected_time`` for a partition), which is what each algorithm claims to minimise; the simulator then
judges the policies against each other.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sim_fixtures import desktop, tiny

from offloadkit.errors import PlanError
from offloadkit.hardware.catalog import load_profile
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.zoo import load_spec
from offloadkit.plan.assign import TokenAssigner
from offloadkit.plan.bounds import workload_bounds
from offloadkit.plan.costmodel import CostModel
from offloadkit.plan.estimate import WorkloadCounts, expected_time
from offloadkit.plan.partition import fixed_state, partition
from offloadkit.plan.plans import Plan, Workload, gpu_bytes, gpu_bytes_breakdown, llamacpp_plan, splittable
from offloadkit.plan.policies import BASELINES, POLICIES, fiddler, make_plan, scheinfer
from offloadkit.plan.routing import SyntheticRouting
from offloadkit.plan.split_search import Item, balance, exact_split, layer_objective
from offloadkit.runtime.sim import simulate

# ---- token assignment ----------------------------------------------------------------------------------

GPU_FASTER = st.floats(0, 0.5)


def item_st(chunks: st.SearchStrategy[int], gpu: st.SearchStrategy[float] = GPU_FASTER) -> st.SearchStrategy[Item]:
    """A block's host rows with random prices; the GPU computes a streamed row in ``gpu`` x the time the
    link takes to deliver it (on every catalog profile the GPU is the faster: well under 0.5)."""
    return st.builds(lambda n, chunk, a, p, gr, fc, fs, fg: Item(n * chunk, chunk, a, p, gr * p, fc, fs, fg, 1),
                     chunks, st.sampled_from([1, 16, 64]), st.floats(1e-7, 1e-3), st.floats(1e-7, 1e-3),
                     gpu, st.floats(0, 1e-4), st.floats(0, 1e-4), st.floats(0, 1e-4))


def exhaustive(items: list[Item], base: tuple[float, float, float]) -> float:
    return min(layer_objective(items, list(s), base) for s in itertools.product(*(it.options() for it in items)))


bases = st.tuples(st.floats(0, 1e-3), st.floats(0, 1e-3), st.floats(0, 1e-3))


@settings(max_examples=100, deadline=None)
@given(st.lists(item_st(st.integers(1, 6), st.floats(0, 5)), min_size=1, max_size=4), bases)
def test_balance_searches_few_chunk_steps_exactly(items, base):
    """Blocks of a few chunks (a small knapsack): the vectorised search equals a plain exhaustive one."""
    got = balance(items, base)
    assert all(s in it.options() for s, it in zip(got, items, strict=True))  # chunk-aligned, within the block
    assert layer_objective(items, got, base) == pytest.approx(exhaustive(items, base), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(item_st(st.integers(24, 64)), min_size=2, max_size=3), bases)
def test_balance_is_within_one_percent_of_exhaustive_search(items, base):
    """Blocks of many chunks (a real model's experts: 112 chunks of 128 rows in Mixtral) go to the greedy."""
    got = balance(items, base)
    assert all(s in it.options() for s, it in zip(got, items, strict=True))
    assert layer_objective(items, got, base) <= 1.01 * exact_split_value(items, base) + 1e-15


def exact_split_value(items: list[Item], base: tuple[float, float, float]) -> float:
    return layer_objective(items, exact_split(items, base), base)


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(["mixtral", "qwen2_moe", "phimoe"]), st.floats(0.2, 5.0), st.floats(0.2, 5.0),
       st.integers(1, 64), st.integers(0, 3))
def test_assigner_splits_of_real_layers_are_within_one_percent(arch, cpu_scale, link_scale, n, seed):
    """The assigner's experts + shared expert split on a real (tiny) layer, on a random profile."""
    spec, _ = tiny(arch, layers=1, hidden=32, intermediate=64)
    hw = desktop()
    hw = replace(hw, cpu=replace(hw.cpu, dram_bandwidth_gbps=60 * cpu_scale),
                 link=replace(hw.link, h2d_pinned_gbps=25 * link_scale))
    gg = {b.name: 16 * (i % 3) for i, b in enumerate(splittable(spec))}
    plan = Plan("t", gg, (True,), assign="balance", meta={"chunk": 16})
    a = TokenAssigner(spec, plan, CostModel(hw, spec))
    counts = SyntheticRouting(1.0, seed).step_counts(spec, [n])[0, 0].tolist()
    _, shared, experts = a.layers[0]
    active = [(b, c) for b, c in zip(experts, counts, strict=True) if c and b.rows > gg.get(b.name, 0)]
    items = [a.item(b, c) for b, c in active]
    g0 = sum(a.resident_load(b, c) for b, c in zip(experts, counts, strict=True) if c)
    if shared is not None:
        items.append(a.item(shared, n))
        g0 += a.resident_load(shared, n)
    s_shared, split = a.moe(0, n, counts)
    got = [split[experts.index(b)] for b, _ in active] + ([s_shared] if shared is not None else [])
    assert layer_objective(items, got, (0, 0, g0)) <= 1.01 * exhaustive(items, (0, 0, g0)) + 1e-15


def test_decode_leans_on_the_cpu_and_prefill_on_streaming():
    spec = load_spec("mixtral-8x7b")
    plan = Plan("t", {}, (True,) * spec.n_layers, assign="balance")
    a = TokenAssigner(spec, plan, CostModel(load_profile("rtx4090-desktop"), spec))
    rows = spec.expert_intermediate_size
    decode = a.experts(0, 1, [1, 1, 0, 0, 0, 0, 0, 0])
    prefill = a.experts(0, 512, [128] * 8)
    assert sum(decode) < 0.5 * 2 * rows  # decode: most host rows on the CPU
    assert sum(prefill) > 0.5 * 8 * rows  # prefill: most streamed


def test_threshold_and_fiddler_rules():
    spec = load_spec("mixtral-8x7b")
    hw = load_profile("rtx4090-desktop")
    cost = CostModel(hw, spec)
    rows = spec.expert_intermediate_size
    lc = TokenAssigner(spec, llamacpp_plan(spec, 0), cost)
    assert lc.experts(3, 31, [31, 31, 0, 0, 0, 0, 0, 0]) == [0] * 8  # op offload below 32 tokens: none
    assert lc.experts(3, 32, [32, 32, 0, 0, 0, 0, 0, 0]) == [rows, rows] + [0] * 6  # only the used experts
    f = TokenAssigner(spec, Plan("f", {}, (True,) * 32, assign="fiddler"), cost)
    e = spec.layer_blocks(0)
    expert = next(b for b in e if b.kind == "expert")
    t1 = cost.matmul_s("cpu", expert.params, 1, 0.0, 3)  # Fiddler's latency_cpu (one token)
    copy = cost.copy_s("h2d", spec.bytes_of(expert.params))  # its latency of a copy
    n_star = int(copy // t1)  # below this many tokens the CPU is faster
    got = f.experts(0, 600, [n_star, n_star + 1, 0, 0, 0, 0, 0, 0])
    assert got[:2] == [0, rows]


# ---- the partition ----------------------------------------------------------------------------------------


def small_gpu(spec, workload, fraction: float, hw=None, buffers: int = 2):
    """A desktop profile whose usable memory holds the fixed state and ``fraction`` of the weights."""
    hw = hw or desktop()
    _, fixed = fixed_state(spec, hw, workload, None, buffers)
    weights = sum(spec.bytes_of(b.params) for b in splittable(spec))
    usable = sum(fixed.breakdown.values()) + fraction * weights
    return replace(hw, gpu=replace(hw.gpu, usable_memory_gib=usable / 2**30))


@settings(max_examples=8, deadline=None)
@given(st.sampled_from(["mixtral", "qwen2_moe"]), st.integers(2, 3), st.floats(0.15, 0.8), st.floats(0.3, 3.0),
       st.floats(0.0, 1.5), st.integers(0, 5))
def test_partition_is_within_two_percent_of_brute_force(arch, experts, fraction, link_scale, zipf, seed):
    """Every chunk-aligned GG choice of a 2-layer model within the partition's memory budget is tried.
    ``expected_time`` is a sum over layers and the lm_head, so each layer's choices are priced on their
    own and combined exactly (every combination of the per-layer choices that fits is summed)."""
    spec, _ = tiny(arch, layers=2, hidden=32, intermediate=32, experts=experts, vocab=64, heads=2, kv_heads=1)
    w = Workload(16, 3)
    hw = desktop()
    hw = replace(hw, link=replace(hw.link, h2d_pinned_gbps=25 * link_scale))
    hw = small_gpu(spec, w, fraction, hw)
    routing = SyntheticRouting(zipf, seed)
    chunk = 32
    plan = partition(spec, hw, w, routing, chunk=chunk, polish_evals=20000)
    cost = CostModel(hw, spec)
    counts = WorkloadCounts.of(spec, w, routing, plan.prefill_chunks(w.prompt_tokens))
    base, fixed = fixed_state(spec, hw, w, None, 2)
    blocks = splittable(spec)
    steps = len(counts.chunks) + len(counts.decode)

    def choices(group: list) -> list[tuple[float, float]]:  # (bytes, time) of every choice of a block group
        out = []
        for combo in itertools.product(*[sorted({*range(0, b.rows, chunk), b.rows}) for b in group]):
            gg = {**base.gg_rows, **{b.name: r for b, r in zip(group, combo, strict=True) if r}}
            cand = Plan("bf", gg, base.kv_on_gpu, assign="balance", staging_buffers=2, meta={"chunk": chunk})
            layer = group[0].layer
            t = (expected_time(spec, cand, cost, counts, [layer]) if layer is not None
                 else steps * max(TokenAssigner(spec, cand, cost).head_loads(counts.batch)))
            out.append((sum(spec.bytes_of(b.params) * r / b.rows for b, r in zip(group, combo, strict=True)), t))
        return out

    groups = [[b for b in blocks if b.layer == layer] for layer in range(spec.n_layers)]
    groups.append([b for b in blocks if b.layer is None])
    best = min(sum(t for _, t in pick) for pick in itertools.product(*map(choices, groups))
               if sum(m for m, _ in pick) <= fixed.budget)
    assert expected_time(spec, plan, cost, counts) <= 1.02 * best


def test_partition_rows_are_chunk_aligned_and_hot_experts_earn_more():
    spec = load_spec("mixtral-8x7b")
    w = Workload(512, 128)
    routing = SyntheticRouting(1.2, 0)
    plan = partition(spec, load_profile("rtx4090-desktop"), w, routing)
    for b in splittable(spec):
        r = plan.gg_rows.get(b.name, 0)
        assert r == b.rows or r % 128 == 0, (b.name, r)
    p = routing.probabilities(spec)  # [L, E]
    hot = cold = 0
    for layer in range(spec.n_layers):
        order = np.argsort(-p[layer])
        hot += sum(plan.gg_rows.get(f"L{layer}.expert{e}", 0) for e in order[:2])
        cold += sum(plan.gg_rows.get(f"L{layer}.expert{e}", 0) for e in order[-2:])
    assert hot > 2 * cold


def test_partition_refuses_what_cannot_fit_even_without_weights():
    spec = load_spec("mixtral-8x7b")
    hw = load_profile("rtx4090-desktop")
    hw = replace(hw, gpu=replace(hw.gpu, usable_memory_gib=0.5))
    with pytest.raises(PlanError, match=r"even with zero GG rows .* over by [0-9.]+ GiB"):
        partition(spec, hw, Workload(512, 128))


def test_make_plan_refuses_unknown_policies():
    with pytest.raises(PlanError, match="unknown policy 'scheinfr': the policies are scheinfer, llamacpp"):
        make_plan("scheinfr", load_spec("mixtral-8x7b"), load_profile("rtx4090-desktop"), Workload())


# ---- policies -------------------------------------------------------------------------------------------

EXPERIMENT_MODELS = ("mixtral-8x7b", "llama-2-70b", "llama-2-13b", "qwen2-57b-a14b", "qwen1.5-moe-a2.7b",
                     "phi-3.5-moe")
EXPERIMENT_PROFILES = ("rtx4060ti16-desktop", "rtx4090-desktop", "rtxa6000-workstation", "t4-server-pcie3")


@pytest.mark.slow
@pytest.mark.parametrize("model", EXPERIMENT_MODELS)
def test_scheinfer_is_never_slower_than_a_baseline_in_any_phase(model):
    spec, w = load_spec(model), Workload(512, 128)
    for name in EXPERIMENT_PROFILES:
        hw = load_profile(name)
        mine = simulate(spec, hw, scheinfer(spec, hw, w, "uniform"), w, "uniform", record=False)
        for base in BASELINES:
            try:
                other = simulate(spec, hw, make_plan(base, spec, hw, w, "uniform"), w, "uniform", record=False)
            except PlanError:
                continue  # the baseline cannot run this model here
            assert mine.prefill_s <= other.prefill_s * (1 + 1e-9), (name, base, "prefill")
            assert mine.decode_s <= other.decode_s * (1 + 1e-9), (name, base, "decode")


@settings(max_examples=8, deadline=None)
@given(st.sampled_from(EXPERIMENT_MODELS), st.sampled_from(EXPERIMENT_PROFILES + ("l4-server", "rtx3090-desktop")),
       st.integers(1, 4096), st.integers(0, 512), st.sampled_from(POLICIES))
def test_no_policy_plan_exceeds_usable_gpu_memory(model, profile, prompt, gen, policy):
    spec, hw, w = load_spec(model), load_profile(profile), Workload(prompt, gen)
    try:
        plan = make_plan(policy, spec, hw, w, "uniform")
    except PlanError:
        return  # refused with a reason (a model that does not fit, a policy that does not apply)
    if plan.uses_gpu:
        assert gpu_bytes(plan, spec, w) <= hw.gpu.usable_memory_bytes


@pytest.mark.parametrize("arch", ["mixtral", "llama", "qwen2_moe", "phimoe"])
def test_every_policy_computes_the_reference_tokens(arch):
    """Tiny models of all four architectures on a GPU that holds ~40% of the weights: every policy's plan,
    run by the simulator with numerics, gives the reference forward's greedy tokens."""
    spec, weights = tiny(arch, layers=2)
    w = Workload(12, 3)
    hw = small_gpu(spec, w, 0.4)
    model = ReferenceModel(spec, weights)
    prompt = torch.randint(0, spec.vocab_size, (1, 12), generator=torch.Generator().manual_seed(7))
    ref = model.greedy(prompt, 4)[0].tolist()  # the prefill and each decode step pick one token
    plans = {"scheinfer-chunk16": scheinfer(spec, hw, w, "uniform", chunk=16),
             "scheinfer-ubatch5": scheinfer(spec, hw, w, "uniform", chunk=16, ubatch=5)}
    for name in POLICIES:
        try:
            plans[name] = make_plan(name, spec, hw, w, "uniform")
        except PlanError:
            continue
    assert {"scheinfer-chunk16", "llamacpp", "cpu-only"} <= set(plans)
    for name, plan in plans.items():
        result = simulate(spec, hw, plan, w, weights=model, prompt_ids=prompt)
        got = [int(t[0, 0]) for t in result.tokens]
        assert got == ref, name


# ---- cost model honesty ------------------------------------------------------------------------------------


def test_llamacpp_prefill_restreams_offloaded_weights_per_ubatch():
    spec, hw = load_spec("llama-2-13b"), load_profile("rtx4090-desktop")
    plan = llamacpp_plan(spec, 20)

    def streamed(prompt: int) -> int:
        r = simulate(spec, hw, plan, Workload(prompt, 0), check_memory=False)
        return sum(x.bytes_ for x in r.timeline.records if x.kind == "weights")

    assert streamed(2048) == 4 * streamed(512)
    assert streamed(512) == sum(spec.bytes_of(b.params) for b in splittable(spec)
                                if b.layer is not None and b.layer >= 20)


def test_a_sliding_window_reads_w_positions():
    spec = load_spec("phi-3.5-moe") if load_spec("phi-3.5-moe").sliding_window else None
    if spec is None:
        spec = replace(load_spec("mixtral-8x7b"), sliding_window=4096)
    cost = CostModel(load_profile("rtx4090-desktop"), spec)
    w = spec.sliding_window
    read, _ = cost.attention_cost(1, 10 * w, 1)
    assert read == w * cost.kv_bytes_per_pos + cost.attn_act_bytes_per_token
    read, _ = cost.attention_cost(8, 10 * w, 1)  # 8 queries see positions past+8-w-7 .. past+8
    assert read == (w + 7) * cost.kv_bytes_per_pos + 8 * cost.attn_act_bytes_per_token


# ---- the bound ---------------------------------------------------------------------------------------------


def test_decode_bound_is_host_bytes_over_cpu_plus_pcie_bandwidth():
    """A dense model at batch 1 is memory-bound everywhere: the bound is the closed form."""
    spec, hw, w = load_spec("llama-2-13b"), load_profile("rtx4060ti16-desktop"), Workload(512, 64)
    b = workload_bounds(spec, hw, w)
    cost = CostModel(hw, spec)
    gpu = hw.gpu
    kv = w.max_len * spec.kv_bytes_per_token()
    small = sum(spec.bytes_of(x.params) for x in spec.blocks() if not x.rows and x.kind != "embed")
    weights = sum(spec.bytes_of(x.params) for x in splittable(spec))
    host = weights - (gpu.usable_memory_bytes - kv - small)
    assert b["decode"].seconds == pytest.approx(w.gen_tokens * host / (cost.cpu_bw + cost.h2d_pinned), rel=1e-6)
    assert b["decode"].bounding_lane in ("cpu", "h2d")


def test_every_policy_is_slower_than_the_bound():
    spec, hw, w = load_spec("mixtral-8x7b"), load_profile("rtx4090-desktop"), Workload(512, 32)
    b = workload_bounds(spec, hw, w, "zipf:1.2")
    for name in ("scheinfer", "llamacpp", "fiddler", "ktransformers"):
        r = simulate(spec, hw, make_plan(name, spec, hw, w, "zipf:1.2"), w, "zipf:1.2", record=False)
        assert r.prefill_s >= b["prefill"].seconds and r.decode_s >= b["decode"].seconds, name


# ---- the simulator's fast path ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "llama"])
def test_fragments_give_the_builders_step_times_exactly(arch):
    spec, _ = tiny(arch, layers=3, hidden=32, intermediate=64)
    w = Workload(20, 6, 2)
    hw = small_gpu(spec, w, 0.5)
    plans = [scheinfer(spec, hw, w, "zipf:1", chunk=16, ubatch=8), llamacpp_plan(spec, 1)]
    if spec.is_moe:
        plans.append(fiddler(spec, hw, w, "zipf:1"))
    for plan in plans:
        fast = simulate(spec, hw, plan, w, "zipf:1", record=False, check_memory=False)
        slow = simulate(spec, hw, plan, w, "zipf:1", record=True, check_memory=False)
        assert fast.step_s == slow.step_s, plan.name
        for lane, s in slow.busy_s.items():
            assert fast.busy_s[lane] == pytest.approx(s, rel=1e-12)


def test_memory_breakdown_of_a_partition_fits_and_uses_the_gpu():
    spec, hw, w = load_spec("mixtral-8x7b"), load_profile("rtx4090-desktop"), Workload(512, 128)
    plan = partition(spec, hw, w)
    parts = gpu_bytes_breakdown(plan, spec, w)
    assert sum(parts.values()) <= hw.gpu.usable_memory_bytes
    assert parts["weights"] > 0.9 * (hw.gpu.usable_memory_bytes - parts["kv_cache"] - parts["activations"]
                                     - parts["staging"])
