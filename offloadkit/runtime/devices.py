"""The device interface the hybrid executor runs on, and the CPU stand-in that makes it testable without a GPU.

The hybrid executor (docs/DESIGN.md section 9) needs from a GPU what CUDA gives: **streams** (queues of
work that run in order, concurrently with other streams), **events** (recorded on a stream; another
stream can wait for one without the host blocking, and the host can wait for one with a bound),
device buffers, page-locked host buffers, asynchronous copies, kernel launches and timestamps. This
module says that in one small interface (:class:`Device`, :class:`Stream`, :class:`Event`) with two
implementations:

- :class:`~offloadkit.runtime.cuda_device.CudaDevice`: torch CUDA streams and events, ``pin_memory``,
  ``copy_(non_blocking=True)``, the CuPy kernels of ``kernels/*.cu`` (:mod:`offloadkit.kernels.cuda.ops`)
  on torch's streams; timestamps from CUDA events.
- :class:`LoopbackDevice` (here): the same semantics on the CPU. Each stream is one worker thread
  running its queue in order; an event is a thread event set when the stream's thread reaches it;
  copies are memory copies (optionally slowed to a profile's PCIe bandwidth, for demonstrations);
  kernels are their CPU twins (:mod:`offloadkit.kernels.cuda.twins`); timestamps are
  ``perf_counter_ns``. Ordering bugs (a missing event wait, a staging buffer reused too early) break
  the results here exactly as they would on a GPU, so the tests find them on a laptop. Its timings
  are those of CPU threads and are never reported as GPU figures (:attr:`Device.is_gpu` is False).

What ``launch`` means differs in one way, as it does in CUDA: on a :class:`CudaDevice` the function
runs at once on the calling thread and *queues* kernels on the stream; on the loopback device it runs
later, on the stream's thread. A launched function may therefore only rely on the stream's order
(and the events it was told to wait for), never on when the host called ``launch`` — which is the rule
for real CUDA code too.

Faults: a function that raises on a stream marks the stream failed with the label it was launched
under; everything queued behind it is skipped and every event recorded behind it reports the failure
(:class:`~offloadkit.errors.DeviceError` naming the label) instead of hanging. Every host-side wait takes
a bound and raises :class:`~offloadkit.errors.DeviceTimeout` past it. :meth:`Device.close` stops the
threads (a copy slowed down or stalled on purpose wakes up at once).
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from offloadkit.errors import DeviceError, DeviceTimeout

#: The default bound of every wait (seconds): long enough for a real prefill step, short enough that a
#: stuck run says so instead of hanging.
DEFAULT_WAIT_S = 120.0


class Stamp(ABC):
    """A timestamp recorded on a stream: when the stream reached it."""

    @abstractmethod
    def seconds(self) -> float:
        """The time it was reached, in ``time.perf_counter()`` seconds (the host's clock), once reached."""


class Event(ABC):
    """Recorded on a stream; done when the stream has run everything queued before it."""

    @abstractmethod
    def query(self) -> bool:
        """Whether the work before it is done; raises :class:`DeviceError` if that work failed."""

    @abstractmethod
    def wait(self, timeout_s: float, what: str = "") -> None:
        """Block the host until done; :class:`DeviceTimeout` after ``timeout_s``, :class:`DeviceError` if the
        work before it failed (``what`` names the waiter in the message)."""


class Stream(ABC):
    """A queue of device work that runs in order."""

    name: str

    @abstractmethod
    def launch(self, fn: Callable[[], Any], label: str) -> None:
        """Queue ``fn`` (kernels, torch ops on device tensors) on this stream; ``label`` names it in errors."""

    @abstractmethod
    def copy(self, dst: torch.Tensor, src: torch.Tensor, label: str) -> None:
        """Queue the copy ``dst[...] = src`` (same shape and dtype; either side may be host or device)."""

    @abstractmethod
    def record(self) -> Event:
        """An event done when everything queued so far on this stream is done."""

    @abstractmethod
    def wait_event(self, event: Event) -> None:
        """Make work queued after this call wait for ``event`` (the host does not block)."""

    @abstractmethod
    def stamp(self) -> Stamp:
        """A timestamp taken when the stream reaches this point."""

    def synchronize(self, timeout_s: float = DEFAULT_WAIT_S) -> None:
        self.record().wait(timeout_s, f"stream {self.name}")


class Device(ABC):
    """One accelerator as the executor sees it; see the module docstring."""

    #: ``"cuda"`` or ``"loopback"``
    kind: str
    #: what the device is, for labels (a GPU's name, or the loopback device's description)
    label: str
    #: whether the times measured on its streams are a GPU's (never true of the loopback device)
    is_gpu: bool
    #: the kernels: :mod:`offloadkit.kernels.cuda.ops` (CUDA) or their twins (loopback), same signatures
    ops: Any
    #: where its tensors live (``torch.device("cuda", i)``, or ``cpu`` for the loopback device)
    torch_device: torch.device

    @abstractmethod
    def stream(self, name: str) -> Stream:
        """A new stream named ``name`` (``"gpu"``, ``"h2d"``, ``"d2h"``)."""

    @abstractmethod
    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Uninitialised device memory."""

    @abstractmethod
    def pinned_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Uninitialised page-locked host memory (what asynchronous copies need)."""

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """A device copy of ``host``, made now (weights at load time); blocks until it is there."""
        out = self.empty(tuple(host.shape), host.dtype)
        out.copy_(host)
        return out

    @abstractmethod
    def transfer(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` into ``dst`` from inside a launched function, on the stream it runs on (CUDA:
        ``copy_(non_blocking=True)``; loopback: a memcpy, slowed like :meth:`Stream.copy`)."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Device memory a plan may use now (free memory, within any cap set on the process)."""

    def use_on(self, tensor: torch.Tensor, stream: Stream) -> None:  # noqa: B027 - a no-op unless overridden
        """Tell the allocator that ``stream`` uses ``tensor`` (CUDA: ``record_stream``); a no-op by default."""

    def close(self) -> None:  # noqa: B027 - a no-op unless overridden
        """Stop the device's threads (if any); further use is an error."""

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the loopback device ------------------------------------------------------------------------------


class _LoopbackStamp(Stamp):
    __slots__ = ("ns",)

    def __init__(self) -> None:
        self.ns: int | None = None

    def seconds(self) -> float:
        if self.ns is None:
            raise DeviceError("a timestamp was read before its stream reached it")
        return self.ns * 1e-9


class _LoopbackEvent(Event):
    __slots__ = ("_done", "stream", "error")

    def __init__(self, stream: _LoopbackStream) -> None:
        self._done = threading.Event()
        self.stream = stream
        self.error: BaseException | None = None

    def _set(self, error: BaseException | None) -> None:
        self.error = error
        self._done.set()

    def query(self) -> bool:
        if not self._done.is_set():
            return False
        if self.error is not None:
            raise self.error
        return True

    def wait(self, timeout_s: float, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while not self._done.wait(min(0.05, max(deadline - time.monotonic(), 0.0))):
            if self.stream.device.closed:
                raise DeviceError(f"{what or 'a wait'}: the device was closed while waiting on stream "
                                  f"{self.stream.name}")
            if time.monotonic() >= deadline:
                raise DeviceTimeout(f"{what or 'a wait'} waited {timeout_s:g} s for stream {self.stream.name} "
                                    f"(stuck at {self.stream.current or 'its queue'}) and gave up")
        self.query()


class _LoopbackStream(Stream):
    """A worker thread that runs its queue in order; see :class:`LoopbackDevice`."""

    def __init__(self, device: LoopbackDevice, name: str) -> None:
        self.device, self.name = device, name
        self.queue: queue.SimpleQueue[tuple[str, Any, str] | None] = queue.SimpleQueue()
        self.error: DeviceError | None = None
        self.current: str | None = None
        self.thread = threading.Thread(target=self._work, name=f"offloadkit-loopback-{name}", daemon=True)
        self.thread.start()

    # -- the worker --
    def _work(self) -> None:
        self.device.local.stream = self
        while True:
            item = self.queue.get()
            if item is None:
                return
            op, arg, label = item
            if op == "event":  # after close, work before it may have been dropped: never report success then
                closed = self.device.closed and self.error is None
                arg._set(DeviceError(f"stream {self.name}: the device was closed before this point was reached")
                         if closed else self.error)
                continue
            if op == "stamp":
                arg.ns = time.perf_counter_ns()
                continue
            if self.error is not None or self.device.closed:
                continue  # a failed (or closing) stream skips its queue; its events report the failure
            self.current = label
            try:
                if op == "wait":
                    arg.wait(self.device.wait_s, f"{label} on stream {self.name}")
                else:
                    arg()
            except BaseException as e:  # noqa: BLE001 - any failure is reported to whoever waits
                err = e if isinstance(e, DeviceError) else DeviceError(f"{label} failed on stream {self.name}: "
                                                                       f"{type(e).__name__}: {e}")
                if err is not e:
                    err.__cause__ = e
                    err.label = label  # type: ignore[attr-defined]  # the work that failed, for the executor
                self.error = err
            self.current = None

    def _put(self, op: str, arg: Any, label: str) -> None:
        if self.device.closed:
            raise DeviceError(f"{label}: the loopback device is closed")
        self.queue.put((op, arg, label))

    # -- the interface --
    def launch(self, fn: Callable[[], Any], label: str) -> None:
        self._put("run", fn, label)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, label: str) -> None:
        if dst.shape != src.shape or dst.dtype != src.dtype:
            raise DeviceError(f"{label}: a copy needs the same shape and dtype, got {tuple(src.shape)} "
                              f"{src.dtype} -> {tuple(dst.shape)} {dst.dtype}")
        self._put("run", lambda: self.device.transfer(dst, src), label)

    def record(self) -> Event:
        ev = _LoopbackEvent(self)
        self._put("event", ev, "event")
        return ev

    def wait_event(self, event: Event) -> None:
        self._put("wait", event, f"a wait for stream {getattr(getattr(event, 'stream', None), 'name', '?')}")

    def stamp(self) -> Stamp:
        st = _LoopbackStamp()
        self._put("stamp", st, "stamp")
        return st


class LoopbackDevice(Device):
    """The CPU stand-in for a GPU: one thread per stream, events as thread events, copies as memcpy.

    ``copy_gbps``: slow the copies of the streams so named (``{"h2d": 25.0, "d2h": 25.0}``, GB/s) to a
    link's bandwidth, so a demonstration shows copies the length a PCIe link would make them (use
    :meth:`throttled`). ``copy_delay_s``: add this to every copy (fault injection: a stalled link).
    ``memory_bytes``: the device memory a plan may use (default: unlimited). ``wait_s``: the bound of
    a stream's waits on other streams' events.
    """

    kind = "loopback"
    is_gpu = False

    def __init__(self, *, copy_gbps: dict[str, float] | None = None, copy_delay_s: float = 0.0,
                 memory_bytes: int | None = None, wait_s: float = DEFAULT_WAIT_S) -> None:
        from offloadkit.kernels.cuda import twins

        self.ops = twins
        self.torch_device = torch.device("cpu")
        self.copy_gbps = dict(copy_gbps or {})
        self.copy_delay_s, self.wait_s = copy_delay_s, wait_s
        self._memory = memory_bytes
        self.closing = threading.Event()
        self.local = threading.local()  # .stream: the stream whose thread this is
        self.streams: list[_LoopbackStream] = []
        slowed = ", ".join(f"{k} at {v:.3g} GB/s" for k, v in sorted(self.copy_gbps.items()))
        self.label = ("loopback (CPU threads standing in for a GPU"
                      + (f"; copies slowed: {slowed}" if slowed else "") + ")")

    @classmethod
    def throttled(cls, link: Any, pinned: bool = True, **kwargs: Any) -> LoopbackDevice:
        """A loopback device whose copies take as long as on ``link`` (a :class:`LinkProfile`)."""
        gbps = {d: link.bandwidth(d, pinned) / 1e9 for d in ("h2d", "d2h")}
        return cls(copy_gbps=gbps, **kwargs)

    @property
    def closed(self) -> bool:
        return self.closing.is_set()

    def stream(self, name: str) -> Stream:
        if self.closed:
            raise DeviceError("the loopback device is closed")
        s = _LoopbackStream(self, name)
        self.streams.append(s)
        return s

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def pinned_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)  # host memory is host memory here

    def transfer(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """A memcpy, slowed to the bandwidth of the stream it runs on (``copy_gbps``) plus ``copy_delay_s``."""
        t0 = time.perf_counter()
        dst.copy_(src)
        stream = getattr(self.local, "stream", None)
        gbps = self.copy_gbps.get(stream.name) if stream is not None else None
        delay = self.copy_delay_s
        if gbps:
            delay += src.numel() * src.element_size() / (gbps * 1e9) - (time.perf_counter() - t0)
        if delay > 0:
            self.closing.wait(delay)  # wakes at once when the device closes

    def memory_bytes(self) -> int:
        return self._memory if self._memory is not None else 2**62

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every stream's thread: queued work is dropped, running work finishes (a copy slowed down on
        purpose stops waiting at once)."""
        self.closing.set()
        for s in self.streams:
            s.queue.put(None)
        deadline = time.monotonic() + timeout_s
        for s in self.streams:
            s.thread.join(max(deadline - time.monotonic(), 0.0))
        left = [s.name for s in self.streams if s.thread.is_alive()]
        if left:
            raise DeviceError(f"the loopback streams {', '.join(left)} did not stop within {timeout_s:g} s")


__all__ = ["DEFAULT_WAIT_S", "Device", "Event", "LoopbackDevice", "Stamp", "Stream"]
