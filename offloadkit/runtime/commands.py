"""Subcommands of ``offloadkit`` that belong to ``offloadkit.runtime`` (registered by ``offloadkit.cli``).

``offloadkit simulate`` runs the simulator on a zoo model and a hardware profile and prints a table
labelled **simulated** on that profile; it can write the Chrome trace (Perfetto) and an HTML
timeline. Plans that do not fit, unknown plans, profiles or routings arrive as
:class:`~offloadkit.errors.OffloadkitError` and are printed by the CLI without a traceback.
"""

from __future__ import annotations

import argparse
import json


def cmd_simulate(args: argparse.Namespace) -> int:
    from offloadkit.hardware.catalog import load_profile
    from offloadkit.model.zoo import load_spec
    from offloadkit.plan.plans import Workload, gpu_bytes, parse_plan
    from offloadkit.runtime.sim import simulate
    from offloadkit.runtime.timeline import Timeline

    spec = load_spec(args.model)
    profile = load_profile(args.profile)
    plan = parse_plan(args.plan, spec)
    workload = Workload(args.prompt, args.gen, args.batch)
    result = simulate(spec, profile, plan, workload, args.routing, check_memory=not args.ignore_memory,
                      record=bool(args.trace or args.html), seed=args.seed)
    print(result.table())
    if plan.uses_gpu:
        need = gpu_bytes(plan, spec, workload)
        print(f"GPU memory of the plan: {need / 2**30:.2f} GiB (usable on {profile.name}: "
              f"{profile.gpu.usable_memory_gib:g} GiB)")
        if need > profile.gpu.usable_memory_bytes:
            print(f"note: the plan does NOT fit this GPU (over by {need - profile.gpu.usable_memory_bytes:,} bytes); "
                  f"these figures are hypothetical (--ignore-memory)")
    if args.json:
        print(json.dumps(result.summary()))
    if args.trace:
        result.timeline.write_chrome_trace(args.trace)
        print(f"wrote the Chrome trace ({len(result.timeline)} tasks, simulated) to {args.trace}: open it in "
              f"https://ui.perfetto.dev")
    if args.html:
        from offloadkit.viz.timeline import write_timeline_html

        timeline = result.timeline
        if not args.html_all_steps:  # the prefill and the first decode step tell the story
            timeline = Timeline(timeline.source, timeline.machine, [r for r in timeline.records if r.step <= 1],
                                dict(timeline.meta))
        write_timeline_html(timeline, args.html)
        print(f"wrote the timeline (simulated) to {args.html}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``offloadkit`` parser."""
    p = sub.add_parser("simulate", help="simulate a plan on a hardware profile (virtual time, no GPU needed)",
                       description="Simulate prefill + decode of a model under a plan on a hardware profile. "
                                   "Every figure printed is simulated, not measured.")
    p.add_argument("--model", default="mixtral-8x7b", help="a zoo name or a folder with config.json")
    p.add_argument("--profile", default="rtx4090-desktop", help="a catalog profile name or a profile .toml")
    p.add_argument("--plan", default="all-cpu", help="all-cpu, all-gpu or ngl:N (N layers on the GPU)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence (prefill)")
    p.add_argument("--gen", type=int, default=128, help="generated tokens (decode steps)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--routing", default="uniform", help="uniform, zipf:S (e.g. zipf:1.2) or trace:PATH")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic routing")
    p.add_argument("--trace", help="write the Chrome trace JSON (Perfetto) here")
    p.add_argument("--html", help="write an HTML timeline (prefill + first decode step) here")
    p.add_argument("--html-all-steps", action="store_true", help="draw every step in the HTML timeline")
    p.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    p.add_argument("--ignore-memory", action="store_true", help="simulate even if the plan does not fit the GPU")
    p.set_defaults(func=cmd_simulate)
