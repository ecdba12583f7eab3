"""Weights on their way to the GPU: resident slices uploaded once, CG slices streamed through staging buffers.

The hybrid executor (docs/DESIGN.md section 9) keeps a plan's GG rows in device memory and copies CG
rows over PCIe at the step that computes them. :class:`WeightStreamer` owns all of it:

- **Resident weights**: at load, every block's GG rows ``[0, g)`` as :mod:`~offloadkit.runtime.slices`
  pieces, and every unsplit block the plan puts on the GPU (norms, routers, the embedding table), whole.
- **Host side of a copy**. An asynchronous copy needs page-locked memory. When the plan copies from
  pinned memory (``plan.pinned``) and the host rows of every splittable block fit the pinned budget,
  they are pinned once, block by block, in piece layout (``mode == "pinned"``): any CG range is then a
  contiguous run of each piece. When they do not fit (Mixtral's ~70 GB of host experts), a **ring** of
  pinned slots is filled from the memory-mapped checkpoint just before each copy (``mode == "ring"``);
  a slot is refilled only after the copy that read it has ended (a host wait on that copy's event,
  bounded). That packing is host work on the ``h2d`` lane's thread, so a measured copy in ring mode
  includes it; the simulator prices the link alone, so it prices ring-mode copies too fast. A plan
  that copies from pageable memory (llama.cpp's mmap) packs into ordinary memory (``mode ==
  "pageable"``), which CUDA copies synchronously through its own staging.
- **Device side**: ``plan.staging_buffers`` device buffers, each the size of the largest CG slice.
  Copy ``i`` lands in buffer ``i mod k``. The step graph makes copy ``i`` depend on the compute that
  read copy ``i - k`` (:meth:`~offloadkit.runtime.stepgraph.StepBuilder.stream_weights`), and the
  executor turns that dependency into an event wait on the copy stream, so a buffer is never
  overwritten while its reader runs; :func:`check_staging` proves it on a measured timeline.
- **Prefetch**: a copy waits only for its staging buffer (and, for a routed expert, its router), not
  for the layer before it, so the next layer's dense slices travel while this layer's experts compute
  whenever a buffer is free, and a routed expert's slices leave as soon as its router has chosen.

Only the executor's ``h2d`` lane calls :meth:`stage`, one copy at a time, in issue order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from offloadkit.errors import TaskGraphError
from offloadkit.model.spec import Block, ModelSpec
from offloadkit.model.writer import TORCH_DTYPES
from offloadkit.plan.plans import Plan, plan_blocks, units
from offloadkit.runtime.devices import DEFAULT_WAIT_S, Device, Event, Stream
from offloadkit.runtime.slices import PieceLayout, host_pieces, slice_nbytes, unsplit_tensors
from offloadkit.runtime.tasks import TaskGraph


def default_pinned_budget() -> int:
    """A quarter of the machine's physical memory: page-locked memory cannot be swapped or reclaimed."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


@dataclass(frozen=True)
class StreamerSizing:
    """What :class:`WeightStreamer` allocates for a plan, in bytes (:func:`streamer_sizing`: shapes only)."""

    mode: str  # "pinned", "ring" or "pageable"
    streamed_blocks: int
    host_bytes: int  # host rows of every block that may stream: what "pinned" mode page-locks
    budget_bytes: int  # the pinned budget it was compared with
    slot_bytes: int  # the largest streamed slice: one staging buffer, and one ring slot
    staging_buffers: int

    @property
    def ring_bytes(self) -> int:
        """Pinned host memory of the ring (``staging_buffers`` slots)."""
        return self.staging_buffers * self.slot_bytes if self.streamed_blocks else 0

    @property
    def pinned_bytes(self) -> int:
        """Page-locked host memory the streamer holds in its mode."""
        return {"pinned": self.host_bytes, "ring": self.ring_bytes}.get(self.mode, 0)


def streamed_blocks(spec: ModelSpec, plan: Plan) -> list[Block]:
    """The blocks whose host rows the plan may stream (none under the ``cpu`` rule)."""
    return [b for b in plan_blocks(spec) if b.rows and b.kind != "embed" and plan.streams
            and min(plan.gg_rows.get(b.name, 0), units(b)) < b.rows]


def streamer_sizing(spec: ModelSpec, plan: Plan, budget_bytes: int | None = None) -> StreamerSizing:
    """The streamer's mode and buffers for ``plan`` from shapes alone (``budget_bytes``: the pinned budget,
    default :func:`default_pinned_budget`); :class:`WeightStreamer` sizes itself with it."""
    budget = default_pinned_budget() if budget_bytes is None else budget_bytes
    dtype = TORCH_DTYPES[spec.dtype]
    blocks = streamed_blocks(spec, plan)
    host = slot = 0
    for b in blocks:
        rows = b.rows - min(plan.gg_rows.get(b.name, 0), units(b))
        host += slice_nbytes(spec, b, rows)
        slot = max(slot, PieceLayout.of(spec, b, rows, dtype).nbytes)
    mode = "pageable" if not plan.pinned else "pinned" if host <= budget else "ring"
    return StreamerSizing(mode, len(blocks), host, budget, slot, plan.staging_buffers)


class WeightStreamer:
    """Resident weights and the staging of streamed ones for one plan on one device; see the module docstring."""

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], plan: Plan, device: Device, *,
                 pinned_budget_bytes: int | None = None, wait_s: float = DEFAULT_WAIT_S) -> None:
        self.spec, self.weights, self.plan, self.device, self.wait_s = spec, weights, plan, device, wait_s
        self.dtype = TORCH_DTYPES[spec.dtype]
        self.blocks = {b.name: b for b in plan_blocks(spec)}
        #: block name -> pieces of its GG rows on the device
        self.resident: dict[str, dict[str, torch.Tensor]] = {}
        #: tensor name -> the whole tensor on the device (unsplit blocks on the GPU, O's bias)
        self.small: dict[str, torch.Tensor] = {}
        self._upload_resident()
        self.streamed = streamed_blocks(spec, plan)
        self.sizing = streamer_sizing(spec, plan, pinned_budget_bytes)
        self.mode, self.slot_bytes = self.sizing.mode, self.sizing.slot_bytes
        k = plan.staging_buffers if self.streamed else 0
        self.slots = [device.empty((self.slot_bytes,), torch.uint8) for _ in range(k)]
        self.pinned_blocks: dict[str, dict[str, torch.Tensor]] = {}
        self.ring: list[torch.Tensor] = []
        self.ring_free: list[Event | None] = []
        if self.mode == "pinned":
            for b in self.streamed:
                g = self.gg(b)
                self.pinned_blocks[b.name] = {name: self._pinned_copy(t) for name, t in
                                              host_pieces(spec, weights, b, g, b.rows).items()}
        elif self.mode == "ring":
            self.ring = [device.pinned_empty((self.slot_bytes,), torch.uint8) for _ in range(k)]
            self.ring_free = [None] * k
        self.copies = 0  # copies issued so far in this step (the next one goes to slot copies % k)
        #: per copy of this step: (task id, slot)
        self.slot_of: dict[int, int] = {}

    # ---- loading ----------------------------------------------------------------------------------------

    def gg(self, block: Block) -> int:
        return min(self.plan.gg_rows.get(block.name, 0), units(block))

    def _pinned_copy(self, t: torch.Tensor) -> torch.Tensor:
        out = self.device.pinned_empty(tuple(t.shape), t.dtype)
        out.copy_(t)
        return out

    def _upload_resident(self) -> None:
        for b in self.blocks.values():
            g = self.gg(b)
            if b.rows and b.kind != "embed":
                if g:
                    self.resident[b.name] = {n: self.device.upload(t.contiguous())
                                             for n, t in host_pieces(self.spec, self.weights, b, 0, g).items()}
                for name in unsplit_tensors(b):
                    self.small[name] = self.device.upload(self.weights[name].contiguous())
            elif g:
                for t in b.tensors:
                    if t.name not in self.small:
                        self.small[t.name] = self.device.upload(self.weights[t.name].contiguous())

    @property
    def resident_bytes(self) -> int:
        pieces = (t for p in self.resident.values() for t in p.values())
        return sum(t.numel() * t.element_size() for t in (*pieces, *self.small.values()))

    # ---- a step -------------------------------------------------------------------------------------------

    def begin_step(self) -> None:
        self.copies = 0
        self.slot_of = {}

    def stage(self, task_id: int, block: Block, r0: int, r1: int, stream: Stream, label: str
              ) -> dict[str, torch.Tensor]:
        """Queue the copy of rows ``[r0, r1)`` of ``block`` on ``stream`` (the h2d lane, after its event waits);
        return the pieces as views of the device staging buffer they land in."""
        k = len(self.slots)
        if not k:
            raise TaskGraphError(f"{label}: the plan streams no weights, yet a weight copy was issued")
        j = self.copies % k
        self.copies += 1
        self.slot_of[task_id] = j
        layout = PieceLayout.of(self.spec, block, r1 - r0, self.dtype)
        dst = layout.views(self.slots[j])
        if self.mode == "pinned":
            g = self.gg(block)
            src = {n: t[r0 - g:r1 - g] for n, t in self.pinned_blocks[block.name].items()}
            for n in layout.names:
                stream.copy(dst[n], src[n], f"{label} ({n})")
            return dst
        if self.mode == "ring":
            free = self.ring_free[j]
            if free is not None:  # the copy that last read this pinned slot must have ended
                free.wait(self.wait_s, f"{label}: pinned slot {j}")
            flat = self.ring[j][:layout.nbytes]
        else:  # pageable: the buffer lives until the copy has run (the stream's closure holds it)
            flat = torch.empty((layout.nbytes,), dtype=torch.uint8)
        host = layout.views(flat)
        for n, t in host_pieces(self.spec, self.weights, block, r0, r1).items():
            host[n].copy_(t)
        stream.copy(self.slots[j][:layout.nbytes], flat, label)
        if self.mode == "ring":
            self.ring_free[j] = stream.record()
        return dst


def check_staging(graph: TaskGraph, slot_of: Mapping[int, int], start_s: Sequence[float], end_s: Sequence[float],
                  eps: float = 1e-9) -> None:
    """Check on a schedule that no staging buffer was overwritten while the compute reading it ran: the copy
    into a buffer starts only after every task that read the buffer's previous contents ended."""
    readers: dict[int, list[int]] = {}
    index = {t.id: i for i, t in enumerate(graph.tasks)}
    # the copy writing W:<name> -> the tasks reading it
    writer = {v: t.id for t in graph.tasks if t.kind == "weights" for v in t.writes}
    for t in graph.tasks:
        for v in t.reads:
            if v in writer:
                readers.setdefault(writer[v], []).append(t.id)
    last: dict[int, int] = {}  # slot -> the copy that last wrote it
    for t in graph.tasks:
        if t.id not in slot_of:
            continue
        j = slot_of[t.id]
        prev = last.get(j)
        if prev is not None:
            for r in readers.get(prev, []):
                if end_s[index[r]] > start_s[index[t.id]] + eps:
                    raise TaskGraphError(f"copy {t.name!r} overwrote staging buffer {j} at "
                                         f"t={start_s[index[t.id]]:.9f} s while {graph[r].name!r} read it "
                                         f"(until {end_s[index[r]]:.9f} s)")
        last[j] = t.id


__all__ = ["StreamerSizing", "WeightStreamer", "check_staging", "default_pinned_budget", "streamed_blocks",
           "streamer_sizing"]
