"""The simulator held to the measured CPU engine (issue 10), and the rules of the prediction it is held by.

- ``test_the_simulator_holds_to_the_measured_engine`` measures this machine (``offloadkit profile --quick``,
  in-process, once per module) and a small MoE (bf16) and a small dense model (f32) on the real engine,
  llama-bench's pp128 and tg32, and holds the simulation of the same work to the measurement within ±35%
  per phase: what this shared, noisy machine allows (its memory read moves by up to 2x within an hour);
  the ±15% target is ``benchmarks/calibration.py``'s. The models (60-80 M parameters, hidden 512, a
  32000-token vocabulary) stream more than the last-level cache per step, as real models do, and their
  steps take tens of milliseconds, well above Python's noise.
- the others check the protocol (pp is one forward on an empty cache; tg is one-token forwards from an
  empty context), the logits' positions and the llama.cpp policy's own CPU lane, on a hand-made profile,
  against hand-built step graphs.
"""

from __future__ import annotations

import pytest
import torch
from test_costmodel import lane_profile, small_spec

from offloadkit.bench.calibrate import engine_plan, hold, predict_engine
from offloadkit.model.spec import ModelSpec
from offloadkit.model.writer import make_config, random_weights
from offloadkit.plan.costmodel import CostModel
from offloadkit.plan.plans import Workload
from offloadkit.runtime.cpu_engine import CpuEngine
from offloadkit.runtime.sim import schedule, simulate
from offloadkit.runtime.stepgraph import StepShape, build_step


@pytest.fixture(scope="module")
def measured():
    from offloadkit.hardware.probe import build_profile, measure

    return build_profile(measure(quick=True, progress=False), name="measured-test")


@pytest.mark.slow
@pytest.mark.parametrize("arch, dtype", [("mixtral", "bfloat16"), ("llama", "float32")])
def test_the_simulator_holds_to_the_measured_engine(measured, arch, dtype):
    config = make_config(arch, layers=2, hidden=512, heads=8, kv_heads=2, experts=8, top_k=2, intermediate=1024,
                         vocab=32000, dtype=dtype)
    spec = ModelSpec.from_config(config, name=f"calibration-{arch}")
    engine = CpuEngine(spec, random_weights(spec, seed=0))
    held = hold(engine, measured, n_prompt=128, n_gen=32, reps=3)
    if any(abs(held.ratio(phase) - 1) > 0.35 for phase in ("pp", "tg")):
        # A shared machine can slow down (or speed up) for minutes between the profile and the engine run; a
        # miss is only a miss of the model if a fresh profile, measured right before the engine, misses too.
        from offloadkit.hardware.probe import build_profile, measure

        fresh = build_profile(measure(quick=True, progress=False), name="measured-test-again")
        held = hold(engine, fresh, n_prompt=128, n_gen=32, reps=3)
    for phase in ("pp", "tg"):
        assert abs(held.ratio(phase) - 1) <= 0.35, f"{phase}: simulated / measured off by more than 35%\n" \
                                                   f"{held.table()}"


def test_the_tests_follow_llama_bench():
    """pp: one forward of the prompt on an empty cache; tg: one-token forwards from an empty context, each
    step one position further (a dense model, so the routing plays no part)."""
    spec, profile = small_spec("llama"), lane_profile()
    plan = engine_plan(spec)
    assert plan.meta == {"kv_dtype": "float32", "logits": "last", "cpu_engine": True}
    pp = predict_engine(spec, profile, 16, 0)
    assert pp == pytest.approx(simulate(spec, profile, plan, Workload(16, 0)).total_s)
    cost = CostModel(profile, spec, kv_dtype="float32")
    steps = [build_step(spec, plan, cost, StepShape(i, 1, i), []) for i in range(8)]
    by_hand = sum(max(schedule(g)[1]) for g in steps)
    assert predict_engine(spec, profile, 0, 8) == pytest.approx(by_hand)
    assert predict_engine(spec, profile, 16, 8) > pp  # the generation after the prompt
    assert predict_engine(spec, profile, 16, 0, logits="all") > pp  # every position's logits


def test_llamacpp_is_priced_on_the_plain_cpu_lane():
    spec, profile = small_spec("llama"), lane_profile()
    plan = engine_plan(spec, "llamacpp", profile=profile)
    assert plan.serial and plan.ubatch == 512 and not plan.uses_gpu and plan.meta["kv_dtype"] == "float16"
    result = simulate(spec, profile, plan, Workload(16, 0))
    assert not any(r.kind.startswith("host") for r in result.timeline.records)
    assert predict_engine(spec, profile, 16, 0, policy="llamacpp") == pytest.approx(result.total_s)


def test_hold_compares_phase_and_kind():
    """On a tiny model: the rows name every kind the engine recorded and the work outside its tasks."""
    spec = small_spec()
    engine = CpuEngine(spec, random_weights(spec, seed=0))
    held = hold(engine, lane_profile(), n_prompt=8, n_gen=4, reps=1)
    kinds = {r["kind"] for r in held.rows if r["phase"] == "tg"}
    assert {"total", "outside", "attn_qkv", "expert", "router", "lm_head"} <= kinds
    total = next(r for r in held.rows if r["phase"] == "pp" and r["kind"] == "total")
    assert total["measured_s"] > 0 and total["simulated_s"] > 0
    assert held.ratio("pp") == pytest.approx(total["simulated_s"] / total["measured_s"])
    assert "| pp | total |" in held.table() and torch.get_num_threads() >= 1
