"""The loopback device: CUDA's stream and event semantics on CPU threads (offloadkit/runtime/devices.py).

Ordering is shown with gates (``threading.Event``) the test opens itself, never with sleeps that only
usually suffice: a stream blocked on a closed gate is *known* not to have run what follows. Timings
are only asserted from below (a throttled copy takes at least its bytes / bandwidth), never from
above, except for "this returns at once instead of after 30 s".
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from offloadkit.errors import CudaUnavailableError, DeviceError, DeviceTimeout
from offloadkit.runtime.device_open import open_device
from offloadkit.runtime.devices import DEFAULT_WAIT_S, Device, LoopbackDevice

BOUND = 10.0  # every wait of these tests: far beyond what the work takes, short of hanging the suite


@pytest.fixture
def dev():
    d = LoopbackDevice()
    yield d
    d.close()


def _loopback_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("offloadkit-loopback-")}


def held(gate: threading.Event):
    """A launch that holds its stream until the test opens ``gate`` (and fails if it never does)."""
    def run() -> None:
        if not gate.wait(BOUND):
            raise TimeoutError("the test never opened the gate")
    return run


def raises(exc: BaseException):
    def run() -> None:
        raise exc
    return run


def _until(predicate, what: str, bound: float = BOUND) -> None:
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


# ---- order and concurrency ------------------------------------------------------------------------


def test_work_on_one_stream_runs_in_the_order_it_was_queued(dev):
    s = dev.stream("gpu")
    seen: list[int] = []
    for i in range(200):
        s.launch(lambda i=i: seen.append(i), f"task {i}")
    s.record().wait(BOUND, "the test")
    assert seen == list(range(200))


def test_a_copy_is_ordered_with_the_launches_around_it(dev):
    s = dev.stream("h2d")
    src, dst = torch.zeros(1000), torch.full((1000,), -1.0)
    s.launch(lambda: src.fill_(3.0), "write src")  # the copy, queued after, sees it
    s.copy(dst, src, "copy")
    s.launch(lambda: src.fill_(4.0), "overwrite src")  # and does not see this
    s.synchronize(BOUND)
    assert bool((dst == 3.0).all()) and bool((src == 4.0).all())


def test_two_streams_run_at_the_same_time(dev):
    """Each launch waits at a two-party barrier: only if both streams run at once do both get through."""
    barrier = threading.Barrier(2, timeout=BOUND)
    a, b = dev.stream("a"), dev.stream("b")
    a.launch(barrier.wait, "a at the barrier")
    b.launch(barrier.wait, "b at the barrier")
    a.record().wait(BOUND, "stream a")
    b.record().wait(BOUND, "stream b")  # a BrokenBarrierError would arrive here as DeviceError


def test_a_stream_blocked_on_work_of_another_is_released_by_it(dev):
    """Stream a waits (on the host side, inside its launch) for a gate that stream b opens after its own
    work; the stamps show a's wait ended after b opened the gate."""
    gate = threading.Event()
    a, b = dev.stream("a"), dev.stream("b")
    a.launch(held(gate), "a waits")
    a_done = a.stamp()
    b.launch(lambda: time.sleep(0.02), "b works")
    b_opens = b.stamp()
    b.launch(gate.set, "b opens the gate")
    a.record().wait(BOUND, "stream a")
    b.record().wait(BOUND, "stream b")
    assert a_done.seconds() >= b_opens.seconds()


# ---- events across streams --------------------------------------------------------------------------


def test_without_a_wait_event_the_reader_sees_the_old_value(dev):
    """The reader on stream b is not told to wait for stream a's write, so it runs while a is held at a
    gate and reads the old value: the race wait_event exists to prevent."""
    t = torch.zeros(4)
    gate = threading.Event()
    a, b = dev.stream("a"), dev.stream("b")
    a.launch(held(gate), "a held at the gate")
    a.launch(lambda: t.fill_(1.0), "a writes")
    seen: list[float] = []
    b.launch(lambda: seen.append(float(t.sum())), "b reads")
    b.record().wait(BOUND, "stream b")
    gate.set()
    a.record().wait(BOUND, "stream a")
    assert seen == [0.0] and float(t.sum()) == 4.0


def test_wait_event_makes_the_reader_wait_for_the_writer(dev):
    t = torch.zeros(4)
    gate = threading.Event()
    a, b = dev.stream("a"), dev.stream("b")
    a.launch(held(gate), "a held at the gate")
    a.launch(lambda: t.fill_(1.0), "a writes")
    written = a.record()
    b.wait_event(written)
    seen: list[float] = []
    b.launch(lambda: seen.append(float(t.sum())), "b reads")
    read = b.record()
    time.sleep(0.05)  # time enough for b to run ahead, were it not waiting
    assert not read.query() and not written.query() and seen == []  # b is held behind a's gate
    gate.set()
    read.wait(BOUND, "stream b")
    assert seen == [4.0]


def test_work_queued_before_the_wait_event_is_not_held_back(dev):
    gate = threading.Event()
    a, b = dev.stream("a"), dev.stream("b")
    a.launch(held(gate), "a held at the gate")
    before = b.record()
    b.wait_event(a.record())
    before.wait(BOUND, "b's work before the wait")
    gate.set()
    b.synchronize(BOUND)


def test_a_host_wait_past_its_bound_raises_device_timeout_naming_everything(dev):
    gate = threading.Event()
    s = dev.stream("h2d")
    s.launch(held(gate), "layer 7 expert 3 copy")
    ev = s.record()
    t0 = time.perf_counter()
    with pytest.raises(DeviceTimeout) as info:
        ev.wait(0.2, "the step's end")
    assert time.perf_counter() - t0 >= 0.2
    msg = str(info.value)
    assert "the step's end" in msg and "0.2 s" in msg and "h2d" in msg and "layer 7 expert 3 copy" in msg
    assert isinstance(info.value, DeviceError)  # a timeout is a device error too
    gate.set()
    ev.wait(BOUND, "after the gate opened")  # the event itself is fine: only the waiter gave up


def test_a_stream_waiting_on_a_stalled_stream_times_out_inside_its_queue():
    with LoopbackDevice(wait_s=0.2) as dev:
        gate = threading.Event()
        a, b = dev.stream("a"), dev.stream("b")
        a.launch(held(gate), "stalled copy")
        b.wait_event(a.record())
        ran: list[int] = []
        b.launch(lambda: ran.append(1), "reader")
        with pytest.raises(DeviceTimeout, match="stream a"):
            b.record().wait(BOUND, "the test")
        assert ran == []  # what followed the failed wait was skipped
        gate.set()


# ---- faults --------------------------------------------------------------------------------------


def test_a_failed_launch_fails_every_later_event_and_skips_the_work_behind_it(dev):
    s = dev.stream("gpu")
    before = s.record()
    s.launch(raises(ValueError("shape [3, 5] is not [3, 4]")), "layer 2 expert 6")
    ran: list[str] = []
    s.launch(lambda: ran.append("later"), "later work")
    after = s.record()
    before.wait(BOUND, "before")  # what came before is fine
    for _ in range(2):  # and stays failed
        with pytest.raises(DeviceError) as info:
            after.wait(BOUND, "the step's end")
        assert "layer 2 expert 6" in str(info.value) and "shape [3, 5] is not [3, 4]" in str(info.value)
        assert "ValueError" in str(info.value) and isinstance(info.value.__cause__, ValueError)
    assert not isinstance(info.value, DeviceTimeout)
    with pytest.raises(DeviceError, match="layer 2 expert 6"):
        s.record().wait(BOUND, "a later event")
    late = s.record()
    with pytest.raises(DeviceError, match="layer 2 expert 6"):
        late.wait(BOUND, "a later event")
    with pytest.raises(DeviceError, match="layer 2 expert 6"):
        late.query()  # query reports it too, once the stream has reached the event
    assert ran == []


def test_a_failure_reaches_the_streams_that_wait_for_it(dev):
    a, b = dev.stream("a"), dev.stream("b")
    a.launch(lambda: 1 / 0, "the router")
    b.wait_event(a.record())
    ran: list[int] = []
    b.launch(lambda: ran.append(1), "the experts")
    with pytest.raises(DeviceError, match="the router"):
        b.record().wait(BOUND, "the test")
    assert ran == []


def test_a_copy_of_another_shape_or_dtype_is_refused_when_queued(dev):
    s = dev.stream("h2d")
    with pytest.raises(DeviceError, match=r"same shape and dtype.*\(4,\) torch.float32 -> \(5,\)"):
        s.copy(torch.empty(5), torch.empty(4), "bad shape")
    with pytest.raises(DeviceError, match="bfloat16"):
        s.copy(torch.empty(4, dtype=torch.bfloat16), torch.empty(4), "bad dtype")
    s.synchronize(BOUND)  # nothing was queued, the stream is fine


# ---- throttled and stalled copies --------------------------------------------------------------------


def test_a_throttled_copy_takes_at_least_its_bytes_over_the_bandwidth():
    nbytes = 10_000_000  # 10 MB at 1 GB/s: 10 ms
    with LoopbackDevice(copy_gbps={"h2d": 1.0}) as dev:
        assert "h2d at 1 GB/s" in dev.label
        h2d = dev.stream("h2d")
        src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
        t0 = h2d.stamp()
        h2d.copy(dst, src, "weights")
        t1 = h2d.stamp()
        h2d.synchronize(BOUND)
        assert t1.seconds() - t0.seconds() >= 0.0099
        assert bool((dst == 1).all())


def test_throttled_takes_the_links_bandwidths():
    from offloadkit.hardware.catalog import load_profile

    link = load_profile("rtx4090-desktop").link
    with LoopbackDevice.throttled(link) as dev:
        assert dev.copy_gbps == pytest.approx({"h2d": link.h2d_pinned_gbps, "d2h": link.d2h_pinned_gbps})
    with LoopbackDevice.throttled(link, pinned=False) as dev:
        assert dev.copy_gbps["h2d"] == pytest.approx(link.h2d_pageable_gbps)


def test_a_stalled_copy_wakes_at_once_when_the_device_closes():
    dev = LoopbackDevice(copy_delay_s=60.0)
    s = dev.stream("h2d")
    s.copy(torch.zeros(8), torch.ones(8), "stalled copy")
    _until(lambda: s.current == "stalled copy", "the copy to start")
    t0 = time.perf_counter()
    dev.close()
    assert time.perf_counter() - t0 < 5.0  # not the 60 s of the stall
    assert not s.thread.is_alive()


# ---- stamps ------------------------------------------------------------------------------------------


def test_stamps_are_monotonic_and_on_the_host_clock(dev):
    s = dev.stream("gpu")
    host_before = time.perf_counter()
    stamps = []
    for i in range(20):
        s.launch(lambda i=i: sum(range(1000 * i)), f"work {i}")
        stamps.append(s.stamp())
    s.synchronize(BOUND)
    host_after = time.perf_counter()
    times = [st.seconds() for st in stamps]
    assert times == sorted(times)
    assert host_before <= times[0] and times[-1] <= host_after


def test_a_stamp_read_before_its_stream_reached_it_is_refused(dev):
    gate = threading.Event()
    s = dev.stream("gpu")
    s.launch(held(gate), "held")
    st = s.stamp()
    with pytest.raises(DeviceError, match="before its stream reached it"):
        st.seconds()
    gate.set()
    s.synchronize(BOUND)
    assert st.seconds() > 0


# ---- memory, close ------------------------------------------------------------------------------------


def test_buffers_upload_and_memory(dev):
    assert isinstance(dev, Device) and dev.kind == "loopback" and dev.is_gpu is False
    assert dev.torch_device == torch.device("cpu") and "loopback" in dev.label and "GPU" in dev.label
    host = torch.arange(6, dtype=torch.bfloat16)
    up = dev.upload(host)
    assert torch.equal(up, host) and up.data_ptr() != host.data_ptr()
    assert dev.empty((2, 3), torch.float16).shape == (2, 3)
    assert dev.pinned_empty((4,), torch.int32).dtype == torch.int32
    assert dev.memory_bytes() >= 2**60  # unlimited by default
    with LoopbackDevice(memory_bytes=123) as small:
        assert small.memory_bytes() == 123
    assert DEFAULT_WAIT_S > 10


def test_close_stops_every_thread_and_later_use_is_refused():
    before = _loopback_threads()
    dev = LoopbackDevice()
    streams = [dev.stream(n) for n in ("gpu", "h2d", "d2h")]
    for s in streams:
        s.launch(lambda: None, "work")
    assert len(_loopback_threads() - before) == 3
    dev.close()
    assert _loopback_threads() - before == set()
    assert dev.closed
    with pytest.raises(DeviceError, match="closed"):
        dev.stream("another")
    for use in (lambda: streams[0].launch(lambda: None, "late"), lambda: streams[1].record(),
                lambda: streams[2].copy(torch.zeros(1), torch.zeros(1), "late copy"), lambda: streams[0].stamp()):
        with pytest.raises(DeviceError, match="closed"):
            use()


def test_a_context_manager_closes_the_device():
    before = _loopback_threads()
    with LoopbackDevice() as dev:
        dev.stream("gpu").launch(lambda: None, "work")
    assert dev.closed and _loopback_threads() - before == set()


def test_a_host_wait_on_a_device_that_closes_meanwhile_is_refused():
    dev = LoopbackDevice()
    gate = threading.Event()
    s = dev.stream("gpu")
    s.launch(held(gate), "held")
    ev = s.record()
    got: list[BaseException] = []

    def waiter() -> None:
        try:
            ev.wait(BOUND, "the waiter")
        except BaseException as e:  # noqa: BLE001 - handed to the test
            got.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    threading.Timer(1.0, gate.set).start()  # close() would otherwise wait for the held launch
    dev.close()
    t.join(BOUND)
    assert len(got) == 1 and isinstance(got[0], DeviceError) and "closed" in str(got[0])


def test_an_event_behind_work_that_close_dropped_does_not_report_success():
    dev = LoopbackDevice()
    gate = threading.Event()
    s = dev.stream("gpu")
    s.launch(held(gate), "held")
    ran: list[int] = []
    s.launch(lambda: ran.append(1), "dropped by close")
    ev = s.record()
    threading.Timer(0.2, gate.set).start()
    dev.close()
    assert ran == []
    with pytest.raises(DeviceError):
        ev.wait(1.0, "after close")


def test_close_with_a_launch_that_never_returns_says_which_stream():
    dev = LoopbackDevice()
    gate = threading.Event()
    dev.stream("d2h").launch(held(gate), "stuck")
    _until(lambda: dev.streams[0].current == "stuck", "the launch to start")
    with pytest.raises(DeviceError, match="d2h did not stop within 0.1 s"):
        dev.close(timeout_s=0.1)
    gate.set()
    dev.streams[0].thread.join(BOUND)
    assert not dev.streams[0].thread.is_alive()


# ---- open_device -------------------------------------------------------------------------------------


def test_open_device_loopback_passes_its_options():
    with open_device("loopback", memory_bytes=2**20, copy_gbps={"d2h": 2.0}) as dev:
        assert isinstance(dev, LoopbackDevice) and dev.memory_bytes() == 2**20 and dev.copy_gbps == {"d2h": 2.0}


@pytest.mark.parametrize("kind", ["bogus", "gpu", "CUDA", ""])
def test_open_device_refuses_unknown_kinds(kind):
    with pytest.raises(DeviceError, match="unknown device.*loopback.*cuda"):
        open_device(kind)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("kind", ["cuda", "cuda:1"])
def test_open_device_cuda_without_cuda_says_what_was_looked_for(kind):
    with pytest.raises(CudaUnavailableError) as info:
        open_device(kind)
    msg = str(info.value)
    assert "torch.cuda.is_available() is False" in msg and torch.__version__ in msg
    assert "CuPy" in msg and "--device loopback" in msg
