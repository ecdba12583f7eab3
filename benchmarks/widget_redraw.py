"""How long the plan tuner of chapter 06 takes to redraw after a control changes, against the 200 ms target.

    python benchmarks/widget_redraw.py [--model mixtral-8x7b] [--profile rtx4090-desktop] [--rounds 2] [--breakdown]
    python benchmarks/widget_redraw.py --explorer [--bench-json run.json] [--rounds 2]
    python benchmarks/widget_redraw.py --dashboard timeline|speedup [--model M] [--profile P] [--rounds 3]

A redraw (:meth:`offloadkit.viz.plan_tuner.PlanTuner._update`) re-plans and re-simulates scheinfer,
llamacpp, fiddler and ktransformers on the what-if profile (``compare_policies(quick=True)``), computes
the bounds, and updates three FigureWidgets in place. This script builds the tuner once, then changes
one control at a time through a fixed cycle (each a real change: GPU memory, PCIe generation, DRAM
bandwidth, prompt, generation, routing skew), ``--rounds`` times, and reports the mean ± sd of the
redraw time and of its compute part. Times are **measured** on this machine (named in the output), with
no browser attached (a browser adds the widget messages' round trip); the tokens/s inside the figures
are **simulated**. ``--breakdown`` also times each policy's plan + simulation and the bounds alone,
to show where a redraw's time goes. It is not a test: a loaded machine measures slower.

``--explorer`` times chapter 09's speedup explorer (:class:`offloadkit.viz.benchmarks.SpeedupExplorer`)
instead: every model, then every profile, then every phase in turn, ``--rounds`` times; a redraw there
only looks up the simulated paper experiment (and the measured BenchRun of ``--bench-json``, if given)
and updates one FigureWidget.

``--dashboard timeline`` times the timeline explorer (:class:`offloadkit.viz.dashboards.TimelineExplorer`)
on ``--model`` / ``--profile``: a cycle of policy, decode step, phase, prompt and generation changes;
the first round meets each state for the first time (plan, bound and step simulated: *cold*), later
rounds find it cached (*warm*); both are reported. ``--dashboard speedup`` times the speedup board
(:class:`offloadkit.viz.dashboards.SpeedupBoard`): phase, baseline and routing changes over the
models x profiles grid of the simulated paper experiment.
"""

from __future__ import annotations

import argparse
import statistics
import time

from offloadkit.hardware.machine import machine_label
from offloadkit.plan.bounds import workload_bounds
from offloadkit.runtime.compare import compare_policies
from offloadkit.viz.plan_tuner import HAS_QUICK, TUNED_POLICIES, PlanTuner

TARGET_S = 0.2
#: One round of control changes; each differs from the state before it, and the round ends where it began.
CHANGES: list[dict[str, object]] = [
    {"gpu_gib": 16}, {"gpu_gib": 32}, {"gpu_gib": 23},
    {"pcie_gen": 3}, {"pcie_gen": 5}, {"pcie_gen": 4},
    {"dram_gbps": 40}, {"dram_gbps": 120}, {"dram_gbps": 62.4},
    {"prompt_tokens": 256}, {"prompt_tokens": 1024}, {"prompt_tokens": 512},
    {"gen_tokens": 64}, {"gen_tokens": 256}, {"gen_tokens": 128},
    {"zipf": 0.0}, {"zipf": 2.0}, {"zipf": 1.2},
]


def _mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs) * 1e3:6.0f} ± {statistics.stdev(xs) * 1e3:4.0f} ms" if len(xs) > 1 else \
        f"{xs[0] * 1e3:6.0f} ms"


def breakdown(tuner: PlanTuner, repeats: int = 3) -> None:
    """Best-of-``repeats`` seconds of each policy's plan + simulation, and of the bounds, in the tuner's state."""
    profile, workload, routing = tuner.what_if_profile(), tuner.workload(), tuner.routing()
    kw = {"quick": True} if tuner.quick else {}
    print(f"\nwhere a redraw goes (best of {repeats}, measured), on {profile.name} · {workload.label} · {routing}:")
    for policy in TUNED_POLICIES:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            compare_policies(tuner.spec, profile, workload, routing, policies=(policy,), with_bounds=False, **kw)
            times.append(time.perf_counter() - t0)
        print(f"  {policy:<14} plan + simulate {min(times) * 1e3:6.0f} ms")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        workload_bounds(tuner.spec, profile, workload, routing)
        times.append(time.perf_counter() - t0)
    print(f"  {'bounds':<14} two LPs         {min(times) * 1e3:6.0f} ms")


def explorer_redraw(rounds: int, bench_json: str | None) -> None:
    """Mean ± sd of the speedup explorer's redraw over a cycle of model, profile and phase changes."""
    from offloadkit.bench.results import BenchRun
    from offloadkit.viz.benchmarks import PHASES, SpeedupExplorer

    t0 = time.perf_counter()
    explorer = SpeedupExplorer(run=BenchRun.read_json(bench_json) if bench_json else None)
    first = time.perf_counter() - t0
    models, profiles = explorer.paper.models(), explorer.paper.profiles()
    changes = [{"model": m} for m in models[1:] + models[:1]] + [{"profile": p} for p in profiles[1:] + profiles[:1]] \
        + [{"phase": ph} for ph in PHASES[1:] + PHASES[:1]]
    redraw = []
    for _ in range(rounds):
        for change in changes:
            explorer.set(**change)
            redraw.append(explorer.last_redraw_s)
    print(f"speedup explorer redraw ({len(models)} models × {len(profiles)} profiles × {len(PHASES)} phases, "
          f"{'with the measured run ' + bench_json if bench_json else 'no measured run'})")
    print(f"measured on {machine_label()}, no browser attached")
    print(f"  first draw (read the experiment, build the widgets) {first:6.2f} s")
    print(f"  redraw after a control change   {_mean_sd(redraw)}   (n = {len(redraw)}, "
          f"min {min(redraw) * 1e3:.0f}, max {max(redraw) * 1e3:.0f} ms)")
    verdict = "meets" if statistics.mean(redraw) < TARGET_S else "misses"
    print(f"target: < {TARGET_S * 1e3:.0f} ms per redraw — {verdict} it (mean, measured)")


#: The timeline explorer's cycle: each a real change from the state before; the round ends where it began.
TIMELINE_CHANGES: list[dict[str, object]] = [
    {"policy": "llamacpp"}, {"policy": "fiddler"}, {"policy": "ktransformers"}, {"policy": "scheinfer"},
    {"step": 64}, {"step": 128}, {"step": 1},
    {"phase": "prefill"}, {"prompt": 1024}, {"prompt": 4096}, {"prompt": 128}, {"prompt": 512}, {"phase": "decode"},
    {"gen": 256}, {"gen": 128},
]
SPEEDUP_CHANGES: list[dict[str, object]] = [
    {"phase": "prefill"}, {"phase": "decode"}, {"phase": "overall"}, {"baseline": "fiddler"},
    {"baseline": "ktransformers"}, {"baseline": "llamacpp"}, {"routing": "zipf:1.2"}, {"routing": "trace"},
    {"routing": "uniform"},
]


def _report(name: str, first: float, cold: list[float], warm: list[float]) -> None:
    print(f"  first draw (load the model, build the widgets) {first:6.2f} s")
    print(f"  redraw, cold (state not seen before)  {_mean_sd(cold)}   (n = {len(cold)}, max {max(cold) * 1e3:.0f} ms)")
    if warm:
        print(f"  redraw, warm (state seen before)      {_mean_sd(warm)}   (n = {len(warm)}, "
              f"max {max(warm) * 1e3:.0f} ms)")
    every = cold + warm
    verdict = "meets" if statistics.mean(every) < TARGET_S else "misses"
    print(f"  every redraw                          {_mean_sd(every)}")
    print(f"target: < {TARGET_S * 1e3:.0f} ms per redraw: the {name} dashboard {verdict} it (mean, measured)")


def dashboard_redraw(which: str, model: str, profile: str, rounds: int) -> None:
    """Mean and sd of a dashboard's redraw over its cycle of control changes: cold (first round) and warm."""
    from offloadkit.viz import dashboards

    t0 = time.perf_counter()
    if which == "timeline":
        panel = dashboards.TimelineExplorer(model, profile)
        changes = TIMELINE_CHANGES
        what = f"timeline explorer, {model} on {profile} (simulated), pp512+tg128, quick={panel.quick}"
    else:
        panel = dashboards.SpeedupBoard()
        changes = SPEEDUP_CHANGES
        what = (f"speedup board, {len(panel.models)} models x {len(panel.profiles)} profiles of the simulated "
                f"paper experiment")
    first = time.perf_counter() - t0
    cold, warm = [], []
    for r in range(rounds):
        for change in changes:
            t = time.perf_counter()
            panel.set(**change)
            (cold if r == 0 else warm).append(time.perf_counter() - t)
    print(what)
    print(f"measured on {machine_label()}, no browser attached")
    _report(which, first, cold, warm)
    slow = sorted(zip(cold, changes, strict=True), key=lambda x: -x[0])[:3]
    print("  slowest cold changes: " + ", ".join(f"{c} {t * 1e3:.0f} ms" for t, c in slow))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--profile", default="rtx4090-desktop")
    parser.add_argument("--rounds", type=int, default=2, help="times through the cycle of control changes")
    parser.add_argument("--breakdown", action="store_true", help="also time each policy and the bounds alone")
    parser.add_argument("--explorer", action="store_true", help="time chapter 09's speedup explorer instead")
    parser.add_argument("--bench-json", help="with --explorer: a BenchRun JSON (offloadkit bench --json) to show")
    parser.add_argument("--dashboard", choices=("timeline", "speedup"),
                        help="time a dashboard of offloadkit.viz.dashboards instead")
    args = parser.parse_args()
    if args.dashboard:
        dashboard_redraw(args.dashboard, args.model, args.profile, args.rounds)
        return
    if args.explorer:
        explorer_redraw(args.rounds, args.bench_json)
        return

    t0 = time.perf_counter()
    tuner = PlanTuner(args.model, args.profile)
    first = time.perf_counter() - t0
    redraw, compute = [], []
    for _ in range(args.rounds):
        for change in CHANGES:
            tuner.set(**change)
            redraw.append(tuner.last_redraw_s)
            compute.append(tuner.last_compute_s)
    print(f"plan tuner redraw, {tuner.spec.name} on {args.profile} (what-ifs of it), "
          f"compare_policies(quick={tuner.quick}){'' if HAS_QUICK else ' (this version has no quick mode)'}")
    print(f"measured on {machine_label()}, no browser attached")
    print(f"  first draw (load the model, build the widgets) {first:6.2f} s")
    print(f"  redraw after a control change   {_mean_sd(redraw)}   (n = {len(redraw)}, "
          f"min {min(redraw) * 1e3:.0f}, max {max(redraw) * 1e3:.0f} ms)")
    print(f"    of which plan + simulate + bounds {_mean_sd(compute)}")
    print(f"    of which updating the figures     {_mean_sd([r - c for r, c in zip(redraw, compute, strict=True)])}")
    verdict = "meets" if statistics.mean(redraw) < TARGET_S else "misses"
    print(f"target: < {TARGET_S * 1e3:.0f} ms per redraw — {verdict} it (mean, measured)")
    if args.breakdown:
        breakdown(tuner)


if __name__ == "__main__":
    main()
