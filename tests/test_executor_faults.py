"""The hybrid executor when things go wrong: a task that raises, a copy that stalls, Ctrl-C, bad input.

Every test checks that the executor leaves no thread behind (its four lane threads and the loopback
device's stream threads), allowing a short window for them to be joined. Faults are injected by
monkeypatching :class:`~offloadkit.runtime.lane_math.LaneMath` for one named task on one side, so the
failing task is known and the message can be held to naming it. Times are asserted only from above and
only where the point is "this returns instead of hanging" (a stalled copy, 30 s, must not be waited out).
"""

from __future__ import annotations

import _thread
import time

import pytest
import torch
from sim_fixtures import desktop, tiny

from offloadkit.errors import (
    CudaUnavailableError,
    DeviceError,
    DeviceTimeout,
    ExecutorError,
    OffloadkitError,
    PlanError,
)
from offloadkit.plan.plans import Plan, Workload, all_cpu, all_gpu, plan_blocks
from offloadkit.runtime.device_open import open_device
from offloadkit.runtime.devices import LoopbackDevice
from offloadkit.runtime.engine import HybridEngine, check_plan_blocks, measure_generation
from offloadkit.runtime.lane_math import LaneMath

WORKLOAD = Workload(9, 3)
BOUND = 10.0


@pytest.fixture(autouse=True)
def _no_leftover_threads(no_leftover_threads):
    """Every test here: no thread left running."""
    yield


def mixtral():
    return tiny("mixtral", layers=2)


def hybrid_plan(spec) -> Plan:
    """A third of every block resident; layer 1's norms and router on the GPU, layer 0's on the CPU; layer 0's
    attention on the GPU, layer 1's on the CPU; host rows streamed from 4 tokens (so the prompt streams)."""
    gg = {b.name: b.rows // 3 if b.rows else (b.layer or 0) % 2 for b in plan_blocks(spec)}
    return Plan("test-hybrid", gg, (True, False), stream_min_tokens=4, staging_buffers=2)


def prompt(spec, tokens: int = 9) -> torch.Tensor:
    return torch.randint(0, spec.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(2))


def make_engine(spec, weights, plan, device=None, **kw) -> HybridEngine:
    kw.setdefault("wait_s", BOUND)
    return HybridEngine(spec, weights, plan, desktop(), device or LoopbackDevice(), workload=WORKLOAD, check=True,
                        **kw)


def inject(monkeypatch, method: str, side: str, layer: int, suffix: str = "") -> list[str]:
    """Make ``LaneMath.<method>`` raise ``RuntimeError("injected fault 7f3a")`` on the first task of ``layer`` it
    runs on ``side`` (whose name ends with ``suffix``); returns the list that gets that task's name."""
    orig = getattr(LaneMath, method)
    hit: list[str] = []

    def faulty(self, task):
        if self.side == side and task.layer == layer and task.name.endswith(suffix) and not hit:
            hit.append(task.name)
            raise RuntimeError("injected fault 7f3a")
        return orig(self, task)

    monkeypatch.setattr(LaneMath, method, faulty)
    return hit


#: (LaneMath method, side, layer, name suffix): under hybrid_plan each names one task on one lane.
FAULTS = {
    "expert-on-gpu": ("_expert", "gpu", 1, ".gg"),
    "expert-on-cpu": ("_expert", "cpu", 1, ".cc"),
    "router-on-gpu": ("_router", "gpu", 1, ""),
    "router-on-cpu": ("_router", "cpu", 0, ""),
    "attention-on-gpu": ("_attention", "gpu", 0, ""),
    "attention-on-cpu": ("_attention", "cpu", 1, ""),
}


# ---- 1. a task that raises ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failing_task_stops_everything_and_the_engine_refuses_further_use(monkeypatch, fault: str) -> None:
    method, side, layer, suffix = FAULTS[fault]
    hit = inject(monkeypatch, method, side, layer, suffix)
    spec, weights = mixtral()
    eng = make_engine(spec, weights, hybrid_plan(spec))
    with pytest.raises(OffloadkitError) as e:
        measure_generation(eng, prompt(spec), 3)
    assert len(hit) == 1
    msg = str(e.value)
    assert hit[0] in msg and "injected fault 7f3a" in msg and "RuntimeError" in msg
    assert eng.executor.closed and eng.device.closed
    with pytest.raises(ExecutorError, match=r"this executor was shut down .*make a new engine"):
        eng.forward(prompt(spec))
    eng.close()  # closing again is harmless


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failing_task_is_reported_as_an_executor_error_naming_it_and_its_lane(monkeypatch, fault: str) -> None:
    """The headline of the error is the task that failed and the lane it ran on, whichever lane noticed first."""
    method, side, layer, suffix = FAULTS[fault]
    hit = inject(monkeypatch, method, side, layer, suffix)
    spec, weights = mixtral()
    with make_engine(spec, weights, hybrid_plan(spec)) as eng, pytest.raises(ExecutorError) as e:
        measure_generation(eng, prompt(spec), 3)
    assert str(e.value).startswith(f"task {hit[0]!r} on the {side} lane failed: ")
    assert "injected fault 7f3a" in str(e.value)


@pytest.mark.parametrize("fault", ["expert-on-cpu", "expert-on-gpu"])
def test_the_original_exception_is_kept_in_the_chain(monkeypatch, fault: str) -> None:
    """``raise ... from`` keeps the task's own exception (and its traceback) reachable from the ExecutorError."""
    method, side, layer, suffix = FAULTS[fault]
    inject(monkeypatch, method, side, layer, suffix)
    spec, weights = mixtral()
    with make_engine(spec, weights, hybrid_plan(spec)) as eng, pytest.raises(OffloadkitError) as e:
        measure_generation(eng, prompt(spec), 3)
    chain, c = [], e.value
    while c is not None and len(chain) < 10:
        chain.append(c)
        c = c.__cause__ or c.__context__
    assert any(isinstance(x, RuntimeError) and str(x) == "injected fault 7f3a" for x in chain), \
        [f"{type(x).__name__}: {x}" for x in chain]


# ---- 2. a copy that stalls past its bound ----------------------------------------------------------------------


@pytest.mark.parametrize("plan_of", [hybrid_plan, all_gpu], ids=["hybrid", "all-gpu"])
def test_a_stalled_copy_is_given_up_on_within_the_bound(plan_of) -> None:
    spec, weights = mixtral()
    eng = make_engine(spec, weights, plan_of(spec), LoopbackDevice(copy_delay_s=30.0), wait_s=0.5)
    t0 = time.monotonic()
    with pytest.raises((ExecutorError, DeviceTimeout)) as e:
        measure_generation(eng, prompt(spec), 3)
    assert time.monotonic() - t0 < BOUND  # not the 30 s the copy would take
    msg = str(e.value)
    assert "waited 0.5 s" in msg and "gave up" in msg
    assert "task '" in msg
    assert eng.executor.closed and eng.device.closed
    with pytest.raises(ExecutorError, match="shut down"):
        eng.forward(prompt(spec))


def test_a_slow_but_bounded_copy_is_waited_for() -> None:
    """The negative control: copies slowed well within the bound just take longer, with the reference's logits."""
    from offloadkit.model.reference import ReferenceModel

    spec, weights = mixtral()
    with make_engine(spec, weights, hybrid_plan(spec), LoopbackDevice(copy_delay_s=0.002), wait_s=BOUND) as eng:
        run = measure_generation(eng, prompt(spec), 3)
    assert run.tokens == ReferenceModel(spec, weights).greedy(prompt(spec), 3)[0].tolist()


# ---- 3. Ctrl-C in the middle of a step -------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "layer"), [("_router", 0), ("_expert", 1)])
def test_keyboard_interrupt_mid_step_reaches_the_caller_and_stops_the_threads(monkeypatch, method, layer) -> None:
    """A CPU task raises SIGINT's KeyboardInterrupt in the main thread (as Ctrl-C would) and carries on until the
    executor has begun shutting down, as a running kernel would."""
    spec, weights = mixtral()
    eng = make_engine(spec, weights, hybrid_plan(spec))
    orig = getattr(LaneMath, method)
    fired: list[str] = []

    def interrupting(self, task):
        if self.side == "cpu" and task.layer == layer and not fired:
            fired.append(task.name)
            _thread.interrupt_main()
            deadline = time.monotonic() + BOUND
            while not eng.executor.closed and time.monotonic() < deadline:
                time.sleep(0.001)
        return orig(self, task)

    monkeypatch.setattr(LaneMath, method, interrupting)
    with pytest.raises(KeyboardInterrupt):
        measure_generation(eng, prompt(spec), 3)
    assert fired and eng.executor.closed and eng.device.closed
    monkeypatch.setattr(LaneMath, method, orig)
    with pytest.raises(ExecutorError, match="shut down"):
        eng.forward(prompt(spec))


# ---- 4. bad input ------------------------------------------------------------------------------------------------


def test_a_plan_over_the_device_memory_is_refused_before_any_allocation() -> None:
    spec, weights = mixtral()
    device = LoopbackDevice(memory_bytes=64 * 1024)
    with pytest.raises(PlanError, match="over by") as e:
        make_engine(spec, weights, all_gpu(spec), device)
    assert "weights" in str(e.value) and "loopback" in str(e.value)
    assert device.streams == [] and device.closed
    # an all-CPU plan needs no device memory at all
    with make_engine(spec, weights, all_cpu(spec), LoopbackDevice(memory_bytes=0)) as eng:
        eng.forward(prompt(spec))


@pytest.mark.parametrize(("gg", "match"), [
    ({"L9.expert0": 4}, r"places block\(s\) L9.expert0 that tiny-mixtral does not have"),
    ({"L0.expert0": 129}, "keeps 129 rows of L0.expert0 on the GPU; the block has 128"),
    ({"L0.expert0": -1}, "keeps -1 rows"),
    ({"L0.router": 2}, "keeps 2 rows of L0.router on the GPU; the block has 1"),
])
def test_a_plan_that_does_not_match_the_model_is_refused(gg, match) -> None:
    spec, weights = mixtral()
    plan = Plan("bad", gg, (False, False))
    with pytest.raises(PlanError, match=match):
        check_plan_blocks(plan, spec)
    device = LoopbackDevice()
    with pytest.raises(PlanError, match=match):
        make_engine(spec, weights, plan, device)
    assert device.streams == [] and device.closed


def test_a_plan_for_another_layer_count_is_refused() -> None:
    spec, weights = mixtral()
    with pytest.raises(PlanError, match="places the KV cache of 3 layers; tiny-mixtral has 2"):
        make_engine(spec, weights, Plan("bad", {}, (False, False, False)))


def test_a_gpu_plan_on_a_profile_without_a_gpu_is_refused() -> None:
    from sim_fixtures import cpu_only

    spec, weights = mixtral()
    device = LoopbackDevice()
    with pytest.raises(PlanError, match="has none"):
        HybridEngine(spec, weights, hybrid_plan(spec), cpu_only(), device, workload=WORKLOAD)
    assert device.streams == [] and device.closed


def test_a_forward_past_the_cache_says_the_context_ends() -> None:
    spec, weights = mixtral()
    with make_engine(spec, weights, hybrid_plan(spec)) as eng:
        cache = eng.new_cache(1, 10)
        eng.forward(prompt(spec, 9), cache)
        eng.forward(torch.tensor([[1]]), cache)  # position 9: the last one
        with pytest.raises(OffloadkitError, match=r"holds 10 positions and 10 are used; 1 more do not fit.*"
                                                  r"the context ends"):
            eng.forward(torch.tensor([[1]]), cache)
        with pytest.raises(OffloadkitError, match="the context ends"):
            eng.forward(prompt(spec, 11), eng.new_cache(1, 10))
        # a refused input is not a fault: the engine still runs
        assert eng.forward(prompt(spec, 3)).shape == (1, 1, spec.vocab_size)


@pytest.mark.parametrize(("ids", "match"), [
    (torch.zeros((1, 0), dtype=torch.long), "tokens >= 1"),
    (torch.zeros((3,), dtype=torch.long), r"must be \[batch, tokens\]"),
])
def test_malformed_input_ids_are_refused(ids, match) -> None:
    spec, weights = mixtral()
    with make_engine(spec, weights, hybrid_plan(spec)) as eng:
        with pytest.raises(OffloadkitError, match=match):
            eng.forward(ids)
        with pytest.raises(OffloadkitError, match="batch of 1, the input has 2"):
            eng.forward(torch.zeros((2, 3), dtype=torch.long), eng.new_cache(1, 8))


def test_cuda_is_refused_here_saying_what_to_use() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CudaUnavailableError, match="--device loopback"):
        open_device("cuda")
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        open_device("gpu")
