"""Layer fragments: the simulator's fast path, one compiled piece of task graph per distinct layer.

Building a step's task graph costs tens of microseconds per task (values, copies, staging, names),
and decode steps rarely repeat as a whole: which experts a token picks, and how many of their rows
are resident, differ from step to step. A *layer* does repeat: the same block kinds, the same token
counts, the same resident and streamed rows. :class:`FragmentCache` runs the ordinary
:class:`~offloadkit.runtime.stepgraph.StepBuilder` once per distinct layer (and once per distinct
prologue and epilogue) on a scratch graph whose first tasks are placeholders for what the layer
depends on outside itself (the producers of its input values, the compute tasks holding staging
buffers, the task before it when the plan is serial), and keeps the result as plain lists: lane,
duration and dependencies (inside the fragment, or on a placeholder slot). A step is then the
concatenation of fragments with the slots bound to real positions, and attention tasks re-priced
for the step's KV length, which is exactly the graph the builder would have produced
(``tests/test_sim.py`` checks the step times are equal to the last bit).

It serves shape-only simulations that do not record a timeline; recording, and numerics, use the
builder directly (they need names and tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from offloadkit.runtime.stepgraph import StepBuilder, _Part
from offloadkit.runtime.tasks import Task
from offloadkit.runtime.timeline import LANES

LANE_INDEX = {lane: i for i, lane in enumerate(LANES)}


@dataclass
class Fragment:
    """Tasks of one compiled piece: deps ``>= 0`` are inside it (relative), ``< 0`` are slot ``-1 - d``."""

    lanes: list[int]
    durs: list[float]
    deps: list[tuple[int, ...]]
    attention: list[tuple[int, str]]  # (relative index, lane) of attention tasks, re-priced per step
    exits: list[list[tuple[str, int, list[int]]]]  # per value the body returned: parts (device, nbytes, producers)
    weight_users: list[int]  # relative ids of CG computes, in order


@dataclass
class EntryPart:
    """A part of a value that a fragment reads, as the step has it so far (positions are absolute)."""

    device: str
    nbytes: int
    producers: list[int]


State = dict[str, list[EntryPart]]


class FragmentCache:
    """Compiles and stitches fragments for one (spec, plan, cost model); see the module docstring."""

    def __init__(self, builder_factory: Callable[[], StepBuilder]) -> None:
        self.new_builder = builder_factory
        self.cache: dict[tuple, Fragment] = {}
        self.k = 0

    # ---- recording ------------------------------------------------------------------------------------

    def record(self, state: State, wu_tail: list[int], serial_prev: bool,
               body: Callable[[StepBuilder], Sequence[str]]) -> Fragment:
        """Run ``body`` on a scratch builder seeded with placeholders for ``state`` and the staging tail."""
        b = self.new_builder()
        slots = 0

        def placeholder() -> int:
            nonlocal slots
            tid = len(b.graph.tasks)
            b.graph.append(Task(tid, "cpu", "placeholder", f"slot{slots}"))
            slots += 1
            return tid

        for value, parts in state.items():
            b.values[value] = {}
            for p in parts:
                part = _Part(f"{value}@{p.device}", p.device)
                part.nbytes = p.nbytes
                part.producers = [placeholder() for _ in p.producers]
                b.values[value][p.device] = part
        b.weight_users = [placeholder() for _ in wu_tail]
        if serial_prev:
            placeholder()  # the task before the fragment: emit() makes a serial plan's next task wait for it
        base = len(b.graph.tasks)
        outs = body(b)
        tasks = b.graph.tasks[base:]
        deps = [tuple(d - base if d >= base else -1 - d for d in t.deps) for t in tasks]
        exits = [[(p.device, p.nbytes, [x - base for x in p.producers]) for p in b.values.get(v, {}).values()]
                 for v in outs]
        return Fragment([LANE_INDEX[t.lane] for t in tasks], [t.duration_s for t in tasks], deps,
                        [(i, t.lane) for i, t in enumerate(tasks) if t.kind == "attention"], exits,
                        [x - base for x in b.weight_users[len(wu_tail):]])

    # ---- stitching ------------------------------------------------------------------------------------

    @staticmethod
    def state_key(state: State) -> tuple:
        return tuple((v, tuple((p.device, p.nbytes, len(p.producers)) for p in parts)) for v, parts in state.items())

    def add(self, step: StepLists, key: tuple, state: State, body: Callable[[StepBuilder], Sequence[str]],
            serial: bool, staging: int, exit_names: Sequence[str]) -> State:
        """Append the fragment for ``key`` to ``step`` (compiling it on first use); returns the exit state:
        the values ``body`` returned, under ``exit_names`` (the names the next fragment reads them by)."""
        tail = step.weight_users[-staging:] if staging else []
        serial_prev = serial and len(step.lanes) > 0
        full = (key, self.state_key(state), len(tail), serial_prev)
        frag = self.cache.get(full)
        if frag is None:
            frag = self.cache[full] = self.record(state, tail, serial_prev, body)
        slots = [x for parts in state.values() for p in parts for x in p.producers] + tail
        if serial_prev:
            slots.append(len(step.lanes) - 1)
        base = len(step.lanes)
        step.lanes += frag.lanes
        step.durs += frag.durs
        step.deps += [tuple(d + base if d >= 0 else slots[-1 - d] for d in ds) for ds in frag.deps]
        step.attention += [(i + base, lane) for i, lane in frag.attention]
        step.weight_users += [x + base for x in frag.weight_users]
        return {name: [EntryPart(dev, nb, [x + base for x in prods]) for dev, nb, prods in parts]
                for name, parts in zip(exit_names, frag.exits, strict=True)}


@dataclass
class StepLists:
    """One step's tasks as parallel lists in issue order (what the scheduler runs)."""

    lanes: list[int]
    durs: list[float]
    deps: list[tuple[int, ...]]
    attention: list[tuple[int, str]]
    weight_users: list[int]

    @classmethod
    def empty(cls) -> StepLists:
        return cls([], [], [], [], [])


__all__ = ["EntryPart", "Fragment", "FragmentCache", "StepLists"]
