"""Tasks and task graphs: one step of inference as work on four lanes (docs/DESIGN.md section 2).

A :class:`Task` is one piece of work on one lane (``cpu``, ``gpu``, ``h2d``, ``d2h``): a norm, an
expert slice, an attention core, an activation copy, a weight copy. It carries what the cost model
priced (bytes, FLOPs, duration), its dependencies, and, for the executors, what it computes
(``layer``, ``expert``, ``rows``) and which values it reads and writes (``reads``/``writes``: names
like ``"L3.xf"``; a copy writes the value it reads, on the other device).

A :class:`TaskGraph` holds tasks in **issue order** (the order a lane runs its tasks). It refuses,
with :class:`~offloadkit.errors.TaskGraphError` naming the tasks: a dependency on a task that is not
in the graph, a cycle, an unknown lane, a duplicate id. Graphs built by
:mod:`offloadkit.runtime.stepgraph` only ever depend on earlier tasks, so validating them is one
pass; hand-made graphs may refer forward and are put in a stable topological order.

:func:`check_dataflow` is the executors' safety net: given a schedule, it checks that every value a
task reads was ready *on that task's device* before the task started.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from offloadkit.errors import TaskGraphError
from offloadkit.runtime.timeline import LANES

#: The device whose memory a lane's task writes into (copies write on the far side).
WRITES_ON = {"cpu": "cpu", "gpu": "gpu", "h2d": "gpu", "d2h": "cpu"}
#: The device whose memory a lane's task reads from.
READS_ON = {"cpu": "cpu", "gpu": "gpu", "h2d": "cpu", "d2h": "gpu"}


@dataclass(slots=True)
class Task:
    """One unit of work on one lane; ``duration_s`` comes from the cost model."""

    id: int
    lane: str
    kind: str
    name: str
    layer: int | None = None
    bytes_: int = 0
    flops: int = 0
    deps: tuple[int, ...] = ()
    duration_s: float = 0.0
    expert: int | None = None
    rows: tuple[int, int] | None = None
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()


class TaskGraph:
    """Tasks in issue order, with validation; see the module docstring."""

    def __init__(self, tasks: Iterable[Task] = ()) -> None:
        self.tasks: list[Task] = []
        self._index: dict[int, int] = {}
        self._forward = False  # some dependency refers to a task issued later
        for t in tasks:
            self.add_task(t)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, task_id: int) -> Task:
        return self.tasks[self._index[task_id]]

    def add_task(self, task: Task) -> int:
        if task.lane not in LANES:
            raise TaskGraphError(f"task {task.name!r} is on lane {task.lane!r}; lanes are {', '.join(LANES)}")
        if task.id in self._index:
            raise TaskGraphError(f"task {task.name!r} reuses id {task.id} of task {self[task.id].name!r}")
        if not self._forward and any(d not in self._index for d in task.deps):
            self._forward = True
        self._index[task.id] = len(self.tasks)
        self.tasks.append(task)
        return task.id

    def append(self, task: Task) -> int:
        """Append without checks: for builders whose tasks have fresh ids (their position) and depend only on
        earlier tasks, on a known lane (the step builder). ``validate`` still checks everything."""
        self._index[task.id] = len(self.tasks)
        self.tasks.append(task)
        return task.id

    def add(self, lane: str, kind: str, name: str, *, deps: Sequence[int] = (), duration_s: float = 0.0,
            **fields: object) -> int:
        """Append a task with the next free id; returns the id."""
        return self.add_task(Task(len(self.tasks), lane, kind, name, deps=tuple(deps), duration_s=duration_s,
                                  **fields))  # type: ignore[arg-type]

    # ---- validation -----------------------------------------------------------------------------------

    def dep_indices(self) -> list[tuple[int, ...]]:
        """Each task's dependencies as positions in ``tasks``; raises on a missing task."""
        idx = self._index
        out: list[tuple[int, ...]] = []
        for t in self.tasks:
            try:
                out.append(tuple(idx[d] for d in t.deps))
            except KeyError:
                missing = [d for d in t.deps if d not in idx]
                raise TaskGraphError(f"task {t.name!r} (id {t.id}) depends on task id(s) {missing} "
                                     f"that are not in the graph") from None
        return out

    def issue_order(self) -> list[int]:
        """Positions of the tasks in the order lanes issue them: insertion order where that respects the
        dependencies, else a stable topological order (earliest-inserted ready task first). Raises
        :class:`TaskGraphError` naming the tasks on a cycle."""
        deps = self.dep_indices()
        if not self._forward and all(d < i for i, ds in enumerate(deps) for d in ds):
            return list(range(len(self.tasks)))
        users: list[list[int]] = [[] for _ in self.tasks]
        waiting = [0] * len(self.tasks)
        for i, ds in enumerate(deps):
            for d in set(ds):
                users[d].append(i)
                waiting[i] += 1
        ready = [i for i, w in enumerate(waiting) if w == 0]
        heapq.heapify(ready)
        order: list[int] = []
        while ready:
            i = heapq.heappop(ready)
            order.append(i)
            for u in users[i]:
                waiting[u] -= 1
                if waiting[u] == 0:
                    heapq.heappush(ready, u)
        if len(order) < len(self.tasks):
            cycle = self._find_cycle(deps, {i for i, w in enumerate(waiting) if w > 0})
            raise TaskGraphError("the task graph has a cycle: " + " -> ".join(self.tasks[i].name for i in cycle))
        return order

    def _find_cycle(self, deps: list[tuple[int, ...]], stuck: set[int]) -> list[int]:
        """A cycle among ``stuck`` tasks (each has a stuck dependency), as a closed path of positions."""
        start = min(stuck)
        path, seen = [start], {start: 0}
        while True:
            nxt = next(d for d in deps[path[-1]] if d in stuck)
            if nxt in seen:
                cyc = path[seen[nxt]:] + [nxt]
                return cyc[::-1]  # dependency order: producer -> consumer
            seen[nxt] = len(path)
            path.append(nxt)

    def validate(self) -> None:
        self.issue_order()


def critical_path_s(graph: TaskGraph) -> float:
    """The longest path through the graph by task durations (lanes ignored): a lower bound on any schedule."""
    deps = graph.dep_indices()
    finish = [0.0] * len(graph.tasks)
    for i in graph.issue_order():
        finish[i] = max((finish[d] for d in deps[i]), default=0.0) + graph.tasks[i].duration_s
    return max(finish, default=0.0)


def check_dataflow(graph: TaskGraph, start_s: Sequence[float], end_s: Sequence[float], eps: float = 1e-12) -> None:
    """Check that each value a task reads was written on the task's device before it started.

    ``start_s``/``end_s`` are indexed like ``graph.tasks``. A value no task writes on the CPU (the
    step's token ids, weights in host memory) counts as present there from the start.
    """
    ready: dict[tuple[str, str], float] = {}  # (value, device) -> when its last part is written there
    for i, t in enumerate(graph.tasks):
        out = WRITES_ON[t.lane]
        for v in t.writes:
            ready[(v, out)] = max(ready.get((v, out), 0.0), end_s[i])
    for i, t in enumerate(graph.tasks):
        dev = READS_ON[t.lane]
        for v in t.reads:
            when = ready.get((v, dev))
            if when is None and dev == "cpu":
                continue  # an input of the step (token ids, weights in host memory)
            if when is None or when > start_s[i] + eps:
                raise TaskGraphError(f"task {t.name!r} reads {v} on the {dev} at t={start_s[i]:.9f} s, but it is "
                                     + ("never written there" if when is None else f"ready only at {when:.9f} s"))

__all__ = ["READS_ON", "WRITES_ON", "Task", "TaskGraph", "check_dataflow", "critical_path_s"]
