"""The simulator against the real CPU engine: simulated / measured per phase, on the benchmark models (issue 10).

    python benchmarks/calibration.py                                   # all four models, bf16 and f32
    python benchmarks/calibration.py --models bench-moe-small --dtypes bfloat16 --kinds
    python benchmarks/calibration.py --quick-profile --json out.json   # a faster, rougher profile

The target is |simulated / measured - 1| <= 15% per phase for models of ~100 M to ~1 B parameters, dense
and MoE, prompts of 16-512 tokens. One run measures a fresh profile of this machine first (``offloadkit
profile``, in-process), then for every model and dtype: the read bandwidth, and for each test (``pp<N>``: one
forward of N tokens on an empty cache; ``tg<N>``: N one-token forwards from an empty context; logits for the
last position, as llama-bench) the engine's wall time over ``--reps`` repetitions after a warm-up
(**measured**, median), against :func:`offloadkit.bench.calibrate.predict_engine` on that profile with
uniform routing (**simulated**, what ``offloadkit bench`` prints as ``sim_ts``), and with the engine's own
routing replayed. The read bandwidth measured before and after each test is printed beside it (it is not
used to correct the prediction: on this machine the engine's decode did not follow its swings). ``--kinds``
adds each test's task kinds (which ones the simulator misprices).

The machine is shared and its memory read moves by up to 2x within an hour: run it under
``flock /tmp/cpu-heavy.lock``, in parts (``--models``, ``--dtypes``) if long; the read is printed before
each model. Timings are never tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from offloadkit.bench.calibrate import CountsRouting, hold, measure_phase, open_engine, predict_engine
from offloadkit.bench.models import BENCH_MODELS, bench_model
from offloadkit.bench.protocol import threads_set
from offloadkit.hardware import load_profile, save_profile
from offloadkit.hardware.machine import machine_label
from offloadkit.hardware.probe import build_profile, measure
from offloadkit.hardware.stream import measure_read

MODELS = ("bench-moe-small", "bench-dense-small", "bench-moe", "bench-dense")


def tests(prompts: list[int], gen: list[int]) -> list[tuple[int, int]]:
    return [(p, 0) for p in prompts] + [(0, g) for g in gen]


def run_model(name: str, dtype: str, profile: Any, prompts: list[int], gen: list[int], reps: int,
              kinds: bool) -> list[dict[str, Any]]:
    """Measured and simulated seconds of every test on one benchmark model in one dtype."""
    from offloadkit.runtime.cpu_engine import CpuEngine

    engine = open_engine(bench_model(name, dtype))
    assert isinstance(engine, CpuEngine)
    rows = []
    for p, g in tests(prompts, gen):
        read = measure_read(nbytes=256 * 2**20, repeats=3, budget_s=0.2).gbps
        m = measure_phase(engine, p, g, reps=reps, logits="last")
        after = measure_read(nbytes=256 * 2**20, repeats=3, budget_s=0.2).gbps
        sim = predict_engine(engine.spec, profile, p, g)
        replay = predict_engine(engine.spec, profile, p, g, routing=CountsRouting(m.counts)) if engine.spec.is_moe \
            else sim
        test = f"pp{p}" if p else f"tg{g}"
        row = {"model": name, "dtype": dtype, "test": test, "params": engine.spec.total_params,
               "measured_s": m.wall_s, "measured_sd_s": statistics.pstdev(m.samples_s), "samples_s": m.samples_s,
               "simulated_s": sim, "simulated_replay_s": replay, "read_gbps": [read, after],
               "ratio": sim / m.wall_s, "ratio_replay": replay / m.wall_s}
        rows.append(row)
        print(f"| {name} | {dtype} | {test} | {m.wall_s * 1e3:.1f} ± {row['measured_sd_s'] * 1e3:.1f} | "
              f"{sim * 1e3:.1f} | {row['ratio']:.2f} | {row['ratio_replay']:.2f} | {read:.1f} / {after:.1f} |",
              flush=True)
        if kinds:
            h = hold(engine, profile, p or 0, g or 0, reps=reps)
            print("\n" + h.table() + "\n", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(BENCH_MODELS)}")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--prompts", default="16,128,512", help="pp tests (prompt lengths)")
    ap.add_argument("--gen", default="32", help="tg tests (generated tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick-profile", action="store_true", help="measure the profile with --quick sizes")
    ap.add_argument("--profile", help="use this profile TOML instead of measuring one (for looking into a run)")
    ap.add_argument("--save-profile", help="write the profile measured here to this TOML")
    ap.add_argument("--kinds", action="store_true", help="also print simulated / measured per task kind")
    ap.add_argument("--json", help="write the rows to this JSON file")
    args = ap.parse_args(argv)
    prompts = [int(x) for x in args.prompts.split(",") if x]
    gen = [int(x) for x in args.gen.split(",") if x]
    rows: list[dict[str, Any]] = []
    with threads_set(args.threads):
        t0 = time.perf_counter()
        if args.profile:
            profile = load_profile(args.profile)
            print(f"profile {profile.name} from {args.profile} (measured earlier, not in this run)")
        else:
            profile = build_profile(measure(quick=args.quick_profile, progress=False), name="measured-calibration")
            print(f"profile measured in {time.perf_counter() - t0:.0f} s on {machine_label()}: DRAM read "
                  f"{profile.cpu.dram_bandwidth_gbps:.1f} GB/s (measured)\n")
            if args.save_profile:
                save_profile(profile, args.save_profile)
        print("| model | dtype | test | measured ms | simulated ms | sim/meas | sim/meas (engine's routing) | "
              "read GB/s before / after |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for name in args.models.split(","):
            for dtype in args.dtypes.split(","):
                rows += run_model(name, dtype, profile, prompts, gen, args.reps, args.kinds)
    misses = [r for r in rows if abs(r["ratio"] - 1) > 0.15]
    print(f"\n{len(rows) - len(misses)} of {len(rows)} tests within ±15% (simulated on profile {profile.name}, "
          f"measured on {machine_label()})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_label(), "profile": profile.name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
