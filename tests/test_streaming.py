"""Weights on their way to the device (offloadkit/runtime/streaming.py) on the loopback device.

Resident pieces and staged pieces must be *exactly* the host slices of :func:`~offloadkit.runtime.slices.host_pieces`
(the same bytes: a copy does no arithmetic), in each of the three host-side modes. Ordering is shown with
gates (``threading.Event``) the test opens itself, as in tests/test_devices.py: a stream held on a closed
gate is known not to have run what follows.
"""

from __future__ import annotations

import threading

import pytest
import torch
from hybrid_fixtures import model
from hypothesis import given, settings
from hypothesis import strategies as st

from offloadkit.errors import DeviceTimeout, TaskGraphError
from offloadkit.model.spec import ModelSpec
from offloadkit.plan.plans import Plan, plan_blocks, units
from offloadkit.runtime.devices import LoopbackDevice
from offloadkit.runtime.slices import PieceLayout, host_pieces, piece_names, slice_nbytes, unsplit_tensors
from offloadkit.runtime.streaming import WeightStreamer

ARCHS = ("mixtral", "llama", "qwen2_moe", "phimoe")
BOUND = 10.0
MODES = {"pinned": (True, None), "ring": (True, 0), "pageable": (False, None)}  # mode -> (plan.pinned, budget)



def third(spec: ModelSpec) -> dict[str, int]:
    """A third of every splittable block's rows resident, every other layer's unsplit blocks resident."""
    return {b.name: b.rows // 3 if b.rows else (b.layer or 0) % 2 for b in plan_blocks(spec)}


def streaming_plan(spec: ModelSpec, gg: dict[str, int] | None = None, *, pinned: bool = True, buffers: int = 2
                   ) -> Plan:
    return Plan("test-stream", third(spec) if gg is None else gg, (True,) * spec.n_layers, assign="balance",
                pinned=pinned, staging_buffers=buffers)


@pytest.fixture
def dev():
    d = LoopbackDevice()
    yield d
    d.close()


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


# ---- resident weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "dtype"), [(a, "float32") for a in ARCHS] + [("qwen2_moe", "bfloat16")])
def test_resident_pieces_are_the_host_slices_exactly(dev, arch: str, dtype: str) -> None:
    spec, weights = model(arch, dtype)
    gg = third(spec)
    gg["lm_head"] = units(next(b for b in plan_blocks(spec) if b.name == "lm_head"))  # a block whole on the GPU
    s = WeightStreamer(spec, weights, streaming_plan(spec, gg), dev)
    blocks = list(plan_blocks(spec))
    for b in blocks:
        g = min(gg.get(b.name, 0), units(b))
        if b.rows and b.kind != "embed":
            if g:
                assert_same(s.resident[b.name], host_pieces(spec, weights, b, 0, g))
                assert tuple(s.resident[b.name]) == piece_names(spec, b)
            else:
                assert b.name not in s.resident
            for name in unsplit_tensors(b):  # O's bias: whole on the device, whatever the split
                assert torch.equal(s.small[name], weights[name])
        elif g:  # unsplit blocks on the GPU (norms, routers, the embedding table): whole
            for t in b.tensors:
                assert torch.equal(s.small[t.name], weights[t.name])
        else:
            assert not any(t.name in s.small for t in b.tensors)
    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    expected = 0
    for b in blocks:
        g = min(gg.get(b.name, 0), units(b))
        if b.rows and b.kind != "embed":
            expected += nbytes(host_pieces(spec, weights, b, 0, g).values()) if g else 0
            expected += nbytes(weights[n] for n in unsplit_tensors(b))
        elif g:
            expected += nbytes(weights[t.name] for t in b.tensors)
    assert s.resident_bytes == expected


# ---- the mode and the staging buffers -----------------------------------------------------------------------


def test_the_mode_follows_the_plan_and_the_pinned_budget(dev) -> None:
    spec, weights = model("mixtral")
    plan = streaming_plan(spec)
    probe = WeightStreamer(spec, weights, plan, dev, pinned_budget_bytes=0)
    host = sum(slice_nbytes(spec, b, b.rows - probe.gg(b)) for b in probe.streamed)
    assert host > 0 and probe.mode == "ring"
    assert {b.name for b in probe.streamed} == {b.name for b in plan_blocks(spec)
                                                 if b.rows and b.kind != "embed" and probe.gg(b) < b.rows}
    assert WeightStreamer(spec, weights, plan, dev).mode == "pinned"  # default budget: a quarter of the memory
    assert WeightStreamer(spec, weights, plan, dev, pinned_budget_bytes=host).mode == "pinned"
    assert WeightStreamer(spec, weights, plan, dev, pinned_budget_bytes=host - 1).mode == "ring"
    pageable = Plan("p", plan.gg_rows, plan.kv_on_gpu, assign="balance", pinned=False)
    for budget in (None, 0, host):
        assert WeightStreamer(spec, weights, pageable, dev, pinned_budget_bytes=budget).mode == "pageable"
    # the buffers: staging_buffers of them, each the largest streamed slice in piece layout
    s = WeightStreamer(spec, weights, streaming_plan(spec, buffers=3), dev, pinned_budget_bytes=0)
    largest = max(PieceLayout.of(spec, b, b.rows - s.gg(b), s.dtype).nbytes for b in s.streamed)
    assert len(s.slots) == len(s.ring) == 3 and s.slot_bytes == largest
    assert all(t.numel() == largest for t in (*s.slots, *s.ring))


def test_a_plan_that_never_streams_has_no_buffers_and_refuses_a_copy(dev) -> None:
    spec, weights = model("mixtral")
    plan = Plan("resident", third(spec), (True, True))  # the cpu rule: host rows never stream
    s = WeightStreamer(spec, weights, plan, dev, pinned_budget_bytes=0)
    assert s.streamed == [] and s.slots == [] and s.slot_bytes == 0
    block = next(b for b in plan_blocks(spec) if b.kind == "expert")
    with pytest.raises(TaskGraphError, match="the plan streams no weights"):
        s.stage(0, block, 100, 128, dev.stream("h2d"), "L0.expert0.cg.w")


@st.composite
def copies(draw, spec: ModelSpec, gg: dict[str, int]):
    """1..6 copies (block, r0, r1) of host rows (``r0 >= gg``: CG rows lie past the resident ones)."""
    blocks = [b for b in plan_blocks(spec) if b.rows and b.kind != "embed" and gg.get(b.name, 0) < b.rows]
    out = []
    for _ in range(draw(st.integers(1, 6))):
        b = draw(st.sampled_from(blocks))
        r0 = draw(st.integers(gg.get(b.name, 0), b.rows - 1))
        out.append((b, r0, draw(st.integers(r0 + 1, b.rows))))
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_staged_pieces_are_the_host_slices_exactly(arch: str, mode: str, data) -> None:
    """Copies queued back to back (slots reused, the ring's host slots refilled): each lands as the host slice.
    A launch queued after each copy snapshots its staging buffer before any later copy can reach it."""
    spec, weights = model(arch)
    gg = {b.name: data.draw(st.integers(0, units(b) - 1 if b.rows else 1), label=b.name) for b in plan_blocks(spec)}
    pinned, budget = MODES[mode]
    buffers = data.draw(st.integers(1, 3), label="staging_buffers")
    todo = data.draw(copies(spec, gg))
    with LoopbackDevice() as dev:
        s = WeightStreamer(spec, weights, streaming_plan(spec, gg, pinned=pinned, buffers=buffers), dev,
                           pinned_budget_bytes=budget, wait_s=BOUND)
        assert s.mode == mode
        h2d, snaps = dev.stream("h2d"), []
        s.begin_step()
        for i, (b, r0, r1) in enumerate(todo):
            dst = s.stage(100 + i, b, r0, r1, h2d, f"copy {i}")
            h2d.launch(lambda dst=dst: snaps.append({n: t.clone() for n, t in dst.items()}), f"snapshot {i}")
        h2d.synchronize(BOUND)
    assert s.slot_of == {100 + i: i % buffers for i in range(len(todo))}
    for snap, (b, r0, r1) in zip(snaps, todo, strict=True):
        assert_same(snap, {n: t.contiguous() for n, t in host_pieces(spec, weights, b, r0, r1).items()})


@pytest.mark.parametrize("mode", MODES)
def test_staged_bf16_pieces_are_the_host_slices_exactly(dev, mode: str) -> None:
    spec, weights = model("qwen2_moe", "bfloat16")  # Qwen: QKV with a bias (a vector piece after the matrix)
    pinned, budget = MODES[mode]
    s = WeightStreamer(spec, weights, streaming_plan(spec, pinned=pinned, buffers=1), dev, pinned_budget_bytes=budget)
    h2d = dev.stream("h2d")
    for b in s.streamed:
        g = s.gg(b)
        for r0, r1 in ((g, b.rows), (g + 1, g + 2), (b.rows - 1, b.rows)):
            s.begin_step()
            dst = s.stage(0, b, r0, r1, h2d, b.name)
            h2d.synchronize(BOUND)
            assert_same(dst, {n: t.contiguous() for n, t in host_pieces(spec, weights, b, r0, r1).items()})


# ---- the ring: a host slot is refilled only after the copy that read it ---------------------------------------


def _held(gate: threading.Event):
    def run() -> None:
        if not gate.wait(BOUND):
            raise TimeoutError("the test never opened the gate")
    return run


def test_a_ring_slot_is_refilled_only_after_its_copy_has_read_it() -> None:
    """One buffer, so both copies use ring slot 0. The h2d stream is held, so copy 1 has not run when copy 2 is
    staged: were slot 0 repacked then, copy 1 would carry copy 2's rows. The gate opens from another thread
    only after a while; stage() must wait for it (not for a timer), and a launch between the two copies sees
    exactly copy 1's rows in the device buffer."""
    spec, weights = model("mixtral")
    with LoopbackDevice() as dev:
        s = WeightStreamer(spec, weights, streaming_plan(spec, buffers=1), dev, pinned_budget_bytes=0, wait_s=BOUND)
        assert s.mode == "ring" and len(s.ring) == 1
        a, b = (next(x for x in s.streamed if x.name == n) for n in ("L0.expert0", "L1.expert3"))
        h2d, gate, seen = dev.stream("h2d"), threading.Event(), []
        h2d.launch(_held(gate), "held")
        s.begin_step()
        first = s.stage(0, a, s.gg(a), a.rows, h2d, "copy 1")
        h2d.launch(lambda: seen.append({n: t.clone() for n, t in first.items()}), "after copy 1")
        opener = threading.Timer(0.2, gate.set)
        opener.start()
        try:
            second = s.stage(1, b, s.gg(b), b.rows, h2d, "copy 2")
            assert gate.is_set()  # it returned only once the held stream was let go
            h2d.synchronize(BOUND)
        finally:
            gate.set()
            opener.cancel()
            opener.join()
    assert_same(seen[0], {n: t.contiguous() for n, t in host_pieces(spec, weights, a, s.gg(a), a.rows).items()})
    assert_same(second, {n: t.contiguous() for n, t in host_pieces(spec, weights, b, s.gg(b), b.rows).items()})


def test_a_ring_slot_whose_copy_never_ends_is_given_up_on() -> None:
    spec, weights = model("mixtral")
    with LoopbackDevice() as dev:
        s = WeightStreamer(spec, weights, streaming_plan(spec, buffers=1), dev, pinned_budget_bytes=0, wait_s=0.3)
        block = s.streamed[0]
        h2d, gate = dev.stream("h2d"), threading.Event()
        h2d.launch(_held(gate), "held")
        s.begin_step()
        s.stage(0, block, s.gg(block), block.rows, h2d, "copy 1")
        try:
            with pytest.raises(DeviceTimeout, match=r"copy 2: pinned slot 0 waited 0.3 s"):
                s.stage(1, block, s.gg(block), block.rows, h2d, "copy 2")
        finally:
            gate.set()


def test_pinned_and_pageable_modes_never_wait_on_the_host(dev) -> None:
    """Their host sources are never reused while a copy is queued (pinned: a copy per block; pageable: a fresh
    buffer per copy), so staging twice into one device buffer behind a held stream returns at once; the device
    side is ordered by the stream."""
    spec, weights = model("mixtral")
    for pinned, budget in ((True, None), (False, None)):
        s = WeightStreamer(spec, weights, streaming_plan(spec, pinned=pinned, buffers=1), dev,
                           pinned_budget_bytes=budget, wait_s=BOUND)
        a, b = s.streamed[0], s.streamed[-1]
        h2d, gate, seen = dev.stream("h2d"), threading.Event(), []
        h2d.launch(_held(gate), "held")
        s.begin_step()
        first = s.stage(0, a, s.gg(a), a.rows, h2d, "copy 1")
        h2d.launch(lambda first=first, seen=seen: seen.append({n: t.clone() for n, t in first.items()}), "after copy 1")
        s.stage(1, b, s.gg(b), b.rows, h2d, "copy 2")
        assert not gate.is_set()  # both staged while the stream is still held
        gate.set()
        h2d.synchronize(BOUND)
        assert_same(seen[-1], {n: t.contiguous() for n, t in host_pieces(spec, weights, a, s.gg(a), a.rows).items()})
