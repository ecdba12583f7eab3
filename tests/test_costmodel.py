"""The cost model: the roofline, measured curves, copies, attention, and its refusals."""

from __future__ import annotations

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
