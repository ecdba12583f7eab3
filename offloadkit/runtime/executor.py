"""The hybrid executor: one step's task graph run for real, CPU, GPU and both copy directions at once.

The simulator runs a step's graph in virtual time; this runs *the same graph* (built by the same
:class:`~offloadkit.runtime.stepgraph.StepBuilder` from the same plan and token assignment) on a
:class:`~offloadkit.runtime.devices.Device` and the CPU (docs/DESIGN.md section 9):

- **Lanes are threads.** Each of the four lanes has a host thread that takes its tasks in issue order,
  as the simulator's lanes do. The ``cpu`` thread computes (the Numba kernels release the GIL, so it
  runs beside the others). The ``gpu``, ``h2d`` and ``d2h`` threads *issue* work onto a device stream
  of the same name and move on; the device runs it.
- **Dependencies are events.** A task waits for each task it depends on: on another device stream with
  ``stream.wait_event`` (the host does not block), on the CPU lane by the host thread waiting until
  that CPU task has ended, and a CPU task waits on a device task's event on the host. Every host wait
  has a bound (``wait_s``).
- **Routing is real.** The builder asks for a layer's expert counts after issuing its router; the
  executor waits (bounded) for that router task and reads its choices, so the routed experts' copies
  are issued as soon as their router has chosen, as in Fiddler's and ScheInfer's engines.
- **Weights** come from :class:`~offloadkit.runtime.streaming.WeightStreamer` (resident pieces; CG
  slices staged through pinned memory into ``plan.staging_buffers`` device buffers). **Values** (the
  parts each task writes) and the per-task math live in :mod:`offloadkit.runtime.lane_math`.
- **The record** is a measured :class:`~offloadkit.runtime.timeline.Timeline` with the simulator's
  schema: the same task names, kinds and lanes, so a measured step lies beside its simulation. CPU
  times are ``perf_counter``; device times are the device's timestamps on the same clock (CUDA events
  aligned to ``perf_counter`` at the device's creation). With ``check=True`` every step's measured
  schedule is checked: each value on the right device before it was read
  (:func:`~offloadkit.runtime.tasks.check_dataflow`) and no staging buffer overwritten before its
  reader ended (:func:`~offloadkit.runtime.streaming.check_staging`).

Faults: a task that raises (on a lane thread or a device stream) stops the step; the caller gets an
:class:`~offloadkit.errors.ExecutorError` naming the task and its lane. A wait past its bound is such an
error too (a stalled copy never hangs the caller). On any error and on ``KeyboardInterrupt`` the executor
shuts down its lane threads and the device's, and refuses further use.

Lifetime of device tensors: every tensor a step creates stays referenced until the step's end, when
every stream has been synchronised; so no block of torch's caching allocator is handed to new work
while another stream still reads it (the rule :mod:`offloadkit.kernels.cuda.ops` states for its scratch).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from offloadkit.errors import DeviceError, DeviceTimeout, ExecutorError
from offloadkit.model.rope import rotary_tables
from offloadkit.model.spec import ModelSpec
from offloadkit.plan.assign import TokenAssigner
from offloadkit.plan.costmodel import CostModel
from offloadkit.plan.plans import Plan, plan_blocks
from offloadkit.runtime.devices import DEFAULT_WAIT_S, Device, Event, Stamp
from offloadkit.runtime.lane_math import LaneMath, Part, StepInputs, Values, base_of
from offloadkit.runtime.stepgraph import StepBuilder, StepShape, layer_blocks
from offloadkit.runtime.streaming import WeightStreamer, check_staging
from offloadkit.runtime.tasks import READS_ON, WRITES_ON, Task, TaskGraph, check_dataflow
from offloadkit.runtime.timeline import LANES, TaskRecord

DEVICE_LANES = ("gpu", "h2d", "d2h")
PIECE_SUFFIXES = (".gg", ".cg", ".cc")


class _Aborted(Exception):
    """Another task failed (or the executor is closing): stop this one quietly."""


class _Slot:
    """A submitted task: ``issued`` is set once its lane has run it (cpu) or queued it (device lanes)."""

    __slots__ = ("task", "issued", "event", "t0", "t1", "stamps")

    def __init__(self, task: Task) -> None:
        self.task = task
        self.issued = threading.Event()
        self.event: Event | None = None
        self.t0 = self.t1 = 0.0
        self.stamps: tuple[Stamp, Stamp] | None = None


@dataclass
class StepRun:
    """One executed step: its graph, each task's measured start and end (``perf_counter`` seconds, indexed like
    ``graph.tasks``), the staging buffer of each weight copy, and the logits [B, V] on the host."""

    graph: TaskGraph
    start_s: list[float]
    end_s: list[float]
    slot_of: dict[int, int]
    logits: torch.Tensor
    shape: StepShape

    def records(self, origin_s: float, step: int) -> list[TaskRecord]:
        return [TaskRecord(t.lane, t.name, s - origin_s, e - origin_s, t.layer, t.kind, t.bytes_, t.flops, step)
                for t, s, e in zip(self.graph.tasks, self.start_s, self.end_s, strict=True)]


def block_name(task: Task) -> str:
    """The block a slice task (or its weight copy) belongs to: ``"L3.expert5.cg.w"`` -> ``"L3.expert5"``."""
    name = task.name.removesuffix(".w")
    for suffix in PIECE_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


class HybridExecutor:
    """Runs steps of ``plan`` on ``device`` and the CPU; see the module docstring. Close it when done."""

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], plan: Plan, cost: CostModel,
                 device: Device, *, wait_s: float = DEFAULT_WAIT_S, pinned_budget_bytes: int | None = None,
                 check: bool = False) -> None:
        self.spec, self.plan, self.cost, self.device = spec, plan, cost, device
        self.wait_s, self.check = wait_s, check
        self.blocks = {b.name: b for b in plan_blocks(spec)}
        self.layer_blocks = layer_blocks(spec)
        self.assigner = TokenAssigner(spec, plan, cost)
        self.error: tuple[Task, BaseException] | None = None
        self.closed = False
        self.threads: dict[str, threading.Thread] = {}
        self.queues: dict[str, queue.SimpleQueue] = {lane: queue.SimpleQueue() for lane in LANES}
        try:
            self.streamer = WeightStreamer(spec, weights, plan, device, pinned_budget_bytes=pinned_budget_bytes,
                                           wait_s=wait_s)
            self.streams = {lane: device.stream(lane) for lane in DEVICE_LANES}
        except BaseException:
            self._shutdown()
            raise
        self.values = Values()
        self.math = {"cpu": LaneMath(spec, "cpu", torch.device("cpu"), None, weights),
                     "gpu": LaneMath(spec, "gpu", device.torch_device, device.ops, weights, self.streamer.resident,
                                     self.streamer.small)}
        for m in self.math.values():
            m.v = self.values
        self.slots: dict[int, _Slot] = {}
        self.routers: dict[int, int] = {}
        for lane in LANES:
            t = threading.Thread(target=self._work, args=(lane,), name=f"offloadkit-lane-{lane}", daemon=True)
            self.threads[lane] = t
            t.start()

    # ---- the KV cache ---------------------------------------------------------------------------------------

    def new_kv(self, batch: int, max_len: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, zeroed keys and values [B, KV, max_len, D] f32 on the side that runs its attention."""
        s = self.spec
        out = {}
        shape = (batch, s.n_kv_heads, max_len, s.head_dim)
        for layer in range(s.n_layers):
            if self.plan.kv_on_gpu[layer]:  # upload: zeroed before any stream can touch it (a fill queued on
                zero = torch.zeros(shape)    # the default stream would race the gpu stream's first write)
                out[layer] = (self.device.upload(zero), self.device.upload(zero))
            else:
                out[layer] = (torch.zeros(shape), torch.zeros(shape))
        return out

    # ---- a step -----------------------------------------------------------------------------------------------

    def run_step(self, ids: torch.Tensor, start: int, kv: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
                 step: int = 0) -> StepRun:
        """Run one step of ``ids`` [B, T] (positions ``[start, start + T)``) with the KV cache ``kv``."""
        if self.closed:
            raise ExecutorError("this executor was shut down (after an error, an interrupt or close()); "
                                "make a new engine")
        b, t = ids.shape
        shape = StepShape(step, t, start, b)
        try:
            return self._run_step(ids, shape, kv)
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, ExecutorError)) or (self.error is None
                                                                    and not isinstance(e, DeviceError)):
                self._shutdown()
                raise
            if self.error is None:  # a device error the caller saw first (waiting on a router)
                self.error = (self._blamed(e) or self.slots[max(self.slots)].task, e)
            err = self._error()  # before the shutdown: a stalled task is found by what has not ended yet
            self._shutdown()
            raise err  # noqa: B904 - the task's own exception is the cause (set in _error)

    def _run_step(self, ids: torch.Tensor, shape: StepShape, kv: Mapping[int, tuple[torch.Tensor, torch.Tensor]]
                  ) -> StepRun:
        b, t = shape.batch, shape.tokens
        pos = torch.arange(shape.past, shape.past + t)
        cos, sin = rotary_tables(self.spec, pos, torch.float32)
        dev = self.device.torch_device
        inputs = StepInputs(ids.reshape(-1).to(torch.int64), b, t, shape.past,
                            {"cpu": cos, "gpu": cos.to(dev)}, {"cpu": sin, "gpu": sin.to(dev)},
                            "all" if self.plan.meta.get("logits") == "all" else "last")
        self.values.parts.clear()
        self.values.parts[("ids@cpu", "cpu")] = Part(inputs.ids)
        self.slots, self.routers = {}, {}
        for side, m in self.math.items():
            m.step, m.counts = inputs, {}
            m.kv = {layer: kv[layer] for layer in kv if self.plan.kv_on_gpu[layer] == (side == "gpu")}
        self.streamer.begin_step()
        builder = StepBuilder(self.spec, self.plan, self.cost, shape, on_task=self._submit, blocks=self.layer_blocks,
                              assigner=self.assigner)
        graph = builder.build(self._counts)
        self._drain()
        start_s = [0.0] * len(graph.tasks)
        end_s = [0.0] * len(graph.tasks)
        for i, task in enumerate(graph.tasks):
            slot = self.slots[task.id]
            if slot.stamps is not None:
                start_s[i], end_s[i] = slot.stamps[0].seconds(), slot.stamps[1].seconds()
            else:
                start_s[i], end_s[i] = slot.t0, slot.t1
        slot_of = dict(self.streamer.slot_of)
        if self.check:
            check_dataflow(graph, start_s, end_s, eps=1e-6)
            check_staging(graph, slot_of, start_s, end_s, eps=1e-6)
        logits = self._logits()
        self.values.parts.clear()  # the step's tensors go now that every stream is synchronised
        return StepRun(graph, start_s, end_s, slot_of, logits, shape)

    def _logits(self) -> torch.Tensor:
        parts = [p for (name, side), p in self.values.parts.items() if side == "cpu" and base_of(name) == "logits"]
        out = parts[0].data.new_zeros(parts[0].data.shape)
        for p in parts:
            out[:, p.c0:p.c1] = p.data[:, p.c0:p.c1]
        return out

    # ---- issuing -------------------------------------------------------------------------------------------

    def _submit(self, task: Task) -> None:
        if self.error is not None:
            raise self._error()
        slot = self.slots[task.id] = _Slot(task)
        if task.kind == "router":
            self.routers[task.layer] = task.id
        self.queues[task.lane].put(slot)

    def _host_wait(self, event: threading.Event, what: str) -> None:
        """Wait for a host event, bounded, giving up at once if the step failed or the executor closes."""
        deadline = time.monotonic() + self.wait_s
        while not event.wait(0.02):
            if self.error is not None or self.closed:
                raise _Aborted
            if time.monotonic() > deadline:
                raise DeviceTimeout(f"{what}: waited {self.wait_s:g} s and gave up")
        if self.error is not None:
            raise _Aborted

    def _counts(self, layer: int) -> list[int]:
        """Tokens per expert the router of ``layer`` chose: waits for the router (bounded) and reads them."""
        slot = self.slots[self.routers[layer]]
        side = WRITES_ON[slot.task.lane]
        self._host_wait(slot.issued, f"the routing of layer {layer} (task {slot.task.name!r})")
        if slot.event is not None:
            self._event_wait(slot.event, f"the routing of layer {layer} (task {slot.task.name!r})")
        experts = self.values.parts[(slot.task.writes[0], side)].data[1]
        counts = torch.bincount(experts.flatten().cpu(), minlength=self.spec.n_experts).tolist()
        for m in self.math.values():
            m.counts[layer] = counts
        return counts

    def _event_wait(self, event: Event, what: str) -> None:
        try:
            event.wait(self.wait_s, what)
        except DeviceError:
            if self.error is not None:
                raise _Aborted from None
            raise

    def _drain(self) -> None:
        """Wait (bounded) until every lane has taken every task of the step and every device task has run."""
        markers = {lane: threading.Event() for lane in LANES}
        for lane in LANES:
            self.queues[lane].put(markers[lane])
        try:
            for lane in LANES:
                self._host_wait(markers[lane], f"the end of the step on the {lane} lane")
            for slot in self.slots.values():
                if slot.event is not None:
                    try:
                        slot.event.wait(self.wait_s, f"task {slot.task.name!r} on the {slot.task.lane} lane")
                    except DeviceError as e:
                        if self.error is None:
                            self.error = (slot.task, e)
                        raise _Aborted from e
        except _Aborted:
            raise self._error()  # noqa: B904 - the task's own exception is the cause (set in _error)

    def _error(self) -> ExecutorError:
        """The step's first failure as an :class:`ExecutorError` naming the task that failed (not the one that
        noticed it), with the task's own exception as its cause."""
        assert self.error is not None
        task, e = self.error
        msg = f"{type(e).__name__}: {e}"
        blamed = self._blamed(e)
        if blamed is not None:
            if isinstance(e, DeviceTimeout) and blamed is not task:
                msg = (f"it did not finish within the bound of {self.wait_s:g} s (a stalled copy or kernel; "
                       f"{task.name!r} gave up waiting): {e}")
            elif isinstance(e, DeviceError) and not isinstance(e, DeviceTimeout):
                msg = str(e)
            task = blamed
        err = ExecutorError(f"task {task.name!r} on the {task.lane} lane failed: {msg}")
        cause: BaseException = e
        while isinstance(cause, DeviceError) and cause.__cause__ is not None:  # the task's own exception
            cause = cause.__cause__
        err.__cause__ = cause
        return err

    def _blamed(self, e: BaseException) -> Task | None:
        """The task behind a device error: the one its label names, or, for a timeout, the first device task in
        issue order that has not ended although everything it waits for has (the stalled one)."""
        label = getattr(e, "label", None)
        if label is not None:
            for slot in self.slots.values():
                if slot.task.name == label:
                    return slot.task
        if not isinstance(e, DeviceTimeout):
            return None
        for slot in self.slots.values():
            if slot.event is None or self._done(slot.event):
                continue
            deps = [self.slots[d] for d in slot.task.deps]
            if all(d.issued.is_set() and (d.event is None or self._done(d.event)) for d in deps):
                return slot.task
        return None

    @staticmethod
    def _done(event: Event) -> bool:
        try:
            return event.query()
        except DeviceError:
            return True  # it ended, badly

    # ---- the lanes -------------------------------------------------------------------------------------------

    def _work(self, lane: str) -> None:
        q = self.queues[lane]
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            slot: _Slot = item
            try:
                if self.error is None and not self.closed:
                    self._execute(lane, slot)
            except _Aborted:
                pass
            except BaseException as e:  # noqa: BLE001 - reported to the caller, naming the task
                if self.error is None:
                    self.error = (slot.task, e)
            finally:
                slot.issued.set()

    def _wait_deps(self, lane: str, task: Task) -> None:
        stream = self.streams.get(lane)
        for d in task.deps:
            dep = self.slots[d]
            what = f"task {task.name!r} waiting for {dep.task.name!r} ({dep.task.lane} lane)"
            self._host_wait(dep.issued, what)
            if dep.event is None or dep.task.lane == lane:
                continue  # a CPU task has ended once issued; a stream runs its own queue in order
            if stream is None:
                self._event_wait(dep.event, what)
            else:
                stream.wait_event(dep.event)

    def _execute(self, lane: str, slot: _Slot) -> None:
        task = slot.task
        self._wait_deps(lane, task)
        if lane == "cpu":
            slot.t0 = time.perf_counter()
            self.math["cpu"].run(task)
            slot.t1 = time.perf_counter()
            return
        stream = self.streams[lane]
        first = stream.stamp()
        if lane == "gpu":
            for w in task.writes:
                self.values.parts.setdefault((w, "gpu"), Part(None))
            stream.launch(lambda: self.math["gpu"].run(task), task.name)
        elif task.kind == "weights":
            block = self.blocks[block_name(task)]
            r0, r1 = task.rows
            pieces = self.streamer.stage(task.id, block, r0, r1, stream, task.name)
            self.values.parts[(task.writes[0], "gpu")] = Part(pieces)
        else:
            self._copy_activation(lane, task, stream)
        slot.stamps = (first, stream.stamp())
        slot.event = stream.record()

    def _copy_activation(self, lane: str, task: Task, stream: Any) -> None:
        """Queue the copy of one part to the other side (the source is read when the stream gets there)."""
        part, src_side, dst_side = task.reads[0], READS_ON[lane], WRITES_ON[lane]
        dst_part = self.values.parts.setdefault((part, dst_side), Part(None))
        device = self.device

        def alloc(t: torch.Tensor) -> torch.Tensor:
            if dst_side == "gpu":
                return device.empty(tuple(t.shape), t.dtype)
            return device.pinned_empty(tuple(t.shape), t.dtype)

        def run() -> None:
            src = self.values.parts[(part, src_side)]
            data = src.data if isinstance(src.data, tuple) else (src.data,)
            out = tuple(alloc(t) for t in data)
            for o, t in zip(out, data, strict=True):
                device.transfer(o, t)
            dst_part.data = out if isinstance(src.data, tuple) else out[0]
            dst_part.c0, dst_part.c1 = src.c0, src.c1

        stream.launch(run, task.name)

    # ---- shutting down ---------------------------------------------------------------------------------------

    def _shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the lane threads and the device's; idempotent."""
        if self.closed:
            return
        self.closed = True
        for q in self.queues.values():
            q.put(None)
        try:
            self.device.close()
        finally:
            deadline = time.monotonic() + timeout_s
            for t in self.threads.values():
                t.join(max(deadline - time.monotonic(), 0.0))
        left = [name for name, t in self.threads.items() if t.is_alive()]
        if left:
            raise ExecutorError(f"the lane threads {', '.join(left)} did not stop within {timeout_s:g} s")

    def close(self) -> None:
        self._shutdown()


__all__ = ["DEVICE_LANES", "HybridExecutor", "StepRun", "block_name"]
