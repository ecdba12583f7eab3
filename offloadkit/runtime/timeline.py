"""The ``Timeline``: what ran on which lane, when — the one record both executors produce.

The simulator (virtual time) and the real executors (wall-clock time) both emit a
:class:`Timeline`: one :class:`TaskRecord` per task with its lane, name, layer, start, end, bytes
and FLOPs. Everything that draws, summarizes or compares runs works on this type, so a simulated
step and a measured one can be laid side by side.

Every timeline says where its numbers come from: ``source`` is ``"measured"`` (a real run, on the
machine named in ``machine``) or ``"simulated"`` (the cost model on the hardware profile named in
``machine``). Nothing downstream may drop that label.

The Chrome trace export (``to_chrome_trace``) opens in Perfetto / ``chrome://tracing``: ``ph: "X"``
events with microsecond timestamps, one track (``tid``) per lane, and ``ph: "M"`` metadata naming
the process and the lanes. :func:`chrome_trace` puts several timelines in one trace (a process each),
and :func:`timeline_from_chrome_trace` / :func:`timeline_from_file` read a saved one back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from offloadkit.errors import OffloadkitError

#: The four lanes of docs/DESIGN.md section 2, in the order they are drawn.
LANES: tuple[str, ...] = ("cpu", "gpu", "h2d", "d2h")
Source = Literal["measured", "simulated"]


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One task as it ran: times in seconds from the start of the timeline."""

    lane: str
    name: str
    start_s: float
    end_s: float
    layer: int | None = None
    kind: str = ""
    bytes_: int = 0
    flops: int = 0
    step: int = 0  # 0 = prefill, 1.. = decode steps (or any run-defined step index)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass
class Timeline:
    """An ordered collection of task records with its provenance."""

    source: Source
    machine: str  # the machine (measured) or hardware profile (simulated) the times belong to
    records: list[TaskRecord] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # model, plan, workload, engine...

    def __post_init__(self) -> None:
        if self.source not in ("measured", "simulated"):
            raise OffloadkitError(f"a timeline is 'measured' or 'simulated', not {self.source!r}")

    # ---- building ----------------------------------------------------------------------------

    def add(self, record: TaskRecord) -> None:
        if record.end_s < record.start_s:
            raise OffloadkitError(f"task {record.name!r} ends before it starts")
        self.records.append(record)

    def extend(self, records: Iterable[TaskRecord]) -> None:
        for r in records:
            self.add(r)

    def __iter__(self) -> Iterator[TaskRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    # ---- reading -----------------------------------------------------------------------------

    @property
    def label(self) -> str:
        """``"simulated on rtx4090-desktop"`` / ``"measured on <host>"``: put it on every figure."""
        return f"{self.source} on {self.machine}"

    @property
    def makespan_s(self) -> float:
        """From the first start to the last end."""
        if not self.records:
            return 0.0
        return max(r.end_s for r in self.records) - min(r.start_s for r in self.records)

    def lanes(self) -> list[str]:
        used = {r.lane for r in self.records}
        return [lane for lane in LANES if lane in used] + sorted(used - set(LANES))

    def busy_s(self, lane: str) -> float:
        """Time the lane spent running tasks (tasks on one lane never overlap)."""
        return sum(r.duration_s for r in self.records if r.lane == lane)

    def steps(self) -> list[int]:
        return sorted({r.step for r in self.records})

    def select(self, *, step: int | None = None, lane: str | None = None, layer: int | None = None) -> Timeline:
        """A timeline holding only the matching records (same provenance)."""
        keep = [r for r in self.records
                if (step is None or r.step == step) and (lane is None or r.lane == lane)
                and (layer is None or r.layer == layer)]
        return Timeline(self.source, self.machine, keep, dict(self.meta))

    def rebased(self, step: int | None = None) -> Timeline:
        """This timeline (only ``step`` if given) with times counted from its first start: a step drawn from 0."""
        tl = self.select(step=step)
        t0 = min((r.start_s for r in tl.records), default=0.0)
        tl.records = [TaskRecord(r.lane, r.name, r.start_s - t0, r.end_s - t0, r.layer, r.kind, r.bytes_, r.flops,
                                 r.step) for r in tl.records]
        return tl

    # ---- export ------------------------------------------------------------------------------

    def to_chrome_trace(self) -> dict[str, Any]:
        """The Chrome trace JSON object (``{"traceEvents": [...]}``) of this timeline."""
        pid = 1
        lanes = self.lanes()
        tids = {lane: i + 1 for i, lane in enumerate(lanes)}
        events: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
             "args": {"name": f"offloadkit ({self.label})"}},
        ]
        for lane in lanes:
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tids[lane], "args": {"name": lane}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tids[lane],
                           "args": {"sort_index": tids[lane]}})
        for r in sorted(self.records, key=lambda r: (r.start_s, r.lane)):
            events.append({
                "ph": "X", "name": r.name, "cat": r.kind or r.lane, "pid": pid, "tid": tids[r.lane],
                "ts": r.start_s * 1e6, "dur": r.duration_s * 1e6,
                "args": {"layer": r.layer, "bytes": r.bytes_, "flops": r.flops, "step": r.step},
            })
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"source": self.source, "machine": self.machine, **_jsonable(self.meta)}}

    def write_chrome_trace(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_chrome_trace()))
        return p

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "machine": self.machine, "meta": _jsonable(self.meta),
                "records": [asdict(r) for r in self.records]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timeline:
        try:
            return cls(data["source"], data["machine"], [TaskRecord(**r) for r in data["records"]],
                       dict(data.get("meta", {})))
        except (KeyError, TypeError) as e:
            raise OffloadkitError(f"not a saved offloadkit timeline: {e}") from e


# ---- reading traces back, and several timelines in one trace ------------------------------------


def timeline_from_chrome_trace(data: dict[str, Any], pid: int | None = None) -> Timeline:
    """A :class:`Timeline` from a Chrome trace written by ``Timeline.write_chrome_trace`` (one process:
    ``pid``, default the first with tasks); provenance from its ``otherData`` (else measured, unknown)."""
    events = data.get("traceEvents", [])
    xs = [e for e in events if e.get("ph") == "X"]
    pid = pid if pid is not None else (xs[0]["pid"] if xs else 1)
    lanes = {e["tid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") == pid}
    other = dict(data.get("otherData", {}))
    shown = other.pop("shown", None)
    if isinstance(shown, list):  # a trace this explorer exported: that process's provenance
        other = next((dict(s) for s in shown if s.get("pid") == pid), other)
    source, machine = other.pop("source", "measured"), other.pop("machine", "an unknown machine")
    meta = other.pop("meta", other)
    tl = Timeline(source, machine, [], dict(meta))
    for e in xs:
        if e["pid"] != pid:
            continue
        a, lane = e.get("args", {}), lanes.get(e["tid"], str(e["tid"]))
        tl.records.append(TaskRecord(lane, e["name"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6, a.get("layer"),
                                     "" if e.get("cat") == lane else e.get("cat", ""), int(a.get("bytes", 0)),
                                     int(a.get("flops", 0)), int(a.get("step", 0))))
    return tl


def timeline_from_file(path: str | Path) -> Timeline:
    """A saved timeline: Chrome trace JSON (``offloadkit generate --trace``, the timeline explorer's export) or
    ``to_dict`` JSON."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise OffloadkitError(f"{p}: not a readable JSON trace ({e})") from None
    if isinstance(data, dict) and "traceEvents" in data:
        return timeline_from_chrome_trace(data)
    if isinstance(data, dict) and "records" in data:
        return Timeline.from_dict(data)
    raise OffloadkitError(f"{p}: neither a Chrome trace nor a saved offloadkit timeline")


def chrome_trace(timelines: list[Timeline]) -> dict[str, Any]:
    """The timelines as one Chrome / Perfetto trace, one process each (pid 1, 2, ...), provenance in ``otherData``."""
    events: list[dict[str, Any]] = []
    shown = []
    for pid, tl in enumerate(timelines, start=1):
        for e in tl.to_chrome_trace()["traceEvents"]:
            events.append({**e, "pid": pid})
        shown.append({"pid": pid, "source": tl.source, "machine": tl.machine, "records": len(tl.records),
                      "meta": tl.to_dict()["meta"]})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"shown": shown}}


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
            for k, v in meta.items()}
