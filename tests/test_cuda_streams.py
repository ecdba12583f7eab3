"""The CUDA wrappers and the caching allocator: every buffer a wrapper allocates is allocated on the
stream its kernels are launched on, and the CuPy backend records the caller's tensors on that stream.

Torch's caching allocator gives a freed block to the next allocation on the stream it was allocated
on, without waiting for other streams (see offloadkit.kernels.cuda.ops). On the CPU the tests watch
*where* allocations happen (a stand-in for ``torch.cuda.stream`` that tracks the current stream, and
torch's allocation functions wrapped to note it); on a GPU the last test shows the bug itself, a
scratch buffer handed to other work while a side stream's kernels still use it, does not happen.
"""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch

from offloadkit.kernels.cuda import loader, ops, twins
from offloadkit.kernels.cuda.emulate import EmulatorBackend, compiler
from offloadkit.kernels.cuda.loader import Launch, i32


class Tracker:
    """Which stream is current (as ``torch.cuda.stream`` would set it) and the stream of each allocation."""

    def __init__(self) -> None:
        self.current = None
        self.allocations: list[tuple[str, object]] = []
        self.launches: list[tuple[tuple[str, ...], object]] = []

    @contextlib.contextmanager
    def stream(self, stream):
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before

    def spy(self, fn):
        def allocate(*args, **kwargs):
            self.allocations.append((fn.__name__, self.current))
            return fn(*args, **kwargs)
        return allocate


@pytest.fixture
def tracker(monkeypatch) -> Tracker:
    t = Tracker()
    monkeypatch.setattr(torch.cuda, "stream", t.stream)
    for name in ("empty", "zeros", "empty_like", "zeros_like"):
        monkeypatch.setattr(torch, name, t.spy(getattr(torch, name)))
    return t


class RecordingBackend:
    """Launches nothing; notes each run's kernels and the stream it was given."""

    device_type = "cpu"

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def run(self, launches, stream=None):
        self.tracker.launches.append((tuple(la.kernel for la in launches), stream))


SIDE = types.SimpleNamespace(cuda_stream=0x5EED, name="side stream")


def call_every_allocating_wrapper(tracker: Tracker) -> None:
    """Each wrapper that allocates, on the side stream (the inputs are made first, then forgotten)."""
    backend = RecordingBackend(tracker)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=g)
    wg, wu = (torch.randn(24, 16, generator=g).bfloat16() for _ in range(2))
    wd = torch.randn(16, 24, generator=g).bfloat16()
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    experts = torch.tensor([[0, 2], [1, 2], [2, 0]])
    q = torch.randn(2, 4, 8, generator=g)
    k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(2))  # [B, KV, capacity, D]
    out, logits = torch.zeros(3, 16), torch.randn(3, 4, generator=g)
    tracker.allocations.clear()
    ops.expert_swiglu(x, wg, wu, wd, out, (5, 13), stream=SIDE, backend=backend)
    ops.rms_norm(x, w, 1e-5, stream=SIDE, backend=backend)
    ops.layer_norm(x, w, b, 1e-5, stream=SIDE, backend=backend)
    ops.router_topk(logits, 2, shared_gate=True, stream=SIDE, backend=backend)
    ops.moe_permute(x, experts, 3, stream=SIDE, backend=backend)
    ops.attention_decode(q, k, v, 5, stream=SIDE, backend=backend)


def test_every_buffer_a_wrapper_allocates_is_allocated_on_the_launch_stream(tracker):
    call_every_allocating_wrapper(tracker)
    # expert_swiglu: act; rms/layer norm: out each; router: weights, experts, shared; permute: x_perm, src,
    # dst, offsets; attention: out
    assert len(tracker.allocations) == 1 + 2 + 3 + 4 + 1
    assert [stream for _, stream in tracker.allocations] == [SIDE] * 11
    assert len(tracker.launches) == 6
    assert all(given is SIDE for _, given in tracker.launches)


def test_the_prefill_expert_allocates_on_the_launch_stream_too(tracker):
    x = torch.randn(ops.MAX_DECODE_TOKENS + 1, 16)
    wg, wu, wd = torch.randn(24, 16), torch.randn(24, 16), torch.randn(16, 24)
    seen = []
    real_linear = torch.nn.functional.linear

    def linear(*args, **kwargs):
        seen.append(tracker.current)
        return real_linear(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "linear", linear)
        got = ops.expert_swiglu(x, wg, wu, wd, torch.zeros(9, 16), (2, 20), stream=SIDE,
                                backend=RecordingBackend(tracker))
    assert seen and all(s is SIDE for s in seen)  # the three cuBLAS GEMMs (and their outputs) on the side stream
    torch.testing.assert_close(got, twins.expert_swiglu(x, wg, wu, wd, torch.zeros(9, 16), (2, 20)))


def test_without_a_stream_nothing_is_switched(tracker):
    """``stream=None`` means the current stream: allocate there, and hand the backend None."""
    backend, x, w = RecordingBackend(tracker), torch.randn(2, 8), torch.ones(8)
    tracker.allocations.clear()
    ops.rms_norm(x, w, 1e-5, backend=backend)
    assert tracker.allocations == [("empty_like", None)] and tracker.launches == [(("rmsnorm<float>",), None)]


@pytest.mark.skipif(compiler() is None, reason="the CPU emulation of CUDA kernels needs g++ (C++20)")
def test_moe_permute_offsets_need_no_zero_fill(monkeypatch):
    """``offsets`` comes from ``torch.empty`` when there are picks: the kernel writes every entry, even for
    experts nobody picked. Poison what ``empty`` returns and compare with the twin."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(-7))
    x = torch.randn(5, 12)
    experts = torch.tensor([[3, 0], [3, 5], [0, 3], [5, 0], [3, 5]])  # experts 1, 2, 4, 6 get nothing
    got = ops.moe_permute(x, experts, 7, backend=EmulatorBackend())
    for a, b in zip(got, twins.moe_permute(x, experts, 7), strict=True):
        torch.testing.assert_close(a, b)
    none = ops.moe_permute(torch.randn(0, 12), torch.zeros(0, 2, dtype=torch.int64), 7, backend=EmulatorBackend())
    assert none[3].tolist() == [0] * 8  # no picks, no launch: the offsets are zero-filled


def test_the_cupy_backend_records_every_tensor_on_the_launch_stream(monkeypatch):
    """A tensor the caller allocated elsewhere and drops before the kernels finish must not be reused
    meanwhile: ``record_stream(launch stream)`` on each tensor argument, before the kernels are queued."""
    events: list[tuple] = []

    class LooksCuda(torch.Tensor):  # a CPU tensor that says it lives on a GPU and notes record_stream
        @property
        def is_cuda(self):
            return True

        def record_stream(self, stream):
            events.append(("record", self.data_ptr(), stream))

    def kernel(file, name):
        return lambda grid, block, args: events.append(("launch", name))

    @contextlib.contextmanager
    def context(value):
        yield

    fake = types.SimpleNamespace(
        __version__="fake", asarray=lambda t: t.data_ptr(),
        cuda=types.SimpleNamespace(is_available=lambda: True, Device=context, ExternalStream=context,
                                   runtime=types.SimpleNamespace(getDeviceCount=lambda: 1)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(loader, "get_kernel", kernel)
    a, b, c = (torch.Tensor._make_subclass(LooksCuda, torch.zeros(4)) for _ in range(3))
    plain = torch.zeros(2)  # a CPU tensor is left alone (record_stream is for CUDA memory)
    loader.CupyBackend().run([Launch("norm", "rmsnorm<float>", (1,), (32,), (a, b, plain, i32(4))),
                              Launch("rope", "rope", (1,), (32,), (c, a))], SIDE)
    records = [e for e in events if e[0] == "record"]
    assert sorted(records) == sorted(("record", t.data_ptr(), SIDE) for t in (a, b, c, a))
    assert events.index(("launch", "rmsnorm<float>")) > max(events.index(r) for r in records)


# ---- on a GPU -------------------------------------------------------------------------------------------

_OK, _WHY = loader.cupy_status()
if _OK and not torch.cuda.is_available():
    _OK, _WHY = False, "CuPy sees a GPU but this torch is a CPU build: install a CUDA build of torch"


@pytest.mark.gpu
@pytest.mark.skipif(not _OK, reason=f"GPU tests: {_WHY}")
def test_a_side_stream_launch_keeps_its_scratch_while_the_current_stream_allocates():
    """The side stream is held busy (``torch.cuda._sleep``) so its expert kernels run late; meanwhile the
    current stream allocates buffers the size of the expert's scratch ``act`` [3, 333] f32 and fills
    them. Had ``act`` been allocated on the current stream, freed when the wrapper returned, one of them
    would be ``act``'s block and the late kernels would write into it; allocated on the side stream,
    the buffers and the expert's result all stay right. (No other buffer of that size is freed on the
    current stream here: the expected result is computed on the CPU.)"""
    dev = "cuda"
    n, hidden, inter = 3, 256, 333
    g = torch.Generator().manual_seed(0)
    w_cpu = [(torch.randn(*shape, generator=g) / shape[1] ** 0.5).bfloat16()  # outputs of order 1
             for shape in ((inter, hidden), (inter, hidden), (hidden, inter))]
    x_cpu = torch.randn(n, hidden, generator=g)
    expected = twins.expert_swiglu(x_cpu, *w_cpu, torch.zeros(n, hidden), None)
    wg, wu, wd = (t.to(dev) for t in w_cpu)
    x, got = x_cpu.to(dev), torch.zeros(n, hidden, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the inputs and got's zeros are ready before the side stream
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # tens of milliseconds of spinning before the expert kernels
    ops.expert_swiglu(x, wg, wu, wd, got, stream=side)
    bystanders = [torch.full((n, inter), 7.0, device=dev) for _ in range(8)]  # the current stream, at once
    torch.cuda.synchronize()
    assert all(bool((b == 7.0).all()) for b in bystanders), "a side-stream kernel wrote into another stream's memory"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
