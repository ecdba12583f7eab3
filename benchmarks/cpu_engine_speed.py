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

The measuring is ``offloadkit bench``'s own (:func:`offloadkit.bench.protocol.run_bench`); this script
adds the engine's timeline breakdown (``--profile``) and the model choices its development needed.

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
import time

import torch

from offloadkit.bench.protocol import (
    BenchSettings,
    OffloadkitRunner,
    format_markdown,
    open_bench_model,
    run_bench,
    threads_set,
)
from offloadkit.hardware.stream import measure_read
from offloadkit.model.dtypes import normalize_dtype


def profile(runner: OffloadkitRunner, n_prompt: int) -> None:
    """Per-kind times of one prefill and one decode step (measured timeline), with physical limits beside."""
    e = runner.engine
    cache = e.new_cache(1, n_prompt + 40)
    e.forward(runner.random_ids(n_prompt), cache, logits="last")
    steps = 32
    t0 = time.perf_counter()
    for _ in range(steps):
        e.forward(runner.random_ids(1), cache, logits="last")
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

    tests = [t for t in args.tests.split(",") if t]
    threads = [int(t) for t in args.threads.split(",")]
    dtypes = [normalize_dtype(d) for d in args.dtypes.split(",")]
    run = run_bench(BenchSettings(models=[args.model], dtypes=dtypes, threads=threads,
                                  n_prompt=[args.n_prompt] if "pp" in tests else [],
                                  n_gen=[args.n_gen] if "tg" in tests else [], repetitions=args.repetitions,
                                  engines=("offloadkit",) if args.no_llamacpp else ("offloadkit", "llama.cpp"),
                                  require_llamacpp=not args.no_llamacpp, timelines=False))
    print(format_markdown(run))
    if args.profile:
        for dtype in dtypes:
            runner = OffloadkitRunner(open_bench_model(args.model, dtype, progress=True))
            for t in threads:
                with threads_set(t):
                    print(f"profile {dtype} t{t}:")
                    profile(runner, args.n_prompt)


if __name__ == "__main__":
    main()
