"""How fast the planner is: the partition, the per-step token assignment, and a simulation, timed on this CPU.

    python benchmarks/plan_speed.py [--profile rtx4090-desktop] [--repeats 3]

ScheInfer decides the CC/CG split of every layer at every step, so the token assignment must cost far
less than the layer it schedules (a Mixtral decode layer runs in milliseconds), and the adaptive
partition must be cheap enough to re-plan per workload. Three measurements, against the targets of the
design (docs/DESIGN.md):

(a) ``partition`` of Mixtral-8x7B (pp512 + tg128, uniform routing) on every catalog profile with a GPU:
    mean ± sd over ``--repeats``; target < 1 s. The partition repairs its plan by moves bounded by a count
    of layer-step estimates (``polish_evals``, 3000 by default); the LP and rounding alone
    (``polish_evals=0``) are shown beside it. The whole ScheInfer plan search (``make_plan``: the
    partition, then the baselines' placements as seeds, each simulated) is timed on ``--profile``.
(b) token assignment, µs per layer: ``TokenAssigner.dense`` + ``.moe`` of Mixtral's 32 layers under the
    ScheInfer plan, with the routing of real steps (the demo model's recorded trace tiled onto Mixtral),
    in decode (n = 1, 128 steps) and prefill (n = 512); target < 50 µs per layer. Three honest variants,
    because the assigner caches: *cold* (a fresh TokenAssigner for every layer call: prices, items and
    decisions computed from nothing), *warm prices* (``balance`` timed alone on the items of each
    barrier, the assigner's price and item caches already filled: the decision itself), and
    *as the simulator calls it* (one assigner reused over the workload: the dense barriers' decisions are
    cached per (layer, n), the experts' are recomputed each step). Qwen2-57B-A14B decode (top-8 and a
    shared expert: nine blocks to balance per layer) is shown beside it, for comparison.
(c) ``simulate`` of Mixtral-8x7B pp512 + tg128 under the ScheInfer plan, shapes only, with and without
    the per-task timeline.

Every time printed is **measured** wall time of the planner's Python code on this machine (named in the
output: a shared 2-core VM when it was written, so expect noise); it is CPU-bound work on small arrays,
so the machine's memory bandwidth plays little part. Tokens/s figures are **simulated** on the profile.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from offloadkit.hardware.catalog import catalog_names, load_profile
from offloadkit.hardware.machine import machine_label
from offloadkit.model.spec import ModelSpec
from offloadkit.model.zoo import load_spec
from offloadkit.plan.assign import TokenAssigner
from offloadkit.plan.costmodel import CostModel
from offloadkit.plan.partition import partition
from offloadkit.plan.plans import Plan, Workload
from offloadkit.plan.policies import make_plan
from offloadkit.plan.routing import Routing, parse_routing
from offloadkit.plan.split_search import EXACT_MAX, balance
from offloadkit.plan.trace_tiling import TiledTrace
from offloadkit.runtime.sim import simulate

PARTITION_TARGET_S = 1.0
ASSIGN_TARGET_US = 50.0
WORKLOAD = Workload(512, 128)
TRACE = "demo-mixtral-pydoc.npz"


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- (a) -------------------------------------------------------------------------------------------


def partition_times(spec: ModelSpec, repeats: int) -> None:
    print(f"(a) partition of {spec.name}, {WORKLOAD.label}, uniform routing: seconds, mean ± sd of {repeats} "
          f"(measured); target < {PARTITION_TARGET_S:g} s")
    print(f"    {'profile':<22} {'partition (LP + repair)':>26} {'LP + rounding only':>20} {'verdict':>8}")
    routing = parse_routing("uniform")
    for name in catalog_names():
        profile = load_profile(name)
        if profile.gpu is None:
            continue
        partition(spec, profile, WORKLOAD, routing)  # warm-up (imports, SciPy)
        full = [timed(lambda p=profile: partition(spec, p, WORKLOAD, routing)) for _ in range(repeats)]
        lp = [timed(lambda p=profile: partition(spec, p, WORKLOAD, routing, polish_evals=0)) for _ in range(repeats)]
        (m, s), (m0, s0) = mean_sd(full), mean_sd(lp)
        verdict = "ok" if m < PARTITION_TARGET_S else "SLOW"
        print(f"    {name:<22} {m:>17.3f} ± {s:.3f} s {m0:>11.3f} ± {s0:.3f} s {verdict:>8}")


def search_time(spec: ModelSpec, profile_name: str, repeats: int) -> None:
    profile = load_profile(profile_name)
    routing = parse_routing("uniform")
    times = [timed(lambda: make_plan("scheinfer", spec, profile, WORKLOAD, routing)) for _ in range(repeats)]
    m, s = mean_sd(times)
    print(f"    whole ScheInfer plan search (make_plan: partition + baselines' placements as seeds, each simulated) "
          f"on {profile_name}: {m:.3f} ± {s:.3f} s (measured)")


# ---- (b) -------------------------------------------------------------------------------------------


def steps_counts(spec: ModelSpec, routing: Routing, decode_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts [L, E] of the prefill step (512 tokens) and [steps, L, E] of the decode steps."""
    counts = routing.step_counts(spec, [WORKLOAD.prompt_tokens] + [1] * decode_steps)
    return counts[0], counts[1:]


def assign_calls(spec: ModelSpec, n: int, steps: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    return [(layer, n, step[layer]) for step in steps for layer in range(spec.n_layers)]


def time_cold(spec: ModelSpec, plan: Plan, cost: CostModel, calls: list[tuple[int, int, np.ndarray]]) -> float:
    """Seconds per layer call with a fresh assigner per call (its construction not timed)."""
    total = 0.0
    for layer, n, counts in calls:
        a = TokenAssigner(spec, plan, cost)
        t0 = time.perf_counter()
        a.dense(layer, n)
        a.moe(layer, n, counts)
        total += time.perf_counter() - t0
    return total / len(calls)


def balance_inputs(a: TokenAssigner, layer: int, n: int, counts: np.ndarray) -> list[tuple[list, tuple]]:
    """The ``balance`` problems of one layer call: each barrier block alone, then the experts (and shared
    expert) together, with their items and the gpu lane's resident load, as TokenAssigner poses them."""
    barriers, shared, blocks = a.layers[layer]
    out = []
    for b in barriers:
        if b.rows > a.plan.gg_rows.get(b.name, 0):
            out.append(([a.item(b, n)], (0.0, 0.0, a.resident_load(b, n))))
    if blocks:
        items = [a.item(blocks[e], int(c)) for e, c in enumerate(counts)
                 if c and blocks[e].rows > a.plan.gg_rows.get(blocks[e].name, 0)]
        g0 = sum(a.resident_load(b, int(c)) for b, c in zip(blocks, counts, strict=True) if c)
        if shared is not None:
            g0 += a.resident_load(shared, n)
            if shared.rows > a.plan.gg_rows.get(shared.name, 0):
                items.append(a.item(shared, n))
        out.append((items, (0.0, 0.0, g0)))
    return out


def time_balance(spec: ModelSpec, plan: Plan, cost: CostModel, calls: list[tuple[int, int, np.ndarray]]) -> float:
    """Seconds per layer call of ``balance`` alone, on items from a warm assigner."""
    a = TokenAssigner(spec, plan, cost)
    problems = [balance_inputs(a, layer, n, counts) for layer, n, counts in calls]  # fills the price cache
    t0 = time.perf_counter()
    for layer_problems in problems:
        for items, base in layer_problems:
            balance(items, base)
    return (time.perf_counter() - t0) / len(calls)


def time_as_simulated(spec: ModelSpec, plan: Plan, cost: CostModel,
                      calls: list[tuple[int, int, np.ndarray]]) -> float:
    """Seconds per layer call on one assigner reused over the calls (first pass included)."""
    a = TokenAssigner(spec, plan, cost)
    t0 = time.perf_counter()
    for layer, n, counts in calls:
        a.dense(layer, n)
        a.moe(layer, n, counts)
    return (time.perf_counter() - t0) / len(calls)


def assign_row(label: str, spec: ModelSpec, plan: Plan, cost: CostModel, calls: list, repeats: int) -> None:
    cold = [time_cold(spec, plan, cost, calls) * 1e6 for _ in range(repeats)]
    warm = [time_balance(spec, plan, cost, calls) * 1e6 for _ in range(repeats)]
    sim = [time_as_simulated(spec, plan, cost, calls) * 1e6 for _ in range(repeats)]
    cells = "".join(f" {m:>8.1f} ± {s:<6.1f}" for m, s in map(mean_sd, (cold, warm, sim)))
    worst = max(statistics.fmean(cold), statistics.fmean(warm))
    verdict = "ok" if worst < ASSIGN_TARGET_US else "SLOW"
    print(f"    {label:<50} {len(calls):>6}{cells} {verdict:>7}")


def assignment_times(spec: ModelSpec, profile_name: str, repeats: int, decode_steps: int,
                     other: str | None, other_steps: int) -> None:
    profile = load_profile(profile_name)
    print(f"\n(b) token assignment on {profile_name}, µs per layer call (dense + moe), mean ± sd of {repeats} "
          f"(measured); target < {ASSIGN_TARGET_US:g} µs")
    print(f"    {'case':<50} {'calls':>6} {'cold':>17} {'warm prices':>17} {'as simulated':>17} {'verdict':>7}")
    cases: list[tuple[str, ModelSpec, Routing, int]] = [
        (f"{spec.name} · trace", spec, TiledTrace.load(TRACE, spec), decode_steps)]
    if other:
        ospec = load_spec(other)
        cases.append((f"{ospec.name} · uniform", ospec, parse_routing("uniform"), other_steps))
    breakdown: list[tuple[str, ModelSpec, Plan, CostModel, list]] = []
    for label, s, routing, steps in cases:
        plan = make_plan("scheinfer", s, profile, WORKLOAD, routing)
        cost = CostModel(profile, s)
        prefill, decode = steps_counts(s, routing, steps)
        dcalls = assign_calls(s, 1, decode)
        pcalls = assign_calls(s, WORKLOAD.prompt_tokens, prefill[None].repeat(4, axis=0))  # 4 x the one step
        assign_row(f"{label} · decode n=1 ({steps} steps)", s, plan, cost, dcalls, repeats)
        assign_row(f"{label} · prefill n={WORKLOAD.prompt_tokens}", s, plan, cost, pcalls, repeats)
        breakdown += [(f"{label} · decode", s, plan, cost, dcalls), (f"{label} · prefill", s, plan, cost, pcalls)]
    print("    cold: fresh TokenAssigner per call (construction not timed); warm prices: balance() alone on "
          "cached items;\n    as simulated: one assigner over the workload (dense decisions cached per (layer, n)). "
          "The verdict takes the worse of cold and warm.")
    balance_breakdown(breakdown)


def items_bucket(n: int) -> str:
    return str(n) if n <= 2 else "3-9" if n <= 9 else "10+"


def balance_breakdown(cases: list[tuple[str, ModelSpec, Plan, CostModel, list]]) -> None:
    """Where balance() spends its time: per kind of problem (a barrier block alone, or the experts of a
    layer), number of items, and whether the split is small enough for the exhaustive search."""
    print(f"\n    balance() by problem, warm prices (measured): 'exhaustive' where the product of the items' "
          f"options is <= {EXACT_MAX} (split_search.EXACT_MAX)")
    print(f"    {'case':<34} {'problem':<10} {'items':>5} {'search':<11} {'calls':>6} {'µs each':>9} {'share':>6}")
    for label, spec, plan, cost, calls in cases:
        a = TokenAssigner(spec, plan, cost)
        groups: dict[tuple[str, str, str], list[float]] = {}
        for layer, n, counts in calls:
            problems = balance_inputs(a, layer, n, counts)
            for k, (items, base) in enumerate(problems):
                size = math.prod(min(it.host // it.chunk + 2, EXACT_MAX + 1) for it in items)
                key = ("experts" if a.layers[layer][2] and k == len(problems) - 1 else "barrier",
                       items_bucket(len(items)), "exhaustive" if size <= EXACT_MAX else "greedy")
                groups.setdefault(key, []).append(timed(lambda i=items, b=base: balance(i, b)))
        total = sum(map(sum, groups.values()))
        for (kind, n_items, search), ts in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
            print(f"    {label:<34} {kind:<10} {n_items:>5} {search:<11} {len(ts):>6} "
                  f"{statistics.fmean(ts) * 1e6:>9.1f} {sum(ts) / total:>6.0%}")


# ---- (c) -------------------------------------------------------------------------------------------


def simulate_times(spec: ModelSpec, profile_name: str, repeats: int) -> None:
    profile = load_profile(profile_name)
    routing = parse_routing("uniform")
    plan = make_plan("scheinfer", spec, profile, WORKLOAD, routing)
    print(f"\n(c) simulate {spec.name} {WORKLOAD.label} under the ScheInfer plan on {profile_name}, uniform "
          f"routing: seconds, mean ± sd of {repeats} after a warm-up (measured)")
    for record in (False, True):
        result = simulate(spec, profile, plan, WORKLOAD, routing, record=record)
        m, s = mean_sd([timed(lambda r=record: simulate(spec, profile, plan, WORKLOAD, routing, record=r))
                        for _ in range(repeats)])
        what = "with the per-task timeline" if record else "shapes only, no timeline (record=False)"
        print(f"    {what:<42} {m:.3f} ± {s:.3f} s   -> simulated on {profile_name}: "
              f"prefill {result.prefill_tokens_per_s:.1f} tok/s, decode {result.decode_tokens_per_s:.2f} tok/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="rtx4090-desktop", help="profile of (b) and (c)")
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=WORKLOAD.gen_tokens)
    parser.add_argument("--compare", default="qwen2-57b-a14b",
                        help="a second model for (b), decode and prefill ('' for none)")
    parser.add_argument("--compare-steps", type=int, default=16, help="decode steps of the second model")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    spec = load_spec(args.model)
    print(f"planner speed: measured on {machine_label()} ({os.cpu_count()} logical CPUs; a shared VM measures "
          f"noisily). CPU-bound Python on small arrays: memory bandwidth plays little part.\n")
    t0 = time.perf_counter()
    partition_times(spec, args.repeats)
    search_time(spec, args.profile, args.repeats)
    assignment_times(spec, args.profile, args.repeats, args.decode_steps, args.compare or None, args.compare_steps)
    simulate_times(spec, args.profile, args.repeats)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s (measured on {machine_label()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
