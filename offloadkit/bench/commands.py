"""Subcommands of ``offloadkit`` that belong to ``offloadkit.bench`` (registered by ``offloadkit.cli``).

``offloadkit bench`` (no subcommand) is the end-to-end benchmark of :mod:`offloadkit.bench.protocol`:
offloadkit's engine against the real llama.cpp with llama-bench's flags (``-m -p -n -t -r -o``, comma
lists), printing llama-bench's markdown table (or JSON) with the ratios, and writing ``--json FILE`` and
``--html FILE``. ``offloadkit bench kernels`` runs :mod:`offloadkit.bench.kernels` and prints its
markdown table (or JSON with ``--json``). It refuses to hold measuring logic: that lives in the modules it calls,
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


def cmd_bench_export_gguf(args: argparse.Namespace) -> int:
    """``offloadkit bench export-gguf --model M --dtype bf16 --out F``: see :mod:`offloadkit.bench.gguf_export`."""
    from offloadkit.bench.gguf_export import export_gguf, gguf_for
    from offloadkit.bench.models import bench_model, cache_dir, is_bench_model
    from offloadkit.model.dtypes import normalize_dtype
    from offloadkit.model.zoo import resolve_model
    from offloadkit.output_paths import check_output_file

    dtype = normalize_dtype(args.dtype)
    out = check_output_file(args.out, "--out") if args.out else None
    folder = bench_model(args.model, dtype) if is_bench_model(args.model) else resolve_model(args.model)
    if out is None and not args.byte_tokenizer:
        path = gguf_for(folder, dtype)  # cached: made once per checkpoint and dtype
    else:
        if out is None:
            out = cache_dir() / "gguf" / f"{folder.name}-bytetok-{dtype}.gguf"
            out.parent.mkdir(parents=True, exist_ok=True)
        path = export_gguf(folder, out, dtype, byte_tokenizer=args.byte_tokenizer)
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB, {dtype}): run it with llama.cpp, e.g. "
          f"llama-bench -m {path}")
    return 0


def _int_list(text: str) -> list[int]:
    """llama-bench's comma lists: ``"1,2"`` -> [1, 2] (refused, not guessed, when a part is not a number)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    """``offloadkit bench -m bench-moe -p 512 -n 128 -t 2 -r 5``: both engines alternated, ratios, report."""
    from offloadkit.bench.protocol import BenchSettings, default_threads, format_markdown, run_bench
    from offloadkit.output_paths import check_output_file

    json_out = check_output_file(args.json_out, "--json") if args.json_out else None
    html_out = check_output_file(args.html, "--html") if args.html else None
    settings = BenchSettings(models=args.model, dtypes=args.dtype, threads=args.threads or [default_threads()],
                             n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.repetitions,
                             engines=tuple(args.engines), profile=args.profile,
                             require_llamacpp=args.require_llamacpp)
    run = run_bench(settings, progress=not args.quiet)
    if args.output == "json":
        json.dump(run.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_markdown(run))
    if json_out is not None:
        run.write_json(json_out)
        print(f"wrote {json_out}", file=sys.stderr)
    if html_out is not None:
        from offloadkit.bench.report import write_html

        write_html(run, html_out)
        print(f"wrote {html_out}", file=sys.stderr)
    return 0


def _add_bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", type=_str_list, default=["bench-moe"],
                   help="benchmark model names (bench-moe, bench-moe-small, bench-dense, bench-dense-small) or "
                        "checkpoint folders, comma-separated (default bench-moe)")
    p.add_argument("-p", "--n-prompt", type=_int_list, default=[512], help="prompt lengths (default 512)")
    p.add_argument("-n", "--n-gen", type=_int_list, default=[128], help="tokens to generate (default 128)")
    p.add_argument("-t", "--threads", type=_int_list, default=None, help="threads (default: all cores)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="repetitions per test (default 5)")
    p.add_argument("-o", "--output", choices=["md", "json"], default="md", help="printed format (default md)")
    p.add_argument("--dtype", type=_str_list, default=["bfloat16"],
                   help="weight dtypes, comma-separated: bf16, f16, f32 (default bf16)")
    p.add_argument("--engines", type=_str_list, default=["offloadkit", "llama.cpp"],
                   help="offloadkit, llama.cpp or both (default both, alternated)")
    p.add_argument("--profile", default="measure",
                   help="profile the simulated column uses: a TOML file, 'measure' (this machine, measured at the "
                        "start; default) or 'none'")
    p.add_argument("--require-llamacpp", action="store_true",
                   help="fail if llama.cpp is not built (default: measure offloadkit alone and say so)")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the run as JSON to FILE")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``offloadkit bench ...`` to the ``offloadkit`` parser."""
    bench = sub.add_parser("bench", help="offloadkit's engine against llama.cpp, llama-bench's protocol (measured); "
                                         "subcommands for kernels and GGUF export")
    _add_bench_flags(bench)
    bench.set_defaults(func=cmd_bench)
    bench_sub = bench.add_subparsers(dest="bench_command", required=False)
    p = bench_sub.add_parser("kernels", help="CPU expert kernels vs the memory read and torch (measured)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of markdown")
    p.add_argument("--out", help="also write the JSON result to this file (default: not written)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is the best of them")
    p.add_argument("--quick", action="store_true", help="fewer token counts and shorter timings (a smoke run)")
    p.set_defaults(func=cmd_bench_kernels)
    p = bench_sub.add_parser("export-gguf", help="write a checkpoint as GGUF, for llama.cpp to run the same weights")
    p.add_argument("--model", default="bench-moe",
                   help="a checkpoint folder, 'demo', or a benchmark model name (default bench-moe)")
    p.add_argument("--dtype", default="bf16", help="bf16, f16 or f32 (default bf16)")
    p.add_argument("--out", help="the .gguf file to write (default: cached, made once: beside a benchmark model "
                                 "in the cache, or <cache>/gguf/<folder>-<hash>-<dtype>.gguf)")
    p.add_argument("--byte-tokenizer", action="store_true",
                   help="write offloadkit's byte-level tokenizer instead of the checkpoint's (for tokenizers that "
                        "are not GPT-2 byte-level BPE; fine for speed benchmarks)")
    p.set_defaults(func=cmd_bench_export_gguf)
