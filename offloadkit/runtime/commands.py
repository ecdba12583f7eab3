"""Subcommands of ``offloadkit`` that belong to ``offloadkit.runtime`` (registered by ``offloadkit.cli``).

``offloadkit simulate`` runs the simulator on a zoo model and a hardware profile and prints a table
labelled **simulated** on that profile, with the bound of each phase; it can write the Chrome trace
(Perfetto), an HTML timeline, and the JSON rows of :meth:`~offloadkit.runtime.compare.Comparison.rows`.
What runs is a policy's plan (``--policy``, default ``scheinfer``; ``--policy all`` compares every policy
in one table) or a given plan (``--plan all-cpu|all-gpu|ngl:N|PATH.json``), never both: asking for both is
refused rather than one silently winning. Plans that do not fit (the GPU, or the host's memory where
the profile gives it), unknown plans, policies, profiles or routings, a routing trace of another model,
and output files that cannot be written arrive as :class:`~offloadkit.errors.OffloadkitError` before the
simulation runs, and are printed by the CLI without a traceback. ``--gen 0`` is prefill only
(llama-bench's ``-n 0``): no decode row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from offloadkit.errors import OffloadkitError
from offloadkit.output_paths import check_output_file
from offloadkit.plan.commands import POLICY_NAMES, add_case_arguments

DEFAULT_POLICY = "scheinfer"


def _outputs(args: argparse.Namespace) -> dict[str, Path | None]:
    """``--trace``, ``--html`` and a ``--json`` file, each checked (and no two the same file) before any work."""
    paths: dict[str, Path | None] = {
        "--trace": check_output_file(args.trace, "--trace") if args.trace is not None else None,
        "--html": check_output_file(args.html, "--html") if args.html is not None else None,
        "--json": check_output_file(args.json, "--json") if args.json not in (None, "-") else None,
    }
    given = [(flag, p) for flag, p in paths.items() if p is not None]
    for i, (flag, p) in enumerate(given):
        for other, q in given[i + 1:]:
            if p.resolve() == q.resolve():
                raise OffloadkitError(f"{flag} and {other} name the same file ({p}); give each its own")
    return paths


def _check_choices(args: argparse.Namespace) -> str:
    """The policy to run (``"all"``, a policy, or ``""`` for ``--plan``); combinations that are ambiguous are
    refused."""
    if args.plan is not None and args.policy is not None:
        raise OffloadkitError(f"--plan {args.plan} and --policy {args.policy} both say what to run; give one "
                              f"(--plan runs that plan, --policy makes the policy's plan)")
    if args.plan is not None:
        return ""
    policy = args.policy or DEFAULT_POLICY
    if policy == "all":
        for flag, value in (("--trace", args.trace), ("--html", args.html), ("--html-all-steps", args.html_all_steps),
                            ("--ignore-memory", args.ignore_memory)):
            if value:
                raise OffloadkitError(f"{flag} needs one plan, and --policy all runs every policy; give one policy "
                                      f"(e.g. --policy scheinfer) or a --plan")
    elif args.ignore_memory:
        raise OffloadkitError(f"--ignore-memory applies to --plan: the {policy} policy makes a plan that fits, or "
                              f"refuses; to simulate a plan that does not fit, give it (e.g. --plan all-gpu "
                              f"--ignore-memory)")
    return policy


def _write_rows(rows: list[dict[str, Any]], target: str, path: Path | None) -> None:
    if path is None:  # bare --json: one line on stdout
        print(json.dumps(rows))
        return
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} rows (simulated) to {target}")


def cmd_simulate(args: argparse.Namespace) -> int:
    from offloadkit.plan.commands import plan_comparison, read_case
    from offloadkit.plan.host_memory import check_host_fits
    from offloadkit.plan.plan_io import resolve_plan
    from offloadkit.plan.plans import gpu_bytes
    from offloadkit.plan.policies import make_plan
    from offloadkit.runtime.sim import simulate
    from offloadkit.runtime.timeline import Timeline

    # everything that can be refused is refused before the planning and the simulation
    outputs = _outputs(args)
    policy = _check_choices(args)
    case = read_case(args)  # the workload's flags, the model, the profile, the routing (and its trace's model)
    spec, profile, workload, routing = case.spec, case.profile, case.workload, case.routing
    if policy == "all":
        from offloadkit.runtime.compare import compare_policies

        comparison = compare_policies(spec, profile, workload, routing, policies=POLICY_NAMES, seed=args.seed)
        print(comparison.table())
        if args.json is not None:
            _write_rows(comparison.rows(), args.json, outputs["--json"])
        return 0

    plan = resolve_plan(args.plan, spec) if args.plan is not None else make_plan(policy, spec, profile, workload,
                                                                                 routing)
    if not args.ignore_memory:
        check_host_fits(plan, spec, profile, workload)
    trace, html = outputs["--trace"], outputs["--html"]
    if "note" in plan.meta:
        print(f"plan: {plan.meta['note']}")
    result = simulate(spec, profile, plan, workload, routing, check_memory=not args.ignore_memory,
                      record=bool(trace or html), seed=args.seed)
    comparison = plan_comparison(case, plan, result)
    print(result.table())
    if comparison.bounds:
        parts = [f"{row['phase']} {row['bound_tokens_per_s']:.2f} tokens/s (this plan: {row['fraction_of_bound']:.0%})"
                 for row in comparison.rows() if row["bound_tokens_per_s"] and row["fraction_of_bound"]]
        print(f"bound (no placement beats it; simulated on {profile.name}): " + ", ".join(parts))
    if workload.gen_tokens == 0:
        print("prefill only (--gen 0, as llama-bench -n 0): no decode step was simulated")
    if plan.uses_gpu:
        need = gpu_bytes(plan, spec, workload)
        print(f"GPU memory of the plan: {need / 2**30:.2f} GiB (usable on {profile.name}: "
              f"{profile.gpu.usable_memory_gib:g} GiB)")
        if need > profile.gpu.usable_memory_bytes:
            print(f"note: the plan does NOT fit this GPU (over by {need - profile.gpu.usable_memory_bytes:,} bytes); "
                  f"these figures are hypothetical (--ignore-memory)")
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
    if args.json is not None:
        _write_rows(comparison.rows(), args.json, outputs["--json"])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``offloadkit`` parser."""
    p = sub.add_parser("simulate", help="simulate a plan on a hardware profile (virtual time, no GPU needed)",
                       description="Simulate prefill + decode of a model under a policy's plan (or a given plan) "
                                   "on a hardware profile. Every figure printed is simulated, not measured.")
    add_case_arguments(p)
    p.add_argument("--policy", choices=[*POLICY_NAMES, "all"],
                   help=f"the policy whose plan runs, or 'all' for a table of every policy with the speedups of "
                        f"scheinfer (default: {DEFAULT_POLICY}; not with --plan)")
    p.add_argument("--plan",
                   help="run this plan instead of a policy's: all-cpu, all-gpu, ngl:N (llama.cpp's -ngl N, N decoder "
                        "layers on the GPU; ngl:<layers+1> adds the output layer; a larger N, e.g. ngl:99, means all "
                        "of them), or a plan file PATH.json from 'offloadkit plan --out' (default: none, the "
                        "policy's plan)")
    p.add_argument("--trace", help="write the Chrome trace JSON (Perfetto) to this file (default: not written)")
    p.add_argument("--html", help="write an HTML timeline (prefill + first decode step) to this file "
                                  "(default: not written)")
    p.add_argument("--html-all-steps", action="store_true", help="draw every step in the HTML timeline")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="also write the figures as a JSON list of rows (model, profile, policy, phase, tokens, "
                        "seconds, tokens_per_s, bound_tokens_per_s, fraction_of_bound, bounding_lane, routing, "
                        "workload, source): to FILE, or as one line on stdout when no FILE is given "
                        "(default: not written)")
    p.add_argument("--ignore-memory", action="store_true",
                   help="simulate a --plan even if it does not fit the GPU or the host's memory")
    p.set_defaults(func=cmd_simulate)
