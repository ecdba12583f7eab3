"""Subcommands of ``offloadkit`` that belong to ``offloadkit.runtime`` (registered by ``offloadkit.cli``).

``offloadkit simulate`` runs the simulator on a zoo model and a hardware profile and prints a table
labelled **simulated** on that profile; it can write the Chrome trace (Perfetto) and an HTML
timeline. Plans that do not fit, unknown plans, profiles or routings, and output files that cannot be
written arrive as :class:`~offloadkit.errors.OffloadkitError` before the simulation runs, and are printed
by the CLI without a traceback. ``--gen 0`` is prefill only (llama-bench's ``-n 0``): no decode row.
"""

from __future__ import annotations

import argparse
import json

from offloadkit.errors import OffloadkitError
from offloadkit.output_paths import check_output_file


def cmd_simulate(args: argparse.Namespace) -> int:
    from offloadkit.hardware.catalog import load_profile
    from offloadkit.model.zoo import load_spec
    from offloadkit.plan.plans import Workload, gpu_bytes, parse_plan
    from offloadkit.plan.routing import parse_routing
    from offloadkit.runtime.sim import simulate
    from offloadkit.runtime.timeline import Timeline

    # everything that can be refused is refused before the simulation runs
    trace = check_output_file(args.trace, "--trace") if args.trace else None
    html = check_output_file(args.html, "--html") if args.html else None
    if trace is not None and html is not None and trace.resolve() == html.resolve():
        raise OffloadkitError(f"--trace and --html name the same file ({args.trace}); give each its own")
    for flag, value, least in (("--prompt", args.prompt, 1), ("--gen", args.gen, 0), ("--batch", args.batch, 1)):
        if value < least:
            raise OffloadkitError(f"{flag} must be >= {least}, got {value}"
                                  + (" (--gen 0 simulates the prefill only)" if flag == "--gen" else ""))
    spec = load_spec(args.model)
    profile = load_profile(args.profile)
    plan = parse_plan(args.plan, spec)
    workload = Workload(args.prompt, args.gen, args.batch)
    routing = parse_routing(args.routing, args.seed)
    if "note" in plan.meta:
        print(f"plan: {plan.meta['note']}")
    result = simulate(spec, profile, plan, workload, routing, check_memory=not args.ignore_memory,
                      record=bool(trace or html), seed=args.seed)
    print(result.table())
    if workload.gen_tokens == 0:
        print("prefill only (--gen 0, as llama-bench -n 0): no decode step was simulated")
    if plan.uses_gpu:
        need = gpu_bytes(plan, spec, workload)
        print(f"GPU memory of the plan: {need / 2**30:.2f} GiB (usable on {profile.name}: "
              f"{profile.gpu.usable_memory_gib:g} GiB)")
        if need > profile.gpu.usable_memory_bytes:
            print(f"note: the plan does NOT fit this GPU (over by {need - profile.gpu.usable_memory_bytes:,} bytes); "
                  f"these figures are hypothetical (--ignore-memory)")
    if args.json:
        print(json.dumps(result.summary()))
    if trace is not None:
        result.timeline.write_chrome_trace(trace)
        print(f"wrote the Chrome trace ({len(result.timeline)} tasks, simulated) to {args.trace}: open it in "
              f"https://ui.perfetto.dev")
    if html is not None:
        from offloadkit.viz.timeline import write_timeline_html

        timeline = result.timeline
        if not args.html_all_steps:  # the prefill and the first decode step tell the story
            timeline = Timeline(timeline.source, timeline.machine, [r for r in timeline.records if r.step <= 1],
                                dict(timeline.meta))
        write_timeline_html(timeline, str(html))
        print(f"wrote the timeline (simulated) to {args.html}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``offloadkit`` parser."""
    p = sub.add_parser("simulate", help="simulate a plan on a hardware profile (virtual time, no GPU needed)",
                       description="Simulate prefill + decode of a model under a plan on a hardware profile. "
                                   "Every figure printed is simulated, not measured.")
    p.add_argument("--model", default="mixtral-8x7b", help="a zoo name, 'demo', or a folder with config.json")
    p.add_argument("--profile", default="rtx4090-desktop",
                   help="a catalog profile name (see 'offloadkit hardware list') or a profile .toml")
    p.add_argument("--plan", default="all-cpu",
                   help="all-cpu, all-gpu, or ngl:N: llama.cpp's -ngl N, N decoder layers on the GPU "
                        "(ngl:<layers+1> adds the output layer; a larger N, e.g. ngl:99, means all of them)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence (the prefill)")
    p.add_argument("--gen", type=int, default=128,
                   help="generated tokens per sequence (decode steps); 0 simulates the prefill only")
    p.add_argument("--batch", type=int, default=1, help="sequences processed together")
    p.add_argument("--routing", default="uniform",
                   help="which experts tokens pick: uniform, zipf:S (skewed, e.g. zipf:1.2) or trace:PATH "
                        "(a recorded .npz, e.g. trace:demo-mixtral-pydoc.npz)")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic routing")
    p.add_argument("--trace", help="write the Chrome trace JSON (Perfetto) to this file (default: not written)")
    p.add_argument("--html", help="write an HTML timeline (prefill + first decode step) to this file "
                                  "(default: not written)")
    p.add_argument("--html-all-steps", action="store_true", help="draw every step in the HTML timeline")
    p.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    p.add_argument("--ignore-memory", action="store_true", help="simulate even if the plan does not fit the GPU")
    p.set_defaults(func=cmd_simulate)
