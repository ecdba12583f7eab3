"""The device interface of :mod:`offloadkit.runtime.devices` on a real NVIDIA GPU, through torch's CUDA API.

The hybrid executor (docs/DESIGN.md section 9) runs a step's task graph on four lanes; the ``gpu``,
``h2d`` and ``d2h`` lanes are CUDA streams here, so that copies over PCIe and kernels overlap each other
and the CPU lane, which is the whole point of the paper's schedule (section 2). What each part of the
interface is on a GPU:

- a :class:`~offloadkit.runtime.devices.Stream` is a ``torch.cuda.Stream`` of the device;
  ``launch(fn)`` calls ``fn`` *now*, on the calling thread, under ``torch.cuda.stream(s)``, so the
  kernels it issues (torch ops, cuBLAS, and the CuPy kernels of :mod:`offloadkit.kernels.cuda.ops`,
  whose ``stream=None`` means torch's current stream) are queued on ``s`` and the host goes on at once.
  An exception raised while queueing is re-raised as :class:`~offloadkit.errors.DeviceError` naming the
  label; the stream is then marked failed, as on the loopback device: later work on it is skipped and
  every event recorded on it reports the failure;
- ``copy(dst, src)`` is ``dst.copy_(src, non_blocking=True)`` on the stream (asynchronous when the host
  side is pinned; CUDA copies pageable memory synchronously through its own staging);
- an :class:`~offloadkit.runtime.devices.Event` is a ``torch.cuda.Event`` recorded on the stream;
  ``wait_event`` is ``Stream.wait_event`` (the device waits, the host does not); the host's
  ``Event.wait`` polls ``query()`` (a short spin, then sleeps of 50 us growing to 1 ms) up to its bound
  and raises :class:`~offloadkit.errors.DeviceTimeout` past it instead of hanging in
  ``cudaEventSynchronize``; a CUDA error surfacing there becomes a :class:`~offloadkit.errors.DeviceError`;
- a :class:`~offloadkit.runtime.devices.Stamp` is a timing event. Its time is converted to the host's
  ``time.perf_counter()`` clock through an *epoch pair* taken when the device is opened (and by
  :meth:`CudaDevice.resync`): a timing event recorded on an idle default stream, synchronized, and the
  ``perf_counter()`` read the moment it completed (best of a few tries). A stamp's time is then
  ``epoch_host + epoch_event.elapsed_time(stamp) / 1e3``, so a measured Timeline puts GPU tasks and
  CPU-lane tasks on one clock;
- device memory comes from torch's caching allocator; ``memory_bytes()`` is the free memory
  (``torch.cuda.mem_get_info``), within the cap ``memory_fraction`` sets
  (``torch.cuda.set_per_process_memory_fraction``): ``fraction * total - memory_reserved()``. The cap makes
  a big GPU behave as a moderate one (the model no longer fits whole), which is what a plan is for.

**The allocator rule.** Torch's caching allocator remembers the stream a block was allocated on and
gives a freed block to the next allocation *on that stream* at once, without waiting for other
streams. So every device tensor used on a stream other than the one it was allocated on must either
be recorded there (:meth:`CudaDevice.use_on`, i.e. ``Tensor.record_stream``; ``copy`` does this for
its own device-side operands, and the CuPy backend for every kernel argument) or be kept alive by the
caller until the step's closing synchronisation. Otherwise a buffer dropped on the host while another
stream still reads or writes it can be handed to new work under that stream's feet: the race
``tests/test_cuda_streams.py`` shows. Page-locked host buffers used by asynchronous copies are covered
by torch's pinned-memory allocator, which records the copy's stream itself.

Without CUDA, opening a device is refused with :class:`~offloadkit.errors.CudaUnavailableError` saying
what was looked for (torch's build and ``torch.cuda.is_available()``, and CuPy's status); the loopback
device (``--device loopback``) runs the same executor on CPU threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from offloadkit.errors import CudaUnavailableError, DeviceError, DeviceTimeout
from offloadkit.runtime.devices import DEFAULT_WAIT_S, Device, Event, Stamp, Stream

GIB = 2**30
#: ``Event.wait`` first spins (no sleep) this long: a kernel that is about to end is seen at once.
SPIN_S = 200e-6
#: then sleeps, starting here and doubling up to ``MAX_SLEEP_S``
MIN_SLEEP_S = 50e-6
MAX_SLEEP_S = 1e-3
#: tries of the epoch pair (the one with the shortest host round trip is kept)
EPOCH_TRIES = 5


def cuda_unavailable_reason(index: int = 0) -> str | None:
    """Why a CUDA device ``index`` cannot be opened here (``None`` if it can): what torch reports, and CuPy's
    status (the kernels of :mod:`offloadkit.kernels.cuda.ops` need CuPy)."""
    from offloadkit.kernels.cuda.loader import cupy_status

    build = (f"torch built for CUDA {torch.version.cuda}" if torch.version.cuda
             else "torch built without CUDA")
    cupy_ok, cupy_why = cupy_status()
    try:
        available = bool(torch.cuda.is_available())
        count = int(torch.cuda.device_count()) if available else 0
    except Exception as e:  # a broken driver install
        available, count, build = False, 0, f"{build}; torch.cuda raised {type(e).__name__}: {e}"
    if not available:
        return (f"torch {torch.__version__} reports no CUDA device (torch.cuda.is_available() is False; {build}), "
                f"CuPy: {cupy_why}")
    if not 0 <= index < count:
        return (f"torch {torch.__version__} sees {count} CUDA device(s), so there is no device {index} "
                f"(torch.cuda.device_count() is {count}; {build}), CuPy: {cupy_why}")
    if not cupy_ok:
        return (f"torch {torch.__version__} sees {count} CUDA device(s) ({build}), but the GPU lane's kernels "
                f"need CuPy: {cupy_why}")
    return None


def _device_error(what: str, e: BaseException) -> DeviceError:
    err = e if isinstance(e, DeviceError) else DeviceError(f"{what}: {type(e).__name__}: {e}")
    if err is not e:
        err.__cause__ = e
    return err


class _CudaStamp(Stamp):
    __slots__ = ("event", "epoch", "stream")

    def __init__(self, event: Any, epoch: tuple[float, Any], stream: _CudaStream) -> None:
        self.event, self.epoch, self.stream = event, epoch, stream

    def seconds(self) -> float:
        try:
            reached = self.event.query()
        except RuntimeError as e:
            raise _device_error(f"a timestamp on stream {self.stream.name}", e) from e
        if not reached:
            raise DeviceError(f"a timestamp on stream {self.stream.name} was read before the stream reached it")
        host, event = self.epoch
        try:
            return host + event.elapsed_time(self.event) / 1e3
        except RuntimeError as e:
            raise _device_error(f"a timestamp on stream {self.stream.name}", e) from e


class _CudaEvent(Event):
    __slots__ = ("inner", "stream", "after", "error")

    def __init__(self, inner: Any, stream: _CudaStream, after: str | None, error: DeviceError | None) -> None:
        #: the ``torch.cuda.Event`` (None when the stream had failed: nothing was recorded)
        self.inner = inner
        self.stream = stream
        #: the label of the last work queued before it (names what a timed-out wait was stuck behind)
        self.after = after
        self.error = error

    def query(self) -> bool:
        if self.error is not None:
            raise self.error
        try:
            return bool(self.inner.query())
        except RuntimeError as e:  # an asynchronous CUDA error of the work before it
            raise _device_error(f"the work on stream {self.stream.name} up to {self.after or 'this event'} "
                                "failed on the GPU", e) from e

    def wait(self, timeout_s: float, what: str = "") -> None:
        start = time.perf_counter()
        deadline = start + timeout_s
        sleep = MIN_SLEEP_S
        while not self.query():
            if self.stream.device.closed:
                raise DeviceError(f"{what or 'a wait'}: the CUDA device was closed while waiting on stream "
                                  f"{self.stream.name}")
            now = time.perf_counter()
            if now >= deadline:
                raise DeviceTimeout(f"{what or 'a wait'} waited {timeout_s:g} s for stream {self.stream.name} "
                                    f"(behind {self.after or 'its queue'}) and gave up")
            if now - start >= SPIN_S:
                time.sleep(min(sleep, max(deadline - now, 0.0)))
                sleep = min(2 * sleep, MAX_SLEEP_S)


class _CudaStream(Stream):
    """A ``torch.cuda.Stream``; see the module docstring."""

    def __init__(self, device: CudaDevice, name: str, inner: Any = None) -> None:
        self.device, self.name = device, name
        self.inner = inner if inner is not None else torch.cuda.Stream(device=device.torch_device)
        self.error: DeviceError | None = None
        self.last: str | None = None  # the label of the last work queued

    def _check(self, label: str) -> bool:
        """Whether to queue ``label``: False on a failed stream (skipped, as on the loopback device)."""
        if self.device.closed:
            raise DeviceError(f"{label}: the CUDA device is closed")
        return self.error is None

    def _run(self, fn: Callable[[], Any], label: str) -> None:
        if not self._check(label):
            return
        self.last = label
        try:
            with torch.cuda.stream(self.inner):
                fn()
        except Exception as e:
            self.error = _device_error(f"{label} failed on stream {self.name}", e)
            if self.error is not e:
                self.error.label = label  # type: ignore[attr-defined]  # the work that failed, for the executor
            if self.error is e:
                raise
            raise self.error from e

    # -- the interface --
    def launch(self, fn: Callable[[], Any], label: str) -> None:
        self._run(fn, label)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, label: str) -> None:
        if dst.shape != src.shape or dst.dtype != src.dtype:
            raise DeviceError(f"{label}: a copy needs the same shape and dtype, got {tuple(src.shape)} "
                              f"{src.dtype} -> {tuple(dst.shape)} {dst.dtype}")

        self._run(lambda: self.device.transfer(dst, src), label)

    def record(self) -> Event:
        if not self._check("an event"):  # a failed stream: the event reports the failure
            return _CudaEvent(None, self, self.last, self.error)
        try:
            ev = torch.cuda.Event()
            ev.record(self.inner)
        except RuntimeError as e:
            raise _device_error(f"recording an event on stream {self.name}", e) from e
        return _CudaEvent(ev, self, self.last, None)

    def wait_event(self, event: Event) -> None:
        if not isinstance(event, _CudaEvent):
            raise DeviceError(f"stream {self.name} can only wait for events of a CUDA device, "
                              f"not {type(event).__name__}")
        label = f"a wait for stream {event.stream.name}"
        if not self._check(label):
            return
        if event.error is not None:  # waiting for failed work fails this stream too (as on the loopback)
            self.error = DeviceError(f"{label} on stream {self.name}: {event.error}")
            return
        self.last = label
        try:
            self.inner.wait_event(event.inner)
        except RuntimeError as e:
            raise _device_error(f"{label} on stream {self.name}", e) from e

    def stamp(self) -> Stamp:
        if self.device.closed:
            raise DeviceError("stamp: the CUDA device is closed")
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.inner)
        return _CudaStamp(ev, self.device.epoch, self)


class CudaDevice(Device):
    """One CUDA GPU through torch; see the module docstring.

    ``memory_fraction`` (0 < f <= 1): cap this process's device memory at that fraction of the total
    (a "moderate GPU" on a big one). ``wait_s``: the default bound of host waits (``close``, ``synchronize``).
    """

    kind = "cuda"
    is_gpu = True

    def __init__(self, index: int = 0, *, memory_fraction: float | None = None,
                 wait_s: float = DEFAULT_WAIT_S) -> None:
        why = cuda_unavailable_reason(index)
        if why is not None:
            raise CudaUnavailableError(f"--device cuda needs a CUDA GPU: {why}; use --device loopback "
                                       "(CPU threads standing in for a GPU)")
        from offloadkit.kernels.cuda import ops

        if memory_fraction is not None and not 0.0 < memory_fraction <= 1.0:
            raise DeviceError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
        self.index = index
        self.torch_device = torch.device("cuda", index)
        self.ops = ops
        self.wait_s = wait_s
        self.memory_fraction = memory_fraction
        self.closed = False
        self.streams: list[_CudaStream] = []
        self.total_bytes = int(torch.cuda.mem_get_info(index)[1])
        name = torch.cuda.get_device_name(index)
        if memory_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(memory_fraction, index)
            name += (f" (memory capped at {memory_fraction * self.total_bytes / GIB:.1f} of "
                     f"{self.total_bytes / GIB:.1f} GiB)")
        self.label = name
        self.epoch: tuple[float, Any] = (0.0, None)
        self.resync()

    # -- clocks --
    def resync(self) -> None:
        """Take the epoch pair that converts stamps to ``perf_counter`` seconds (module docstring): a timing
        event on the idle default stream and the host's clock the moment it is seen complete."""
        with torch.cuda.device(self.index):
            torch.cuda.synchronize(self.index)
            best: tuple[float, float, Any] | None = None
            for _ in range(EPOCH_TRIES):
                ev = torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                ev.record(torch.cuda.default_stream(self.index))
                ev.synchronize()
                t1 = time.perf_counter()
                if best is None or t1 - t0 < best[0]:
                    best = (t1 - t0, t1, ev)
        assert best is not None
        self.epoch = (best[1], best[2])

    # -- the interface --
    def stream(self, name: str) -> Stream:
        if self.closed:
            raise DeviceError("the CUDA device is closed")
        s = _CudaStream(self, name)
        self.streams.append(s)
        return s

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Device memory, allocated on the caller's current stream (see the allocator rule)."""
        return torch.empty(shape, dtype=dtype, device=self.torch_device)

    def pinned_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def transfer(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst.copy_(src, non_blocking=True)`` on the current stream (inside a launch: the launch's stream);
        each device-side operand is recorded on that stream first (the allocator rule, module docstring)."""
        stream = torch.cuda.current_stream(self.torch_device)
        for t in (dst, src):
            if t.is_cuda:
                t.record_stream(stream)
        dst.copy_(src, non_blocking=True)

    def memory_bytes(self) -> int:
        free, total = torch.cuda.mem_get_info(self.index)
        if self.memory_fraction is None:
            return int(free)
        cap = int(self.memory_fraction * total) - int(torch.cuda.memory_reserved(self.index))
        return max(0, min(int(free), cap))

    def use_on(self, tensor: torch.Tensor, stream: Stream) -> None:
        if tensor.is_cuda:
            tensor.record_stream(stream.inner)  # type: ignore[attr-defined]

    def synchronize(self, timeout_s: float | None = None, what: str = "the CUDA device") -> None:
        """Wait (bounded) until every stream of the device, and the default stream, has run its queue."""
        bound = self.wait_s if timeout_s is None else timeout_s
        deadline = time.perf_counter() + bound
        default = _CudaStream(self, "default", torch.cuda.default_stream(self.index))
        events = [s.record() for s in [*self.streams, default] if s.error is None]
        for ev in events:
            try:
                ev.wait(max(deadline - time.perf_counter(), 0.0), what)
            except DeviceTimeout:  # say the whole bound, not what was left of it for this stream
                raise DeviceTimeout(f"{what} waited {bound:g} s for stream {ev.stream.name} "
                                    f"(behind {ev.after or 'its queue'}) and gave up") from None

    def close(self, timeout_s: float | None = None) -> None:
        """Wait (bounded) for the queued work, then release the streams and torch's cached blocks and lift
        the memory cap; further use is an error. (A stream that failed said so when it failed.)"""
        if self.closed:
            return
        try:
            self.synchronize(timeout_s, "closing the CUDA device")
        finally:
            self.closed = True
            self.streams.clear()
            torch.cuda.empty_cache()
            if self.memory_fraction is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, self.index)


__all__ = ["CudaDevice", "cuda_unavailable_reason"]
