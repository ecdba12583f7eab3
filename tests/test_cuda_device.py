"""The CUDA device (offloadkit/runtime/cuda_device.py): on a GPU for real, and its logic on the CPU.

- *On a GPU* (``@pytest.mark.gpu``; skipped with the reason where there is none): a stream runs in
  order; a consumer stream that waits for an event of a producer held busy by a long kernel
  (``torch.cuda._sleep``) reads what the producer wrote, and without the wait reads the old value; a host
  wait past its bound raises ``DeviceTimeout``; a pinned round trip; stamps increase and sit on the host's
  ``perf_counter`` clock within a few ms; the memory cap; the CuPy kernels run on the launch's stream.
- *On the CPU*: the refusal without CUDA says what was looked for; and the device's bookkeeping (stream
  context, failure propagation, bounded waits, the stamp clock, the memory cap's arithmetic, close) against
  a stand-in for ``torch.cuda`` that records what the device asked of it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time

import pytest
import torch

from offloadkit.errors import CudaUnavailableError, DeviceError, DeviceTimeout
from offloadkit.kernels.cuda import loader, twins
from offloadkit.runtime import cuda_device
from offloadkit.runtime.cuda_device import CudaDevice, cuda_unavailable_reason
from offloadkit.runtime.device_open import open_device

BOUND = 30.0
_WHY = cuda_unavailable_reason()
needs_gpu = pytest.mark.skipif(_WHY is not None, reason=f"GPU tests: {_WHY}")


@functools.cache
def _cycles_per_second() -> float:
    """How fast ``torch.cuda._sleep`` spins here, timed once with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)  # loaded before it is timed
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return 20_000_000 / (start.elapsed_time(end) / 1e3)


def spin_cycles(seconds: float) -> int:
    """Cycles of ``torch.cuda._sleep`` that take about ``seconds``."""
    return int(seconds * _cycles_per_second())


def fail(exc: BaseException):
    def run() -> None:
        raise exc
    return run


# ---- on a GPU -------------------------------------------------------------------------------------------


@pytest.fixture
def cuda():
    dev = CudaDevice()
    yield dev
    dev.close()


@pytest.mark.gpu
@needs_gpu
def test_a_stream_runs_its_work_in_order(cuda):
    s = cuda.stream("gpu")
    x = cuda.empty((1 << 20,), torch.float32)
    s.launch(lambda: x.fill_(1.0), "fill")
    for i in range(50):
        s.launch(lambda: x.mul_(2.0), f"double {i}")
        s.launch(lambda: x.sub_(1.0), f"minus one {i}")  # 1 -> 1 at every step, only in this order
    s.launch(lambda: x.add_(4.0), "add four")
    host = cuda.pinned_empty((1 << 20,), torch.float32)
    s.copy(host, x, "to the host")
    s.record().wait(BOUND, "the test")
    assert bool((host == 5.0).all())


@pytest.mark.gpu
@needs_gpu
def test_wait_event_holds_the_consumer_behind_a_long_kernel(cuda):
    producer, consumer = cuda.stream("gpu"), cuda.stream("d2h")
    n = 1 << 16
    t = torch.zeros(n, device=cuda.torch_device)
    seen = torch.full((n,), -1.0, device=cuda.torch_device)
    torch.cuda.synchronize()  # the zeros and the -1 fill (default stream) are done before either stream starts

    def produce() -> None:
        torch.cuda._sleep(spin_cycles(0.2))
        t.fill_(1.0)

    producer.launch(produce, "slow producer")
    produced = producer.stamp()
    consumer.wait_event(producer.record())
    started = consumer.stamp()
    consumer.launch(lambda: seen.copy_(t), "consumer reads")
    consumer.record().wait(BOUND, "the consumer")
    assert bool((seen == 1.0).all()), "the consumer read before the producer wrote"
    assert started.seconds() >= produced.seconds() - 1e-4


@pytest.mark.gpu
@needs_gpu
def test_without_the_wait_the_consumer_reads_the_old_value(cuda):
    producer, consumer = cuda.stream("gpu"), cuda.stream("d2h")
    n = 1 << 16
    t = torch.zeros(n, device=cuda.torch_device)
    seen = torch.full((n,), -1.0, device=cuda.torch_device)
    torch.cuda.synchronize()

    def produce() -> None:
        torch.cuda._sleep(spin_cycles(0.5))
        t.fill_(1.0)

    producer.launch(produce, "slow producer")
    consumer.launch(lambda: seen.copy_(t), "consumer reads, not told to wait")
    consumer.record().wait(BOUND, "the consumer")
    assert not producer.record().query()  # the producer is still spinning
    assert bool((seen == 0.0).all())
    producer.synchronize(BOUND)


@pytest.mark.gpu
@needs_gpu
def test_a_host_wait_past_its_bound_raises_device_timeout(cuda):
    s = cuda.stream("h2d")
    s.launch(lambda: torch.cuda._sleep(spin_cycles(1.0)), "a stalled copy")
    ev = s.record()
    t0 = time.perf_counter()
    with pytest.raises(DeviceTimeout, match=r"the test waited 0.05 s for stream h2d \(behind a stalled copy\)"):
        ev.wait(0.05, "the test")
    assert 0.05 <= time.perf_counter() - t0 < 0.5
    ev.wait(BOUND, "the test, with time enough")


@pytest.mark.gpu
@needs_gpu
def test_a_pinned_round_trip_over_two_streams(cuda):
    h2d, d2h = cuda.stream("h2d"), cuda.stream("d2h")
    src = cuda.pinned_empty((3, 1000), torch.bfloat16)
    assert src.is_pinned()
    src.copy_(torch.randn(3, 1000))
    dev = cuda.empty((3, 1000), torch.bfloat16)
    back = cuda.pinned_empty((3, 1000), torch.bfloat16)
    h2d.copy(dev, src, "up")
    d2h.wait_event(h2d.record())
    d2h.copy(back, dev, "down")
    d2h.record().wait(BOUND, "the round trip")
    assert torch.equal(back, src)
    with pytest.raises(DeviceError, match="same shape and dtype"):
        h2d.copy(dev, src.float(), "wrong dtype")


@pytest.mark.gpu
@needs_gpu
def test_stamps_increase_and_sit_on_the_host_clock(cuda):
    s = cuda.stream("gpu")
    for _ in range(3):
        s.synchronize(BOUND)
        host = time.perf_counter()
        first = s.stamp()  # an idle stream reaches it at once
        s.launch(lambda: torch.cuda._sleep(spin_cycles(0.02)), "spin")
        second = s.stamp()
        with pytest.raises(DeviceError, match="before the stream reached it"):
            second.seconds()
        s.synchronize(BOUND)
        after = time.perf_counter()
        assert abs(first.seconds() - host) < 0.003
        assert first.seconds() < second.seconds() <= after + 0.003
        assert second.seconds() - first.seconds() > 0.005
        cuda.resync()  # stamps taken after a resync sit on the clock too


@pytest.mark.gpu
@needs_gpu
def test_the_memory_cap():
    torch.cuda.empty_cache()  # what earlier tests left in torch's cache would count against the cap
    total = torch.cuda.mem_get_info(0)[1]
    fraction = 2 * 2**30 / total
    with CudaDevice(memory_fraction=fraction) as dev:
        assert "capped at 2.0 of" in dev.label
        assert 0 < dev.memory_bytes() <= 2 * 2**30
        small = dev.empty((2**28,), torch.uint8)  # 256 MiB: the free share drops by it
        assert dev.memory_bytes() <= 2 * 2**30 - 2**28
        with pytest.raises(torch.OutOfMemoryError):
            dev.empty((3 * 2**30,), torch.uint8)
        del small
    big = torch.empty(3 * 2**30, dtype=torch.uint8, device="cuda")  # the cap is lifted on close
    del big
    torch.cuda.empty_cache()


@pytest.mark.gpu
@needs_gpu
def test_a_failed_launch_is_reported_and_the_stream_stays_failed(cuda):
    s = cuda.stream("gpu")
    with pytest.raises(DeviceError, match="layer 4 router failed on stream gpu: ValueError: bad routing"):
        s.launch(fail(ValueError("bad routing")), "layer 4 router")
    ran = []
    s.launch(lambda: ran.append(1), "skipped")
    assert ran == []
    with pytest.raises(DeviceError, match="layer 4 router"):
        s.record().wait(BOUND, "the test")


@pytest.mark.gpu
@needs_gpu
def test_the_kernels_run_on_the_launch_stream(cuda):
    s = cuda.stream("gpu")
    x_host, w_host = torch.randn(5, 256), torch.rand(256) + 0.5
    x, w = cuda.upload(x_host), cuda.upload(w_host)
    box = {}

    def run() -> None:
        assert torch.cuda.current_stream() == s.inner
        box["y"] = cuda.ops.rms_norm(x, w, 1e-5)

    s.launch(run, "rms_norm")
    s.synchronize(BOUND)
    torch.testing.assert_close(box["y"].cpu(), twins.rms_norm(x_host, w_host, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_gpu
def test_close_is_final():
    dev = CudaDevice()
    s = dev.stream("gpu")
    s.launch(lambda: torch.cuda._sleep(spin_cycles(0.05)), "spin")
    dev.close()
    assert dev.closed
    with pytest.raises(DeviceError, match="closed"):
        dev.stream("another")
    with pytest.raises(DeviceError, match="closed"):
        s.launch(lambda: None, "late")


# ---- without CUDA: the refusal ---------------------------------------------------------------------------


def test_without_cuda_the_refusal_says_what_was_looked_for(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loader, "cupy_status", lambda: (False, "CuPy is not installed: pip install cupy-cuda12x"))
    for make in (CudaDevice, lambda: open_device("cuda"), lambda: open_device("cuda:2")):
        with pytest.raises(CudaUnavailableError) as info:
            make()
        msg = str(info.value)
        assert msg.startswith("--device cuda needs a CUDA GPU: ")
        assert f"torch {torch.__version__} reports no CUDA device" in msg
        assert "torch.cuda.is_available() is False" in msg
        assert ("torch built without CUDA" in msg) == (torch.version.cuda is None)
        assert "CuPy: CuPy is not installed: pip install cupy-cuda12x" in msg and msg.endswith(
            "use --device loopback (CPU threads standing in for a GPU)")


def test_a_cuda_build_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(loader, "cupy_status", lambda: (True, "CuPy 13 on 0 CUDA device(s)"))
    assert "torch built for CUDA 12.8" in cuda_unavailable_reason()


def test_a_missing_device_index_or_missing_cupy_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(loader, "cupy_status", lambda: (False, "CuPy is not installed"))
    assert "no device 3 (torch.cuda.device_count() is 2" in cuda_unavailable_reason(3)
    assert "the GPU lane's kernels need CuPy: CuPy is not installed" in cuda_unavailable_reason(1)
    with pytest.raises(CudaUnavailableError, match="need CuPy"):
        CudaDevice(1)


def test_a_broken_driver_is_a_refusal_not_a_crash(monkeypatch):
    def broken() -> bool:
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    assert "torch.cuda raised RuntimeError: CUDA driver initialization failed" in cuda_unavailable_reason()


# ---- on the CPU: the device's bookkeeping against a stand-in for torch.cuda --------------------------------


class FakeCuda:
    """What the device asks of ``torch.cuda``, recorded; a device clock the test moves by hand."""

    GIB = 2**30

    def __init__(self) -> None:
        self.clock = 1000.0  # device seconds
        self.current = None
        self.free, self.total, self.reserved = 70 * self.GIB, 80 * self.GIB, 5 * self.GIB
        self.fractions: list[tuple[float, int]] = []
        self.calls: list[str] = []
        self.default = FakeStream(self, "default")

    @contextlib.contextmanager
    def stream(self, s):
        before, self.current = self.current, s
        try:
            yield
        finally:
            self.current = before


class FakeStream:
    def __init__(self, fake: FakeCuda, name: str = "side") -> None:
        self.fake, self.name = fake, name
        self.waited: list[FakeEvent] = []

    def wait_event(self, ev: FakeEvent) -> None:
        self.waited.append(ev)


class FakeEvent:
    def __init__(self, fake: FakeCuda, enable_timing: bool = False) -> None:
        self.fake, self.timing = fake, enable_timing
        self.t: float | None = None
        self.stream = None
        self.done = True  # set False to keep it pending
        self.error: str | None = None

    def record(self, stream=None) -> None:
        self.stream, self.t = stream, self.fake.clock

    def query(self) -> bool:
        if self.error:
            raise RuntimeError(self.error)
        return self.done

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.timing and end.timing, "elapsed_time needs timing events"
        return (end.t - self.t) * 1e3


@pytest.fixture
def fake(monkeypatch) -> FakeCuda:
    f = FakeCuda()
    cu = torch.cuda
    monkeypatch.setattr(cu, "is_available", lambda: True)
    monkeypatch.setattr(cu, "device_count", lambda: 1)
    monkeypatch.setattr(cu, "get_device_name", lambda i=0: "Fake GPU 80GB")
    monkeypatch.setattr(cu, "mem_get_info", lambda i=0: (f.free, f.total))
    monkeypatch.setattr(cu, "memory_reserved", lambda i=0: f.reserved)
    monkeypatch.setattr(cu, "set_per_process_memory_fraction", lambda fr, i=0: f.fractions.append((fr, i)))
    monkeypatch.setattr(cu, "synchronize", lambda i=None: f.calls.append("synchronize"))
    monkeypatch.setattr(cu, "empty_cache", lambda: f.calls.append("empty_cache"))
    monkeypatch.setattr(cu, "default_stream", lambda i=None: f.default)
    monkeypatch.setattr(cu, "current_stream", lambda d=None: f.current or f.default)
    monkeypatch.setattr(cu, "stream", f.stream)
    monkeypatch.setattr(cu, "device", lambda i: contextlib.nullcontext())
    monkeypatch.setattr(cu, "Stream", lambda device=None: FakeStream(f))
    monkeypatch.setattr(cu, "Event", lambda enable_timing=False: FakeEvent(f, enable_timing))
    monkeypatch.setattr(loader, "cupy_status", lambda: (True, "fake CuPy"))
    return f


def test_fake_launch_runs_at_once_under_the_stream(fake):
    dev = CudaDevice()
    assert dev.kind == "cuda" and dev.is_gpu and dev.label == "Fake GPU 80GB"
    assert dev.torch_device == torch.device("cuda", 0)
    from offloadkit.kernels.cuda import ops

    assert dev.ops is ops
    s = dev.stream("gpu")
    seen = []
    s.launch(lambda: seen.append(fake.current), "look")
    assert seen == [s.inner] and fake.current is None  # ran before launch returned, under the stream only
    dst, src = torch.zeros(4), torch.arange(4.0)
    s.copy(dst, src, "copy")
    assert torch.equal(dst, src)
    with pytest.raises(DeviceError, match=r"same shape and dtype, got \(4,\) torch.float32 -> \(5,\)"):
        s.copy(torch.zeros(5), src, "bad")


def test_fake_a_failed_launch_fails_the_stream_and_its_waiters(fake):
    dev = CudaDevice()
    a, b = dev.stream("a"), dev.stream("b")
    before = a.record()
    with pytest.raises(DeviceError) as info:
        a.launch(lambda: 1 / 0, "layer 1 attention")
    assert "layer 1 attention failed on stream a: ZeroDivisionError" in str(info.value)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    before.wait(1.0)  # what came before is fine
    ran = []
    a.launch(lambda: ran.append(1), "skipped")
    a.copy(torch.zeros(1), torch.ones(1), "skipped copy")
    assert ran == []
    failed = a.record()
    with pytest.raises(DeviceError, match="layer 1 attention"):
        failed.wait(1.0, "the step's end")
    b.wait_event(failed)  # waiting for failed work fails the waiter too
    b.launch(lambda: ran.append(2), "skipped on b")
    assert ran == []
    with pytest.raises(DeviceError, match="a wait for stream a on stream b.*layer 1 attention"):
        b.record().query()


def test_fake_wait_event_is_queued_on_the_device(fake):
    dev = CudaDevice()
    a, b = dev.stream("a"), dev.stream("b")
    ev = a.record()
    b.wait_event(ev)
    assert b.inner.waited == [ev.inner]
    with pytest.raises(DeviceError, match="only wait for events of a CUDA device"):
        b.wait_event(object())


def test_fake_host_waits_are_bounded_and_cuda_errors_become_device_errors(fake):
    dev = CudaDevice()
    s = dev.stream("h2d")
    s.launch(lambda: None, "layer 2 expert 7 copy")
    ev = s.record()
    ev.inner.done = False
    t0 = time.perf_counter()
    with pytest.raises(DeviceTimeout, match=r"the step's end waited 0.05 s for stream h2d "
                                            r"\(behind layer 2 expert 7 copy\) and gave up"):
        ev.wait(0.05, "the step's end")
    assert time.perf_counter() - t0 >= 0.05
    ev.inner.error = "CUDA error: an illegal memory access was encountered"
    with pytest.raises(DeviceError, match="up to layer 2 expert 7 copy failed on the GPU.*illegal memory access"):
        ev.wait(1.0)


def test_fake_a_wait_that_gets_done_returns_promptly(fake):
    dev = CudaDevice()
    ev = dev.stream("gpu").record()
    ev.inner.done = False
    threading.Timer(0.05, lambda: setattr(ev.inner, "done", True)).start()
    t0 = time.perf_counter()
    ev.wait(5.0)
    assert time.perf_counter() - t0 < 1.0


def test_fake_stamps_are_on_the_host_clock(fake, monkeypatch):
    host = iter([10.0, 10.5, 20.0, 20.001, 30.0, 30.2, 40.0, 40.3, 50.0, 50.1])
    with monkeypatch.context() as m:  # the host clock of the five epoch tries, only while the device opens
        m.setattr(time, "perf_counter", lambda: next(host))
        dev = CudaDevice()  # the shortest round trip (20.0 -> 20.001) wins
    assert cuda_device.EPOCH_TRIES == 5
    host_epoch, ev = dev.epoch
    assert host_epoch == 20.001 and ev.t == fake.clock
    s = dev.stream("gpu")
    fake.clock += 0.25
    st = s.stamp()
    assert st.seconds() == pytest.approx(20.001 + 0.25)
    st.event.done = False
    with pytest.raises(DeviceError, match="read before the stream reached it"):
        st.seconds()


def test_fake_memory_cap(fake):
    dev = CudaDevice()
    assert dev.memory_bytes() == 70 * fake.GIB and fake.fractions == []
    capped = CudaDevice(memory_fraction=0.25)
    assert fake.fractions == [(0.25, 0)]
    assert capped.label == "Fake GPU 80GB (memory capped at 20.0 of 80.0 GiB)"
    assert capped.memory_bytes() == 15 * fake.GIB  # 20 GiB cap - 5 GiB torch has reserved
    fake.reserved = 25 * fake.GIB
    assert capped.memory_bytes() == 0
    capped.close()
    assert fake.fractions[-1] == (1.0, 0) and "empty_cache" in fake.calls
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(DeviceError, match="memory_fraction must be in"):
            CudaDevice(memory_fraction=bad)


def test_fake_use_on_records_device_tensors_only(fake):
    dev = CudaDevice()
    s = dev.stream("d2h")
    recorded = []

    class LooksCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

        def record_stream(self, stream):
            recorded.append(stream)

    t = torch.Tensor._make_subclass(LooksCuda, torch.zeros(2))
    dev.use_on(t, s)
    dev.use_on(torch.zeros(2), s)  # host memory: nothing to record
    assert recorded == [s.inner]
    with fake.stream(s.inner):  # transfer records its device-side operands on the current stream
        dev.transfer(torch.zeros(2), t)
    assert recorded == [s.inner, s.inner]


def test_fake_close_waits_bounded_then_refuses_further_use(fake):
    dev = CudaDevice()
    s = dev.stream("gpu")
    dev.close()
    assert dev.closed
    for use in (lambda: dev.stream("x"), lambda: s.launch(lambda: None, "late"), lambda: s.record(),
                lambda: s.stamp(), lambda: s.copy(torch.zeros(1), torch.zeros(1), "late copy")):
        with pytest.raises(DeviceError, match="closed"):
            use()
    dev.close()  # idempotent


def test_fake_close_of_a_stuck_stream_times_out_and_still_closes(fake, monkeypatch):
    dev = CudaDevice()
    s = dev.stream("gpu")
    s.launch(lambda: None, "a kernel that never ends")
    real_event = torch.cuda.Event

    def stuck(enable_timing=False):
        ev = real_event(enable_timing)
        ev.done = False
        return ev

    monkeypatch.setattr(torch.cuda, "Event", stuck)
    with pytest.raises(DeviceTimeout, match="closing the CUDA device waited 0.05 s for stream gpu"):
        dev.close(timeout_s=0.05)
    assert dev.closed and fake.calls.count("empty_cache") == 1
