"""The ``offloadkit`` command line: a thin layer of argparse over the package.

Each subcommand parses its arguments and calls one package function; no logic lives here. Errors
the user can cause arrive as :class:`~offloadkit.errors.OffloadkitError` and are printed as one
line (``offloadkit: error: ...``) with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from offloadkit.errors import OffloadkitError

Handler = Callable[[argparse.Namespace], int]

#: Modules that add subcommands: each has ``register(subparsers) -> None`` and keeps its handlers.
COMMAND_MODULES: tuple[str, ...] = (
    "offloadkit.hardware.commands",
    "offloadkit.runtime.commands",
    "offloadkit.kernels.commands",
    "offloadkit.bench.commands",
)


# ---- subcommands ---------------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    from offloadkit.model.summary import format_breakdown
    from offloadkit.model.zoo import load_spec

    print(format_breakdown(load_spec(args.model)))
    return 0


def cmd_make_model(args: argparse.Namespace) -> int:
    from offloadkit.model.writer import make_config, write_checkpoint

    sizes = {k: v for k, v in dict(layers=args.layers, hidden=args.hidden, heads=args.heads,
                                   kv_heads=args.kv_heads, experts=args.experts, top_k=args.top_k,
                                   intermediate=args.intermediate, vocab=args.vocab,
                                   dtype=args.dtype).items() if v is not None}
    config = make_config(args.arch, **sizes)
    shard = int(args.shard_mb * 2**20) if args.shard_mb else None
    out = write_checkpoint(args.out, config, seed=args.seed, max_shard_bytes=shard)
    print(f"wrote a random {args.arch} checkpoint (seed {args.seed}) to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from offloadkit.model.generate import SamplingConfig, stream_text
    from offloadkit.runtime.engines import load_engine

    model, tok = load_engine(args.engine, args.model)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    stream_text(model, tok, args.prompt, args.max_new_tokens, sampling)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from offloadkit.demo import run_demo

    run_demo(max_new_tokens=args.max_new_tokens)
    return 0


# ---- parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offloadkit",
        description="Hybrid CPU-GPU inference of LLMs on one moderate GPU (a ScheInfer reimplementation).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameters and bytes of a model, by block kind")
    p.add_argument("model", help="a zoo name (e.g. mixtral-8x7b), 'demo', or a folder with config.json")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("make-model", help="write a small random checkpoint in the Hugging Face layout")
    p.add_argument("--arch", required=True, choices=["mixtral", "llama", "qwen2_moe", "phimoe"])
    p.add_argument("--out", required=True, help="folder to write (created)")
    for flag in ("layers", "hidden", "heads", "kv-heads", "experts", "top-k", "intermediate", "vocab"):
        p.add_argument(f"--{flag}", type=int)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-mb", type=float, help="split into shards of at most this many MiB")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("generate", help="generate text from a local checkpoint")
    p.add_argument("--model", required=True, help="a folder with config.json, safetensors, tokenizer.json")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--engine", choices=["reference", "cpu"], default="reference",
                   help="reference: plain PyTorch; cpu: offloadkit's CPU kernels (default reference)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the main job: the demo model's anatomy and text")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.set_defaults(func=cmd_demo)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OffloadkitError as e:
        print(f"offloadkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\noffloadkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
