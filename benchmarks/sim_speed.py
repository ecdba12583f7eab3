"""How fast the simulator is: Mixtral-8x7B, pp512 + tg128, shapes only, against the 0.5 s target.

    python benchmarks/sim_speed.py [--profile rtx4090-desktop] [--repeats 5]

The target (issue 3) is that simulating a full-size Mixtral-8x7B prefill of 512 tokens and 128 decode
steps, with its per-task timeline, takes under half a second, so that notebooks and plan searches can
call the simulator freely. This script times it for several plans, best of ``--repeats`` after a
warm-up. The wall times are **measured** on this machine (named in the output); the tokens/s it also
prints are **simulated** on the profile. It is not a test: a loaded machine measures slower.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from offloadkit.hardware.catalog import load_profile
from offloadkit.model.zoo import load_spec
from offloadkit.plan.plans import Workload, max_ngl
from offloadkit.runtime.sim import simulate

TARGET_S = 0.5


def machine() -> str:
    return f"{platform.node() or 'this machine'} ({platform.processor() or platform.machine()}, " \
           f"{os.cpu_count()} logical CPUs, Python {platform.python_version()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="rtx4090-desktop")
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    spec, profile, workload = load_spec(args.model), load_profile(args.profile), Workload(512, 128)
    plans = ["all-cpu", f"ngl:{max_ngl(spec, profile, workload)}", "ngl:0"]
    print(f"simulator speed, {spec.name} {workload.label}, shapes only, per-task timeline recorded")
    print(f"wall time measured on {machine()}; tokens/s simulated on {profile.name}\n")
    print(f"{'plan':<8} {'tasks':>7} {'best s':>8} {'median s':>9} {'target':>7}   {'pp t/s (sim)':>12} "
          f"{'tg t/s (sim)':>12}")
    for plan in plans:
        simulate(spec, profile, plan, workload)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = simulate(spec, profile, plan, workload)
            times.append(time.perf_counter() - t0)
        times.sort()
        verdict = "ok" if times[0] < TARGET_S else "SLOW"
        print(f"{plan:<8} {len(result.timeline):>7} {times[0]:>8.3f} {times[len(times) // 2]:>9.3f} "
              f"{verdict:>7}   {result.prefill_tokens_per_s:>12.1f} {result.decode_tokens_per_s:>12.2f}")
    print(f"\ntarget: < {TARGET_S} s per simulation (best of {args.repeats}, measured)")


if __name__ == "__main__":
    main()
