"""offloadkit's CPU engine against llama.cpp on ``bench-moe``, llama-bench's protocol, alternated (measured).

Why it exists: issue 10 asks for a CPU lane at least as fast as llama.cpp's (offloadkit / llama.cpp >= 1.0
for pp512 and tg128, bf16 and f32, 1 and 2 threads). This is the measuring loop behind each change to
:mod:`offloadkit.runtime.cpu_engine` and :mod:`offloadkit.kernels.cpu`, and the place the closing figures
come from. The protocol is llama-bench's (tools/llama-bench/llama-bench.cpp in llama.cpp's tree):

- ``pp512``: one forward of 512 random prompt tokens on an empty KV cache, logits of the last position
  only (llama-bench decodes the prompt through ``common_batch_get_one``, which marks only the last
  token as an output; common/common.cpp);
- ``tg128``: 128 one-token forwards starting from an empty context, timed together;
- one warm-up of each test before timing; tokens/s = tokens / seconds; no tokenisation or sampling
  inside the timing;
- the two engines alternate per repetition (offloadkit first in even rounds), llama.cpp as
  ``llama-bench -r 1 -ngl 0 -t T`` on the GGUF export of the same weights, and the memory read
  (:func:`offloadkit.hardware.stream.measure_read`) is measured before and after every pair: this
  machine's bandwidth moves by 2x within an hour, so only the per-round ratio means something.

``--profile`` adds what the engine's own measured timeline says about one prefill and one decode step:
time per task kind, the decode step's effective read bandwidth (bytes the step reads / its time) beside
the machine's read, and the prefill's GFLOP/s beside torch's f32 GEMM of the expert shape.

    .venv/bin/python benchmarks/cpu_engine_speed.py --dtypes bf16,f32 --threads 1,2 -r 3
    .venv/bin/python benchmarks/cpu_engine_speed.py --dtypes bf16 --threads 2 --no-llamacpp --profile

Wrap it in ``flock /tmp/cpu-heavy.lock`` on a shared machine. Every figure printed is measured, on the
machine named in the output (CPU model and the extensions the kernels chose their paths by).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from offloadkit.bench.protocol import threads_set
from offloadkit.hardware.machine import machine_label
from offloadkit.hardware.stream import measure_read
from offloadkit.model.dtypes import normalize_dtype
from offloadkit.runtime.cpu_engine import CpuEngine

SHORT = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}


@dataclass
class Pair:
    """Per-round tokens/s of both engines for one test, and the reads measured around each pair."""

    ok: list[float] = field(default_factory=list)
    llama: list[float] = field(default_factory=list)
    read_gbps: list[float] = field(default_factory=list)


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"


class Runner:
    """llama-bench's two tests on offloadkit's CPU engine."""

    def __init__(self, engine: CpuEngine, seed: int = 0) -> None:
        self.engine, self.rng = engine, np.random.default_rng(seed)

    def ids(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self.rng.integers(0, self.engine.spec.vocab_size, size=(1, n), dtype=np.int64))

    def pp(self, n: int) -> float:
        cache, ids = self.engine.new_cache(1, n), self.ids(n)
        t0 = time.perf_counter()
        self.engine.forward(ids, cache, logits="last")
        return n / (time.perf_counter() - t0)

    def tg(self, n: int) -> float:
        cache, ids = self.engine.new_cache(1, n), self.ids(n)
        t0 = time.perf_counter()
        for i in range(n):
            self.engine.forward(ids[:, i:i + 1], cache, logits="last")
        return n / (time.perf_counter() - t0)


def llama_once(gguf, test: str, n: int, threads: int) -> float:
    from offloadkit.bench.llamacpp import run_llama_bench

    rec = run_llama_bench(gguf, n_prompt=n if test == "pp" else 0, n_gen=n if test == "tg" else 0,
                          threads=threads, repetitions=1)
    return float(rec[0].samples_ts[0])


def model_files(model: str, dtype: str, want_gguf: bool) -> tuple[Path, Path | None]:
    """(checkpoint folder, GGUF file or None) of a benchmark model name, ``demo`` or a checkpoint folder."""
    from offloadkit.bench.gguf_export import export_gguf, gguf_path
    from offloadkit.bench.models import bench_model, cache_dir, is_bench_model

    if is_bench_model(model):
        return bench_model(model, dtype), gguf_path(model, dtype) if want_gguf else None
    from offloadkit.model.zoo import resolve_model

    folder = resolve_model(model)
    out = cache_dir() / "gguf" / f"{folder.name}-{dtype}.gguf"
    if want_gguf and not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        export_gguf(folder, out, dtype)
    return folder, out if want_gguf else None


def profile(runner: Runner, n_prompt: int) -> None:
    """Per-kind times of one prefill and one decode step (measured timeline), with physical limits beside."""
    e = runner.engine
    cache = e.new_cache(1, n_prompt + 40)
    e.forward(runner.ids(n_prompt), cache, logits="last")
    steps = 32
    t0 = time.perf_counter()
    for _ in range(steps):
        e.forward(runner.ids(1), cache, logits="last")
    step_s = (time.perf_counter() - t0) / steps
    tl = e.timeline
    for label, recs, div, wall in (("prefill", tl.select(step=0), 1, None),
                                   ("decode step", [r for r in tl if r.step > 0], steps, step_s)):
        by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
        for r in recs:
            acc = by_kind[r.kind]
            acc[0] += (r.end_s - r.start_s) / div
            acc[1] += r.bytes_ / div
            acc[2] += r.flops / div
            acc[3] += 1 / div
        task_s = sum(v[0] for v in by_kind.values())
        bytes_ = sum(v[1] for v in by_kind.values())
        flops = sum(v[2] for v in by_kind.values())
        span = wall if wall is not None else max(r.end_s for r in recs) - min(r.start_s for r in recs)
        print(f"  {label}: {span * 1e3:.2f} ms wall, {task_s * 1e3:.2f} ms in tasks, "
              f"{(span - task_s) * 1e3:.2f} ms outside; {bytes_ / span / 1e9:.1f} GB/s effective read, "
              f"{flops / span / 1e9:.1f} GFLOP/s (measured)")
        for kind, (s, b, f, calls) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
            print(f"    {kind:14s} {s * 1e3:9.3f} ms  {calls:5.1f} calls  {b / max(s, 1e-12) / 1e9:6.1f} GB/s  "
                  f"{f / max(s, 1e-12) / 1e9:6.1f} GFLOP/s")
    spec = e.spec
    x = torch.randn(n_prompt * spec.top_k // max(spec.n_experts, 1) or n_prompt, spec.hidden_size)
    w = torch.randn(spec.moe_intermediate_size or spec.intermediate_size, spec.hidden_size)
    torch.mm(x, w.T)
    t0 = time.perf_counter()
    for _ in range(5):
        torch.mm(x, w.T)
    gemm = 5 * 2 * x.shape[0] * w.numel() / (time.perf_counter() - t0)
    print(f"  beside it: memory read {measure_read().gbps:.1f} GB/s; torch f32 GEMM [{x.shape[0]} x "
          f"{x.shape[1]}] x [{x.shape[1]} x {w.shape[0]}] {gemm / 1e9:.1f} GFLOP/s (measured)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="bench-moe", help="a benchmark model, 'demo' or a checkpoint folder "
                    "(whose dtype --dtypes must name)")
    ap.add_argument("--dtypes", default="bf16,f32")
    ap.add_argument("--threads", default="2")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--tests", default="pp,tg", help="pp, tg or both")
    ap.add_argument("--no-llamacpp", action="store_true", help="offloadkit alone (no ratio)")
    ap.add_argument("--profile", action="store_true", help="print the measured timeline breakdown too")
    args = ap.parse_args()

    from offloadkit.model.checkpoint import open_checkpoint

    tests = [t for t in args.tests.split(",") if t]
    threads = [int(t) for t in args.threads.split(",")]
    rows: list[tuple[str, int, str, Pair]] = []
    for dtype in (normalize_dtype(d) for d in args.dtypes.split(",")):
        folder, gguf = model_files(args.model, dtype, not args.no_llamacpp)
        ckpt = open_checkpoint(folder)
        runner = Runner(CpuEngine(ckpt.spec, ckpt))
        for t in threads:
            with threads_set(t):
                for test in tests:
                    n = args.n_prompt if test == "pp" else args.n_gen
                    run = runner.pp if test == "pp" else runner.tg
                    run(n if test == "pp" else 4)  # the warm-up
                    pair = Pair()
                    for r in range(args.repetitions):
                        pair.read_gbps.append(measure_read().gbps)
                        order = ("ok", "llama") if r % 2 == 0 else ("llama", "ok")
                        for side in order:
                            if side == "ok":
                                pair.ok.append(run(n))
                            elif gguf is not None:
                                pair.llama.append(llama_once(gguf, test, n, t))
                        pair.read_gbps.append(measure_read().gbps)
                    rows.append((SHORT[dtype], t, f"{test}{n}", pair))
                    ratio = [a / b for a, b in zip(pair.ok, pair.llama, strict=False)]
                    print(f"{args.model} {SHORT[dtype]} t{t} {test}{n}: offloadkit {_ms(pair.ok)} t/s, llama.cpp "
                          f"{_ms(pair.llama)} t/s, ratio {_ms(ratio)}; read {_ms(pair.read_gbps)} GB/s "
                          f"(measured on {machine_label(t)})", flush=True)
                if args.profile:
                    print(f"profile {SHORT[dtype]} t{t}:")
                    profile(runner, args.n_prompt)
    print("\n| dtype | threads | test | offloadkit t/s | llama.cpp t/s | offloadkit / llama.cpp | read GB/s |")
    print("|---|---|---|---|---|---|---|")
    for dtype, t, test, pair in rows:
        ratio = [a / b for a, b in zip(pair.ok, pair.llama, strict=False)]
        print(f"| {dtype} | {t} | {test} | {_ms(pair.ok)} | {_ms(pair.llama)} | {_ms(ratio)} | {_ms(pair.read_gbps)} |")
    print(f"measured on {machine_label(max(threads))} ({args.repetitions} alternated rounds per test; "
          f"model {args.model})")


if __name__ == "__main__":
    main()
