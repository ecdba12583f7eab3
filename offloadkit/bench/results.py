"""The records of an end-to-end benchmark: one row per (engine, model, dtype, threads, test), as llama-bench.

``offloadkit bench`` (:mod:`offloadkit.bench.protocol`) measures offloadkit's engine and the real
llama.cpp alternately and returns a :class:`BenchRun`; the table printer, the JSON writer, the HTML
report (:mod:`offloadkit.bench.report`) and notebook 09 read only these types. Field names follow
llama-bench's JSON output (``n_prompt``, ``n_gen``, ``avg_ts``, ``stddev_ts``, ``samples_ts``) so that
a reader of one knows the other.

Every row is **measured** on the machine in :attr:`BenchRun.machine`; a row's ``sim_ts`` is the
simulator's **simulated** prediction of the same test on this machine's measured profile (None where
there is none), kept beside the measurement, never in its place.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ENGINES = ("offloadkit", "llama.cpp")


def mean(xs: list[float]) -> float:
    """The mean (NaN for no samples)."""
    return statistics.fmean(xs) if xs else math.nan


def sample_sd(xs: list[float]) -> float:
    """The sample standard deviation (n - 1, as llama-bench's ``stddev_ts``); 0 for fewer than 2 samples."""
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


@dataclass
class BenchRow:
    """One test of one engine: tokens/s of each repetition (measured) and their mean ± sd."""

    engine: str  # "offloadkit" or "llama.cpp"
    model: str  # benchmark model name or checkpoint folder name
    size_bytes: int  # weight bytes in the benchmarked dtype
    params: int
    backend: str  # "CPU" (offloadkit's CPU engine, llama.cpp's CPU backend)
    threads: int
    dtype: str  # "bfloat16", "float16", "float32"
    policy: str  # offloadkit: the plan policy ("cpu-only"); llama.cpp: "ngl 0"
    n_prompt: int
    n_gen: int
    samples_ts: list[float]
    sim_ts: float | None = None  # the simulator's prediction (simulated), or None
    sim_label: str = ""  # what the prediction was made on ("profile <name>") and by which policy

    @property
    def test(self) -> str:
        """``pp512``, ``tg128`` or ``pp512+tg128`` (llama-bench's names)."""
        parts = ([f"pp{self.n_prompt}"] if self.n_prompt else []) + ([f"tg{self.n_gen}"] if self.n_gen else [])
        return "+".join(parts)

    @property
    def avg_ts(self) -> float:
        return mean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        return sample_sd(self.samples_ts)

    def key(self) -> tuple[str, str, int, str]:
        """What pairs an offloadkit row with its llama.cpp row: (model, dtype, threads, test)."""
        return (self.model, self.dtype, self.threads, self.test)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"test": self.test, "avg_ts": self.avg_ts, "stddev_ts": self.stddev_ts}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchRow:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Ratio:
    """offloadkit / llama.cpp for one test: the mean and sd of the per-round ratios (alternated pairs)."""

    model: str
    dtype: str
    threads: int
    test: str
    ratios: list[float]

    @property
    def mean(self) -> float:
        return mean(self.ratios)

    @property
    def sd(self) -> float:
        return sample_sd(self.ratios)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"mean": self.mean, "sd": self.sd}


@dataclass
class BenchRun:
    """A whole ``offloadkit bench`` run: rows, ratios, memory-read measurements, step timelines."""

    machine: str  # CPU model and features (measured rows belong to it)
    rows: list[BenchRow] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    read_gbps: list[float] = field(default_factory=list)  # memory read measured before/after each pair
    timelines: dict[str, dict[str, Any]] = field(default_factory=dict)  # "prefill"/"decode" -> Timeline.to_dict()
    meta: dict[str, Any] = field(default_factory=dict)  # protocol settings, llama.cpp build, date

    def reads(self) -> list[float]:
        """The memory reads measured during the run (GB/s), the missing or broken ones left out."""
        return [g for g in self.read_gbps if g is not None and math.isfinite(g)]

    def read_summary(self) -> str:
        """``"46.6 ± 14.3 GB/s, min 35.1, max 66.7"``: mean ± sample sd of :meth:`reads` ("" if none)."""
        g = self.reads()
        return f"{mean(g):.1f} ± {sample_sd(g):.1f} GB/s, min {min(g):.1f}, max {max(g):.1f}" if g else ""

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "rows": [r.to_dict() for r in self.rows],
                "ratios": [r.to_dict() for r in self.ratios], "read_gbps": self.read_gbps,
                "timelines": self.timelines, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchRun:
        return cls(machine=d["machine"], rows=[BenchRow.from_dict(r) for r in d.get("rows", [])],
                   ratios=[Ratio(**{k: v for k, v in r.items() if k not in ("mean", "sd")})
                           for r in d.get("ratios", [])],
                   read_gbps=list(d.get("read_gbps", [])), timelines=dict(d.get("timelines", {})),
                   meta=dict(d.get("meta", {})))

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def read_json(cls, path: str | Path) -> BenchRun:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---- the table, as ``offloadkit bench`` prints it (the markdown printer and the HTML report share it) ------

#: The table's columns: llama-bench's, then the ratio (measured) and the simulator's figures (simulated).
TABLE_HEAD = ("model", "size", "params", "engine", "backend", "threads", "dtype", "policy/ngl", "test",
              "t/s (measured)", "offloadkit / llama.cpp", "t/s (simulated)", "sim / meas")
SHORT_DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def table_cells(run: BenchRun) -> list[list[str]]:
    """One list of strings per row of ``run``, in :data:`TABLE_HEAD`'s order ("" or "-" where nothing applies).

    The ratio (mean ± sd of the per-round ratios) sits on the offloadkit row of its test.
    """
    ratios = {(r.model, r.dtype, r.threads, r.test): r for r in run.ratios}
    out = []
    for row in run.rows:
        ratio = ratios.get(row.key()) if row.engine == "offloadkit" else None
        size = f"{row.size_bytes / 2**30:.2f} GiB"
        params = f"{row.params / 1e9:.2f} B" if row.params >= 1e8 else f"{row.params / 1e6:.1f} M"
        out.append([row.model, size, params, row.engine, row.backend, str(row.threads),
                    SHORT_DTYPES.get(row.dtype, row.dtype), row.policy, row.test,
                    f"{row.avg_ts:.2f} ± {row.stddev_ts:.2f}", f"{ratio.mean:.2f} ± {ratio.sd:.2f}" if ratio else "",
                    f"{row.sim_ts:.2f}" if row.sim_ts else "-",
                    f"{row.sim_ts / row.avg_ts:.2f}" if row.sim_ts else "-"])
    return out


__all__ = ["ENGINES", "SHORT_DTYPES", "TABLE_HEAD", "BenchRow", "BenchRun", "Ratio", "table_cells"]
