"""``offloadkit bench``: offloadkit's engine and the real llama.cpp on the same weights, llama-bench's protocol.

A speed comparison on a shared, noisy machine only means something when both sides run the same
work under the same conditions, close together in time. This module is that protocol:

- **the tests** are llama-bench's: ``pp<N>`` is one forward of N prompt tokens on an empty KV cache
  (logits for the last position only, as llama-bench asks of llama.cpp); ``tg<N>`` is N one-token
  forwards starting from an empty context. The tokens are random ids (no tokeniser), nothing is
  sampled (tokens/s counts forwards, as llama-bench does), and each test is warmed up once before it
  is timed (llama-bench warms up each of its own runs the same way);
- **the same weights**: a benchmark model (:mod:`offloadkit.bench.models`) or any checkpoint, exported
  once per dtype to GGUF (:mod:`offloadkit.bench.gguf_export`) for llama.cpp, which runs as
  ``llama-bench -ngl 0`` (its CPU backend) with the same thread count;
- **alternation**: every round times one repetition of each engine, in alternating order (offloadkit
  first in even rounds, llama.cpp first in odd ones), and the per-round ratio offloadkit/llama.cpp is
  kept: the ratio's mean ± sd is the comparison, because absolute speeds on this kind of machine drift
  by 2x within an hour;
- **the machine's memory read** (:func:`offloadkit.hardware.stream.measure_read`) is measured before
  and after every pair, and reported beside the numbers;
- **the simulator's prediction** of each test (``sim_ts``, **simulated**) on a measured profile of
  this machine (:func:`offloadkit.bench.calibrate.predict_engine`) sits beside each measured row.

One measured prefill and one decode step of offloadkit's engine are kept as timelines for the
report. The result is a :class:`~offloadkit.bench.results.BenchRun`; :func:`format_markdown` prints it
like llama-bench's markdown table, with the ratio and the simulated column added.

What it refuses: unknown engines, dtypes or tests without tokens (:class:`BenchError`); a missing
llama.cpp build is not an error when ``offloadkit`` alone was asked for, and is reported as skipped
(``run.meta["skipped"]``) when both were asked for and ``require_llamacpp`` is False.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offloadkit.bench.results import ENGINES, TABLE_HEAD, BenchRow, BenchRun, Ratio, table_cells
from offloadkit.errors import BenchError
from offloadkit.model.dtypes import normalize_dtype

#: The metadata key under which a run lists what it could not measure (e.g. llama.cpp not built).
SKIPPED = "skipped"


@dataclass
class BenchSettings:
    """What to measure: llama-bench's ``-m -p -n -t -r`` lists, plus dtypes, engines and the profile.

    ``profile`` is the hardware profile the ``sim_ts`` column is simulated on: a
    :class:`~offloadkit.hardware.profile.HardwareProfile`, a TOML path, ``"measure"`` (measure this
    machine quickly at the start of the run) or None (no simulated column).
    """

    models: list[str] = field(default_factory=lambda: ["bench-moe"])
    dtypes: list[str] = field(default_factory=lambda: ["bfloat16"])
    threads: list[int] = field(default_factory=lambda: [default_threads()])
    n_prompt: list[int] = field(default_factory=lambda: [512])
    n_gen: list[int] = field(default_factory=lambda: [128])
    repetitions: int = 5
    engines: tuple[str, ...] = ENGINES
    profile: Any = None
    require_llamacpp: bool = False
    timelines: bool = True
    seed: int = 0

    def tests(self) -> list[tuple[int, int]]:
        """``(n_prompt, n_gen)`` of every test, prompt tests first (llama-bench's order)."""
        return [(p, 0) for p in self.n_prompt if p > 0] + [(0, g) for g in self.n_gen if g > 0]

    def check(self) -> None:
        bad = [e for e in self.engines if e not in ENGINES]
        if bad or not self.engines:
            raise BenchError(f"unknown engine(s) {', '.join(bad) or '(none)'}; choose from {', '.join(ENGINES)}")
        for d in self.dtypes:
            try:
                normalize_dtype(d)
            except Exception as err:
                raise BenchError(f"dtype {d!r}: {err}") from None
        if self.repetitions < 1:
            raise BenchError(f"repetitions must be at least 1, got {self.repetitions}")
        if any(t < 1 for t in self.threads) or not self.threads:
            raise BenchError(f"threads must be positive, got {self.threads}")
        if not self.tests():
            raise BenchError("nothing to measure: give a prompt length (-p) or a generation length (-n) above 0")
        if any(n < 0 for n in (*self.n_prompt, *self.n_gen)):
            raise BenchError("prompt and generation lengths cannot be negative")
        if not self.models:
            raise BenchError("no model to measure")


def default_threads() -> int:
    """The threads offloadkit's kernels use by default (Numba's count: the cores it may use)."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


@contextlib.contextmanager
def threads_set(n: int) -> Iterator[None]:
    """Run offloadkit's kernels (Numba) and torch's ops on ``n`` threads inside the block."""
    import numba

    if n > numba.config.NUMBA_NUM_THREADS:
        raise BenchError(f"{n} threads asked for, but offloadkit's kernels were started with at most "
                         f"{numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS; the machine has {os.cpu_count()} CPUs)")
    old_numba, old_torch = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(n)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(old_numba)
        torch.set_num_threads(old_torch)


# ---- one side: offloadkit's engine --------------------------------------------------------------


@dataclass
class BenchModel:
    """A benchmark subject: its name, checkpoint folder, spec, and (lazily) engine and GGUF file."""

    name: str
    dtype: str
    folder: Path
    spec: Any
    engine: Any = None
    gguf: Path | None = None


def open_bench_model(name: str, dtype: str, progress: bool) -> BenchModel:
    """A benchmark model (made in ``dtype`` if needed) or a checkpoint of that dtype, opened memory-mapped."""
    from offloadkit.bench.models import bench_model, is_bench_model
    from offloadkit.model.checkpoint import open_checkpoint
    from offloadkit.model.zoo import resolve_model

    folder = bench_model(name, dtype, progress=progress) if is_bench_model(name) else resolve_model(name)
    ckpt = open_checkpoint(folder)
    if ckpt.spec.dtype != dtype:
        raise BenchError(f"{folder} stores {ckpt.spec.dtype} weights, not {dtype}: benchmark it with "
                         f"--dtype {ckpt.spec.dtype} (offloadkit measures weights as they are stored), or pick "
                         f"a benchmark model, which is made in any dtype")
    return BenchModel(name if is_bench_model(name) else folder.name, dtype, folder, ckpt.spec, engine=ckpt)


def _engine(m: BenchModel) -> Any:
    from offloadkit.runtime.cpu_engine import CpuEngine

    if not isinstance(m.engine, CpuEngine):
        m.engine = CpuEngine(m.spec, m.engine)
    return m.engine


def _forward_last(engine: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """One forward computing the last position's logits only (what llama-bench asks of llama.cpp)."""
    return engine.forward(ids, cache, logits="last")


class OffloadkitRunner:
    """Times llama-bench's tests on offloadkit's CPU engine (one repetition per call)."""

    def __init__(self, model: BenchModel, seed: int = 0) -> None:
        self.model = model
        self.engine = _engine(model)
        self.rng = np.random.default_rng(seed)

    def random_ids(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self.rng.integers(0, self.model.spec.vocab_size, size=(1, n), dtype=np.int64))

    def run_once(self, n_prompt: int, n_gen: int) -> float:
        """Seconds of one repetition: a prompt forward of ``n_prompt`` tokens, then ``n_gen`` one-token steps."""
        e = self.engine
        cache = e.new_cache(1, n_prompt + n_gen)
        prompt, gen = self.random_ids(n_prompt), self.random_ids(n_gen)
        t0 = time.perf_counter()
        if n_prompt:
            _forward_last(e, prompt, cache)
        for i in range(n_gen):
            _forward_last(e, gen[:, i:i + 1], cache)
        return time.perf_counter() - t0

    def warm_up(self, n_prompt: int, n_gen: int) -> None:
        """llama-bench's warm-up: a prompt of the test's length, or one generated token."""
        self.run_once(n_prompt, 0) if n_prompt else self.run_once(0, 1)

    def step_timelines(self, n_prompt: int) -> dict[str, dict[str, Any]]:
        """Measured timelines of one prefill (``n_prompt`` tokens) and the decode step after it."""
        e = self.engine
        cache = e.new_cache(1, n_prompt + 1)
        _forward_last(e, self.random_ids(n_prompt), cache)
        _forward_last(e, self.random_ids(1), cache)
        return {"prefill": e.timeline.select(step=0).to_dict(), "decode": e.timeline.select(step=1).to_dict()}


# ---- the run ------------------------------------------------------------------------------------------


def _read_gbps() -> float:
    from offloadkit.hardware.stream import measure_read

    return float(measure_read().gbps)


def _resolve_profile(profile: Any, threads: int, progress: bool) -> Any:
    """The profile the simulated column uses at ``threads`` threads (called inside :func:`threads_set`):
    a given profile as it is, or with ``"measure"`` this machine measured now on those threads (a profile
    holds one thread count's speeds: a 2-thread profile would price a 1-thread run twice too fast)."""
    if profile is None or profile == "none":
        return None
    from offloadkit.hardware.profile import HardwareProfile

    if isinstance(profile, HardwareProfile):
        return profile
    if profile == "measure":
        from offloadkit.hardware.probe import build_profile, default_name, measure

        if progress:
            print(f"measuring this machine's profile on {threads} threads for the simulated column "
                  f"(offloadkit profile --quick) ...", flush=True)
        return build_profile(measure(quick=True, progress=progress), name=f"{default_name()}-t{threads}")
    from offloadkit.hardware.catalog import load_profile

    return load_profile(profile)


def _predict(spec: Any, profile: Any, n_prompt: int, n_gen: int, engine: str) -> tuple[float | None, str]:
    """The simulator's tokens/s for a test, or (None, why not)."""
    if profile is None:
        return None, ""
    from offloadkit.bench.calibrate import predict_engine

    policy = "cpu-only" if engine == "offloadkit" else "llamacpp"
    seconds = predict_engine(spec, profile, n_prompt, n_gen, policy=policy)
    return (n_prompt + n_gen) / seconds, f"simulated on profile {profile.name} ({policy} policy)"


def _row(engine: str, m: BenchModel, threads: int, n_prompt: int, n_gen: int, samples: list[float],
         sim: tuple[float | None, str]) -> BenchRow:
    s = m.spec
    return BenchRow(engine=engine, model=m.name, size_bytes=int(s.total_bytes), params=int(s.total_params),
                    backend="CPU", threads=threads, dtype=m.dtype,
                    policy="cpu-only" if engine == "offloadkit" else "ngl 0", n_prompt=n_prompt, n_gen=n_gen,
                    samples_ts=samples, sim_ts=sim[0], sim_label=sim[1])


def _llamacpp_available(settings: BenchSettings) -> str | None:
    """None when llama.cpp can run, else why not (an error when it was required)."""
    if "llama.cpp" not in settings.engines:
        return None
    from offloadkit.bench.llamacpp import find_llamacpp

    try:
        find_llamacpp()
    except BenchError as err:
        if settings.require_llamacpp:
            raise
        return str(err)
    return None


def run_bench(settings: BenchSettings, *, progress: bool = True,
              log: Callable[[str], None] | None = None) -> BenchRun:
    """Measure every (model, dtype, threads, test) of ``settings`` on each engine, alternated; see the module."""
    from tqdm.auto import tqdm

    from offloadkit.hardware.machine import machine_label

    settings.check()
    say = log or (lambda msg: tqdm.write(msg) if progress else None)
    skipped: list[str] = []
    why_not = _llamacpp_available(settings)
    engines = list(settings.engines)
    if why_not is not None:
        engines.remove("llama.cpp")
        skipped.append(f"llama.cpp: {why_not}")
        say(f"llama.cpp skipped: {why_not}")
    if not engines:
        raise BenchError(f"no engine left to measure ({'; '.join(skipped)})")
    profiles: dict[int, Any] = {}  # threads -> the profile of the simulated column
    run = BenchRun(machine=machine_label(threads=max(settings.threads)).rsplit(",", 1)[0],
                   meta={"protocol": "llama-bench (pp: one prompt forward on an empty cache, last logits; "
                                     "tg: one-token forwards from an empty context; one warm-up; engines "
                                     "alternated per repetition)",
                         "repetitions": settings.repetitions, "engines": engines,
                         "date": _dt.datetime.now().isoformat(timespec="seconds"),
                         "profile": None, SKIPPED: skipped})
    total = len(settings.models) * len(settings.dtypes) * len(settings.threads) * len(settings.tests()) \
        * settings.repetitions
    bar = tqdm(total=total, desc="offloadkit bench", unit="round", disable=not progress)
    for name in settings.models:
        for dtype in (normalize_dtype(d) for d in settings.dtypes):
            m = open_bench_model(name, dtype, progress)
            ok = OffloadkitRunner(m, settings.seed) if "offloadkit" in engines else None
            if "llama.cpp" in engines:
                from offloadkit.bench.gguf_export import gguf_for

                m.gguf = gguf_for(m.folder, dtype, progress=progress)
            for threads in settings.threads:
                with threads_set(threads):
                    if threads not in profiles:
                        profiles[threads] = _resolve_profile(settings.profile, threads, progress)
                    profile = profiles[threads]
                    for n_prompt, n_gen in settings.tests():
                        _measure_test(run, m, ok, engines, threads, n_prompt, n_gen, settings, profile, bar)
                    if ok is not None and settings.timelines and not run.timelines:
                        run.timelines = ok.step_timelines(max(settings.n_prompt) or 16)
            m.engine = None  # let the engine and its mapped weights go before the next model
    bar.close()
    names = sorted({p.name for p in profiles.values() if p is not None})
    run.meta["profile"] = ", ".join(names) or None
    run.meta["llamacpp_build"] = _llamacpp_build() if "llama.cpp" in engines else None
    return run


def _measure_test(run: BenchRun, m: BenchModel, ok: OffloadkitRunner | None, engines: list[str], threads: int,
                  n_prompt: int, n_gen: int, settings: BenchSettings, profile: Any, bar: Any) -> None:
    """One test: warm offloadkit up, then ``repetitions`` rounds of alternated single repetitions."""
    from offloadkit.bench.llamacpp import run_llama_bench

    tokens = n_prompt + n_gen
    samples: dict[str, list[float]] = {e: [] for e in engines}
    if ok is not None:
        ok.warm_up(n_prompt, n_gen)
    for r in range(settings.repetitions):
        order = engines if r % 2 == 0 else engines[::-1]
        run.read_gbps.append(_read_gbps())
        for engine in order:
            if engine == "offloadkit":
                samples[engine].append(tokens / ok.run_once(n_prompt, n_gen))
            else:
                (res,) = run_llama_bench(m.gguf, n_prompt=n_prompt, n_gen=n_gen, threads=threads, repetitions=1)
                samples[engine].append(float(res.samples_ts[0]))
        run.read_gbps.append(_read_gbps())
        bar.update(1)
    for engine in engines:
        run.rows.append(_row(engine, m, threads, n_prompt, n_gen, samples[engine],
                             _predict(m.spec, profile, n_prompt, n_gen, engine)))
    if len(engines) == 2:
        ratios = [a / b for a, b in zip(samples["offloadkit"], samples["llama.cpp"], strict=True)]
        run.ratios.append(Ratio(m.name, m.dtype, threads, run.rows[-1].test, ratios))


def _llamacpp_build() -> str | None:
    from offloadkit.bench.llamacpp import build_id

    with contextlib.suppress(BenchError):
        return build_id()
    return None


# ---- printing -----------------------------------------------------------------------------------------

def format_markdown(run: BenchRun) -> str:
    """llama-bench's markdown table, plus the ratio (measured) and the simulator's figures (simulated)."""
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "|".join(["---"] * len(TABLE_HEAD)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_cells(run)]
    out = ["\n".join(lines), ""]
    if run.reads():
        out.append(f"memory read during the run (measured before and after each pair): {run.read_summary()}")
    out.append(f"measured on {run.machine}; {run.meta.get('repetitions')} alternated repetitions per test"
               + (f"; llama.cpp build {run.meta['llamacpp_build']}" if run.meta.get("llamacpp_build") else ""))
    sim_labels = sorted({r.sim_label for r in run.rows if r.sim_label})
    if sim_labels:
        out.append("t/s (simulated): " + "; ".join(sim_labels))
    for s in run.meta.get(SKIPPED, []):
        out.append(f"skipped: {s}")
    return "\n".join(out)


__all__ = ["BenchSettings", "OffloadkitRunner", "default_threads", "format_markdown", "open_bench_model", "run_bench",
           "threads_set"]
