"""The cost model: the roofline, measured curves, copies, attention, and its refusals."""

from __future__ import annotations

import math

import pytest
from sim_fixtures import CPU, cpu_only, desktop

from offloadkit.errors import PlanError
from offloadkit.hardware.profile import Curve, HardwareProfile
from offloadkit.model.zoo import load_spec
from offloadkit.plan.costmodel import CostModel

MIXTRAL = load_spec("mixtral-8x7b")  # bf16
EXPERT = 3 * 4096 * 14336


@pytest.fixture(scope="module")
def cost() -> CostModel:
    return CostModel(desktop(), MIXTRAL)


def test_roofline_takes_the_max_plus_overhead(cost):
    # one token: memory-bound, weights / DRAM bandwidth
    t1 = cost.matmul_s("cpu", EXPERT, 1)
    assert t1 == pytest.approx(5e-6 + EXPERT * 2 / 60e9, rel=1e-3)
    # 512 tokens: compute-bound, 2 * params * tokens / FLOP rate (bf16 weights: 1 TFLOP/s)
    t512 = cost.matmul_s("cpu", EXPERT, 512)
    assert t512 == pytest.approx(5e-6 + 2 * EXPERT * 512 / 1e12, rel=1e-6)
    # the GPU: bandwidth 900 GB/s, bf16 160 TFLOP/s, launches multiply the overhead
    assert cost.matmul_s("gpu", EXPERT, 1, launches=3) == pytest.approx(15e-6 + EXPERT * 2 / 900e9, rel=1e-3)
    assert cost.roofline_s("gpu", 0, 0, launches=2) == pytest.approx(10e-6)


def test_measured_curve_replaces_the_cpu_roofline():
    curve = Curve("cpu_expert_bf16", tokens=(1, 8, 64), seconds_per_param=(1e-10, 2e-10, 1e-9))
    cost = CostModel(desktop({"cpu_expert_bf16": curve}), MIXTRAL)
    for n in (1, 5, 64, 200):
        assert cost.matmul_s("cpu", EXPERT, n) == curve.time_s(n, EXPERT)
    assert cost.matmul_s("gpu", EXPERT, 1) == CostModel(desktop(), MIXTRAL).matmul_s("gpu", EXPERT, 1)
    f32 = load_spec("mixtral-8x7b").__class__(**{**MIXTRAL.__dict__, "dtype": "float32"})
    assert CostModel(desktop({"cpu_expert_bf16": curve}), f32).cpu_curve is None  # the f32 curve is missing


def test_a_curve_never_prices_a_matmul_below_reading_its_bytes():
    """A curve measured on a cache-resident weight can claim more than DRAM delivers: the floor holds."""
    fast = Curve("cpu_expert_bf16", tokens=(1, 64), seconds_per_param=(1e-13, 1e-10))  # 1 token: 20 TB/s
    cost = CostModel(desktop({"cpu_expert_bf16": fast}), MIXTRAL)
    floor = 5e-6 + EXPERT * 2 / 60e9  # one call's overhead + the bf16 weights at 60 GB/s
    assert fast.time_s(1, EXPERT) < floor
    assert cost.matmul_s("cpu", EXPERT, 1) == pytest.approx(floor)
    assert cost.matmul_s("cpu", EXPERT, 64) == fast.time_s(64, EXPERT)  # above the floor: the curve


# A GPU curve per parameter: below the bf16 bandwidth floor (2 B / 900 GB/s = 2.2e-12 s) at 1 token, above
# the roofline's FLOP term (2 x tokens / 160 TFLOP/s) at 64 and 512 tokens.
GPU_CURVE = Curve("gpu_matmul_bf16", tokens=(1, 64, 512), seconds_per_param=(1e-12, 3e-12, 2e-11))


@pytest.mark.parametrize("tokens, per_param", [(1, 2 / 900e9), (64, 3e-12), (512, 2e-11)])
def test_the_gpu_curve_prices_gpu_matmuls_above_the_bandwidth_floor(tokens, per_param):
    cost = CostModel(desktop({"gpu_matmul_bf16": GPU_CURVE}), MIXTRAL)
    # CUDA events timed the device only: the launch overhead comes on top of max(curve, bytes / bandwidth)
    assert cost.matmul_s("gpu", EXPERT, tokens, launches=2) == pytest.approx(10e-6 + per_param * EXPERT)
    roofline = CostModel(desktop(), MIXTRAL).matmul_s("gpu", EXPERT, tokens, launches=2)
    if tokens > 1:  # where the curve is above the floor it changes the price: cuBLAS is slower than the peak
        assert cost.matmul_s("gpu", EXPERT, tokens, launches=2) > roofline * 1.2
    else:
        assert cost.matmul_s("gpu", EXPERT, tokens, launches=2) == pytest.approx(roofline)


def test_the_gpu_curve_serves_bf16_and_f16_not_f32_and_not_without_a_gpu():
    profile = desktop({"gpu_matmul_bf16": GPU_CURVE})
    f16, f32 = ({**MIXTRAL.__dict__, "dtype": d} for d in ("float16", "float32"))
    assert CostModel(profile, MIXTRAL).gpu_curve is GPU_CURVE
    assert CostModel(profile, MIXTRAL.__class__(**f16)).gpu_curve is GPU_CURVE
    f32_cost = CostModel(profile, MIXTRAL.__class__(**f32))
    assert f32_cost.gpu_curve is None
    assert f32_cost.matmul_s("gpu", EXPERT, 512) == pytest.approx(5e-6 + 2 * EXPERT * 512 / 80e12)  # the roofline
    no_gpu = CostModel(HardwareProfile("cpu-only-with-curve", "no GPU", CPU, curves={"gpu_matmul_bf16": GPU_CURVE}),
                       MIXTRAL)
    with pytest.raises(PlanError, match="has no GPU"):
        no_gpu.matmul_s("gpu", EXPERT, 1)


@pytest.mark.parametrize("lane", ["cpu", "gpu"])
def test_no_matmul_price_is_below_its_bytes_over_bandwidth(lane):
    curves = {"cpu_expert_bf16": Curve("cpu_expert_bf16", (1, 8, 512), (1e-14, 1e-13, 1e-12)),
              "gpu_matmul_bf16": Curve("gpu_matmul_bf16", (1, 8, 512), (1e-15, 1e-14, 1e-13))}
    cost = CostModel(desktop(curves), MIXTRAL)
    bandwidth = 60e9 if lane == "cpu" else 900e9
    for params in (4096, 4096 * 14336, EXPERT):
        for tokens in (1, 3, 8, 100, 512, 2048):
            act = tokens * 4096 * 4.0
            floor = 5e-6 + (params * 2 + act) / bandwidth  # one call's overhead + bytes / bandwidth
            assert cost.matmul_s(lane, params, tokens, act) >= floor * (1 - 1e-12)


def test_copies_pinned_pageable_and_latency(cost):
    n = 100 * 2**20
    assert cost.copy_s("h2d", n) == pytest.approx(10e-6 + n / 25e9)
    assert cost.copy_s("h2d", n, pinned=False) == pytest.approx(10e-6 + n / 8e9)
    assert cost.copy_s("d2h", n) == pytest.approx(10e-6 + n / 24e9)
    assert CostModel(desktop(), MIXTRAL, pinned=False).copy_s("d2h", n) == pytest.approx(10e-6 + n / 7e9)
    with pytest.raises(PlanError, match="'h2d' or 'd2h'"):
        cost.copy_s("sideways", 1)


@pytest.mark.parametrize("tokens, past", [(1, 0), (1, 700), (5, 3), (16, 0), (7, 9)])
def test_attention_counts_causal_pairs(cost, tokens, past):
    pairs = sum(past + i + 1 for i in range(tokens))
    assert cost.attention_pairs(tokens, past) == pairs
    nbytes, flops = cost.attention_cost(tokens, past, batch=2)
    assert flops == 2 * 4 * 32 * 128 * pairs
    assert nbytes == 2 * ((past + tokens) * 2 * 8 * 128 * 2 + tokens * 2 * 32 * 128 * 4)
    # decode attention over a long cache is memory-bound on the GPU
    assert cost.attention_s("gpu", 1, 4096) > cost.attention_s("gpu", 1, 64)


def test_gpu_work_on_a_cpu_only_profile_is_refused():
    cost = CostModel(cpu_only(), MIXTRAL)
    assert not cost.has_gpu
    assert cost.matmul_s("cpu", EXPERT, 1) > 0
    with pytest.raises(PlanError, match="has no GPU"):
        cost.matmul_s("gpu", EXPERT, 1)
    with pytest.raises(PlanError, match="has no GPU"):
        cost.copy_s("h2d", 1)
    with pytest.raises(PlanError, match="no compute on lane 'h2d'"):
        CostModel(desktop(), MIXTRAL).roofline_s("h2d", 1, 1)


def test_describe_lists_resolved_constants(cost):
    d = cost.describe()
    assert d["cpu_bw"] == 60e9 and d["gpu_flops"] == 160e12 and d["h2d_bw"] == 25e9
    assert "gpu_bw" not in CostModel(cpu_only(), MIXTRAL).describe()


# ---- the CPU engine's prices (a profile with a measured [cpu_lane]) ---------------------------------------

def lane_profile(**lane_kw) -> HardwareProfile:
    """The desktop with a hand-made CPU lane: round figures, curves at hidden 32 and 128 for every class."""
    from offloadkit.hardware.profile import CpuLaneProfile
    from offloadkit.plan.cpu_lane import CLASSES, curve_key

    fig = {"attention_keys": (1, 100), "attention_gflops": ((10.0, 40.0),), "attention_head_dims": (16,),
           "task_us": {"attn_norm": 5.0, "expert": 20.0, "lm_head": 7.0, "final_norm": 3.0, "host_step": 30.0,
                       "host_moe_layer": 40.0, "host_layer": 50.0},
           "task_hidden_ns": {"attn_norm": 100.0}, "element_ns": {"attn_norm": 0.5},
           "decode_ps": {"expert_bf16": 80.0, "expert_f32": 160.0}} | lane_kw
    curves = {}
    for cls in CLASSES:
        for width, spp in ((32, (1e-11, 1e-10)), (128, (4e-11, 4e-10))):
            for dt in ("bfloat16", "float32"):
                key = curve_key(cls, dt, width)
                curves[key] = Curve(key, (1, 64), spp)
    return HardwareProfile("lane", "a hand-made CPU lane", CPU, curves=curves, cpu_lane=CpuLaneProfile("hand", **fig))


def small_spec(arch: str = "mixtral", dtype: str = "bfloat16"):
    from offloadkit.model.spec import ModelSpec
    from offloadkit.model.writer import make_config

    # hidden 64, 4 heads of 16, 2 KV heads, 4 experts of 128 (top-2), vocabulary 512
    return ModelSpec.from_config(make_config(arch, layers=2, dtype=dtype), name=f"small-{arch}")


def test_the_kv_cache_is_priced_in_its_own_dtype():
    spec = small_spec()  # bf16 weights
    f32 = CostModel(cpu_only(), spec, kv_dtype="float32")
    tokens, past = 3, 10
    nbytes, _ = f32.attention_cost(tokens, past)
    assert nbytes == (past + tokens) * 2 * 2 * 16 * 4 + tokens * 2 * 4 * 16 * 4  # K and V in f32, q and o in f32
    weights, _ = CostModel(cpu_only(), spec).attention_cost(tokens, past)
    assert nbytes - weights == (past + tokens) * 2 * 2 * 16 * 2  # the default: the weights' 2 bytes


def test_cpu_lane_prices_by_hand():
    from offloadkit.plan.cpu_lane import params_of

    spec = small_spec()
    cost = CostModel(lane_profile(), spec)
    lane = cost.cpu_lane
    assert lane is not None and cost.cpu_task_s("attn_norm", 10) == pytest.approx(5e-6 + 100e-9 * 64 + 0.5e-9 * 64 * 9)
    expert = params_of(spec, "expert")
    assert expert == 3 * 64 * 128
    at_64 = (1e-10 * 4e-10) ** 0.5  # 64 tokens; hidden 64 is halfway (in log) between the curves at 32 and 128
    # one token: the engine's own read per weight (80 ps) is above the curve's (2e-11); 64 tokens: the curve's
    assert cost.cpu_task_s("expert", 1, expert) == pytest.approx(20e-6 + 80e-12 * expert)
    assert cost.cpu_task_s("expert", 64, expert) == pytest.approx(20e-6 + at_64 * expert)
    assert cost.cpu_task_s("ffn_norm", 1) == pytest.approx(5e-6 + 100e-9 * 64)  # borrowed from attn_norm
    assert cost.cpu_task_s("host_moe_layer", 7) == pytest.approx(40e-6)
    # the attention core: FLOPs at the rate for its keys per query (4 queries after 96 positions: ~98.5 keys)
    pairs = cost.attention_pairs(4, 96)
    rate = 10.0 * (40.0 / 10.0) ** (math.log(pairs / 4) / math.log(100)) * 1e9
    assert cost.attention_s("cpu", 4, 96) == pytest.approx(4 * 4 * 16 * pairs / rate)
    f32 = CostModel(lane_profile(), small_spec(dtype="float32"))
    assert f32.cpu_task_s("expert", 1, expert) == pytest.approx(20e-6 + 160e-12 * expert)


def test_the_step_graph_prices_the_engines_work():
    """With a CPU lane: the work outside tasks as tasks (once per step, once per layer), the lm_head and final
    norm over the positions the engine computes; without one (a catalog profile): the roofline, as before."""
    from dataclasses import replace

    from offloadkit.plan.plans import all_cpu
    from offloadkit.runtime.stepgraph import StepShape, build_step

    spec = small_spec()
    counts = [[3, 2, 1, 0]] * spec.n_layers  # 6 token-expert pairs = 3 tokens x top-2
    shape = StepShape(0, 3, 0)
    plan = replace(all_cpu(spec), meta={"kv_dtype": "float32"})
    graph = build_step(spec, plan, CostModel(lane_profile(), spec, kv_dtype="float32"), shape, counts)
    kinds = [t.kind for t in graph.tasks]
    assert kinds.count("host_step") == 1 and kinds.count("host_moe_layer") == spec.n_layers
    assert kinds.count("expert") == 3 * spec.n_layers
    head = next(t for t in graph.tasks if t.kind == "lm_head")
    assert head.flops == 2 * 1 * 64 * 512  # the last position only
    every = build_step(spec, replace(plan, meta={"logits": "all"}), CostModel(lane_profile(), spec), shape, counts)
    head_all = next(t for t in every.tasks if t.kind == "lm_head")
    assert head_all.flops == 2 * 3 * 64 * 512 and head_all.duration_s > head.duration_s
    norm = next(t for t in graph.tasks if t.kind == "final_norm")
    assert norm.duration_s == pytest.approx(3e-6)  # final_norm's own figure, one row
    # a catalog-like profile without a CPU lane: no host tasks, the norm priced by the roofline as before
    plain = CostModel(cpu_only(), spec)
    assert plain.cpu_lane is None
    graph = build_step(spec, all_cpu(spec), plain, shape, counts)
    assert not any(t.kind.startswith("host") for t in graph.tasks)
    first_norm = next(t for t in graph.tasks if t.kind == "attn_norm")
    assert first_norm.duration_s == pytest.approx(plain.norm_s("cpu", 3, 64))


def test_llamacpp_plans_keep_the_roofline_on_a_profile_with_a_cpu_lane():
    from offloadkit.plan.costmodel import engine_options
    from offloadkit.plan.plans import all_cpu, first_n_layers_on_gpu

    spec = small_spec()
    assert engine_options(all_cpu(spec)) == {"kv_dtype": None, "cpu_engine": True}
    llama = engine_options(first_n_layers_on_gpu(spec, 0, op_offload=False))
    assert llama["cpu_engine"] is False
    assert CostModel(lane_profile(), spec, **llama).cpu_lane is None
