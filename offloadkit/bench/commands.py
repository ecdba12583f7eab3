"""Subcommands of ``offloadkit`` that belong to ``offloadkit.bench`` (registered by ``offloadkit.cli``).

``offloadkit bench kernels`` runs :mod:`offloadkit.bench.kernels` and prints its markdown table (or
JSON with ``--json``). Later benchmarks (the llama.cpp runner, end-to-end pp512 / tg128) add their
own ``bench`` subcommands here. It refuses to hold measuring logic: that lives in the modules it calls,
so the notebooks and ``benchmarks/`` run the same code.
"""

from __future__ import annotations

import argparse
import json
import sys


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from offloadkit.bench.kernels import format_markdown, run, write_json
    from offloadkit.output_paths import check_output_file

    out = check_output_file(args.out, "--out") if args.out else None  # refused before minutes of measuring
    result = run(rounds=args.rounds, quick=args.quick)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_markdown(result))
    if out is not None:
        write_json(result, out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``offloadkit bench ...`` to the ``offloadkit`` parser."""
    bench = sub.add_parser("bench", help="measure offloadkit's kernels and engines on this machine")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser("kernels", help="CPU expert kernels vs the memory read and torch (measured)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of markdown")
    p.add_argument("--out", help="also write the JSON result to this file (default: not written)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is the best of them")
    p.add_argument("--quick", action="store_true", help="fewer token counts and shorter timings (a smoke run)")
    p.set_defaults(func=cmd_bench_kernels)
