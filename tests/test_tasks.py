"""Task graphs and the step builder: validation errors, plan placement, copies, op offload, plan errors."""

from __future__ import annotations

import dataclasses

import pytest
from sim_fixtures import cpu_only, desktop, tiny

from offloadkit.errors import PlanError, TaskGraphError
from offloadkit.model.zoo import load_spec
from offloadkit.plan.costmodel import CostModel
from offloadkit.plan.plans import (
    Workload,
    all_cpu,
    all_gpu,
    check_fits,
    first_n_layers_on_gpu,
    gpu_bytes,
    gpu_bytes_breakdown,
    max_ngl,
    parse_plan,
)
from offloadkit.runtime.sim import schedule
from offloadkit.runtime.stepgraph import StepShape, build_step
from offloadkit.runtime.tasks import Task, TaskGraph, check_dataflow, critical_path_s

MIXTRAL = load_spec("mixtral-8x7b")


# ---- graph validation -------------------------------------------------------------------------------

def test_cycle_is_named():
    g = TaskGraph([Task(0, "cpu", "x", "load", deps=(2,)), Task(1, "gpu", "x", "mul", deps=(0,)),
                   Task(2, "h2d", "x", "copy", deps=(1,)), Task(3, "cpu", "x", "free")])
    with pytest.raises(TaskGraphError, match="cycle: (load -> mul -> copy -> load|mul -> copy -> load -> mul|"
                                             "copy -> load -> mul -> copy)"):
        g.validate()


def test_missing_dependency_is_named():
    g = TaskGraph([Task(0, "cpu", "x", "a"), Task(1, "gpu", "x", "b", deps=(0, 7))])
    with pytest.raises(TaskGraphError, match=r"task 'b' \(id 1\) depends on task id\(s\) \[7\]"):
        g.validate()


def test_bad_lane_and_duplicate_id():
    with pytest.raises(TaskGraphError, match="lane 'tpu'"):
        TaskGraph([Task(0, "tpu", "x", "a")])
    with pytest.raises(TaskGraphError, match="reuses id 0 of task 'a'"):
        TaskGraph([Task(0, "cpu", "x", "a"), Task(0, "cpu", "x", "b")])


def test_forward_references_get_a_stable_topological_order():
    g = TaskGraph([Task(10, "cpu", "x", "late", deps=(30,)), Task(20, "cpu", "x", "free"),
                   Task(30, "gpu", "x", "early", duration_s=1.0)])
    assert [g.tasks[i].name for i in g.issue_order()] == ["free", "early", "late"]
    start, end = schedule(g)
    assert start[0] == 1.0 and critical_path_s(g) == 1.0


# ---- the step builder ---------------------------------------------------------------------------------

def _counts(spec, per_expert):
    return [[per_expert] * spec.n_experts if spec.is_moe_layer(layer) else [] for layer in range(spec.n_layers)]


def _graph(plan, tokens=1, past=100, spec=MIXTRAL, counts=None):
    cost = CostModel(desktop(), spec)
    counts = counts or [([1, 1] + [0] * (spec.n_experts - 2)) for _ in range(spec.n_layers)]
    return build_step(spec, plan, cost, StepShape(0 if past == 0 else 1, tokens, past), counts)


def test_all_cpu_runs_everything_on_the_cpu():
    g = _graph(all_cpu(MIXTRAL))
    assert {t.lane for t in g} == {"cpu"}
    experts = [t for t in g if t.kind == "expert"]
    assert len(experts) == 2 * 32 and {t.expert for t in experts} == {0, 1}
    assert sum(t.kind == "attention" for t in g) == 32


def test_all_gpu_copies_only_the_token_ids_in_and_the_logits_out():
    g = _graph(all_gpu(MIXTRAL))
    copies = [t for t in g if t.lane in ("h2d", "d2h")]
    assert [(t.lane, t.name) for t in copies] == [("h2d", "ids@cpu>gpu"), ("d2h", "logits@gpu>cpu")]
    assert copies[1].bytes_ == 32000 * 4
    assert {t.lane for t in g if t.kind not in ("activation",)} == {"gpu"}


def test_ngl_copies_activations_at_the_device_boundary_only():
    g = _graph(first_n_layers_on_gpu(MIXTRAL, 2))
    copies = [(t.lane, t.name) for t in g if t.kind == "activation"]
    # the embedding (CPU) feeds layer 0 (GPU); layer 1 (GPU) hands residual and FFN output to layer 2 (CPU)
    assert copies == [("h2d", "h@cpu>gpu"), ("d2h", "L1.hm@gpu>cpu"), ("d2h", "L1.y@gpu>cpu")]
    assert {t.lane for t in g if t.layer is not None and t.layer < 2 and t.kind != "activation"} == {"gpu"}
    assert {t.lane for t in g if t.layer is not None and t.layer >= 2 and t.kind != "activation"} == {"cpu"}
    assert not any(t.kind == "weights" for t in g)  # decode: no op offload


def test_op_offload_streams_cpu_layer_weights_for_big_batches():
    plan = first_n_layers_on_gpu(MIXTRAL, 30)
    g = _graph(plan, tokens=64, past=0, counts=_counts(MIXTRAL, 16))
    weights = [t for t in g if t.kind == "weights"]
    assert {t.layer for t in weights} == {30, 31}
    per_layer = MIXTRAL.bytes_of(sum(b.params for b in MIXTRAL.layer_blocks(31) if b.rows))
    assert sum(t.bytes_ for t in weights if t.layer == 31) == per_layer
    # the streamed matmuls run on the GPU; attention stays with its KV cache on the CPU
    assert {t.lane for t in g if t.layer == 31 and t.kind in ("expert", "attn_qkv", "attn_o")} == {"gpu"}
    assert {t.lane for t in g if t.layer == 31 and t.kind == "attention"} == {"cpu"}
    # one staging buffer: each weight copy waits for the compute that used the previous one
    users = [t for t in g if t.layer in (30, 31) and t.kind in ("attn_qkv", "attn_o", "expert")]
    for copy, prev_user in zip(weights[1:], users, strict=False):
        assert prev_user.id in copy.deps


def test_dense_and_shared_expert_blocks():
    spec, _ = tiny("qwen2_moe", layers=3, mlp_only_layers=[1])
    g = _graph(all_cpu(spec), spec=spec, counts=[[1, 1, 0, 0], [], [0, 2, 0, 0]])
    kinds = [(t.layer, t.kind) for t in g if t.kind in ("ffn", "expert", "shared_expert", "shared_gate")]
    # the shared expert needs no routing, so it is issued before the routed experts; the gate after them
    assert kinds == [(0, "shared_expert"), (0, "expert"), (0, "expert"), (0, "shared_gate"), (1, "ffn"),
                     (2, "shared_expert"), (2, "expert"), (2, "shared_gate")]


def test_dataflow_check_catches_a_missing_copy_dependency():
    g = _graph(first_n_layers_on_gpu(MIXTRAL, 2))
    start, end = schedule(g)
    check_dataflow(g, start, end)
    consumer = next(t for t in g if t.name == "L2.attn_norm")
    consumer.deps = tuple(d for d in consumer.deps if g[d].kind != "activation")
    start, end = schedule(g)
    with pytest.raises(TaskGraphError, match="task 'L2.attn_norm' reads L1.hm@gpu on the cpu"):
        check_dataflow(g, start, end)


# ---- plans ------------------------------------------------------------------------------------------

def test_unknown_plan_lists_the_known_ones():
    with pytest.raises(PlanError, match="unknown plan 'half-and-half'.*all-cpu, all-gpu, ngl:N"):
        parse_plan("half-and-half", MIXTRAL)
    with pytest.raises(PlanError, match="between 0 and 33"):
        first_n_layers_on_gpu(MIXTRAL, 40)  # the builder is strict; parse_plan reads ngl:40 as llama.cpp does
    assert parse_plan("ngl:4", MIXTRAL).label == "ngl:4" and parse_plan("all-gpu", MIXTRAL).policy == "gpu-only"


def test_a_plan_that_does_not_fit_says_by_how_many_bytes():
    w = Workload(512, 128)
    need = gpu_bytes(all_gpu(MIXTRAL), MIXTRAL, w)
    have = desktop().gpu.usable_memory_bytes
    with pytest.raises(PlanError, match=f"over by {need - have:,} bytes"):
        check_fits(all_gpu(MIXTRAL), MIXTRAL, desktop(), w)
    with pytest.raises(PlanError, match="has none"):
        check_fits(first_n_layers_on_gpu(MIXTRAL, 1), MIXTRAL, cpu_only(), w)
    assert check_fits(all_cpu(MIXTRAL), MIXTRAL, cpu_only(), w) == 0


def test_gpu_bytes_breakdown():
    w = Workload(512, 128)
    assert gpu_bytes(all_cpu(MIXTRAL), MIXTRAL, w) == 0
    parts = gpu_bytes_breakdown(all_gpu(MIXTRAL), MIXTRAL, w)
    assert parts["weights"] == MIXTRAL.total_bytes and parts["staging"] == 0
    assert parts["kv_cache"] == 640 * MIXTRAL.kv_bytes_per_token()
    ngl = gpu_bytes_breakdown(first_n_layers_on_gpu(MIXTRAL, 4), MIXTRAL, w)
    assert ngl["kv_cache"] == parts["kv_cache"] // 8 and ngl["staging"] > 0
    n = max_ngl(MIXTRAL, desktop(), w)
    assert 5 <= n <= 8
    check_fits(first_n_layers_on_gpu(MIXTRAL, n), MIXTRAL, desktop(), w)
    with pytest.raises(PlanError):
        check_fits(first_n_layers_on_gpu(MIXTRAL, n + 1), MIXTRAL, desktop(), w)


def test_workload_is_validated():
    with pytest.raises(PlanError, match="prompt_tokens must be a positive integer"):
        Workload(0, 4)
    assert Workload(512, 128, 4).label == "pp512+tg128 x B4"
    assert dataclasses.replace(Workload(), gen_tokens=0).max_len == 512
