"""The ``offloadkit`` command line: a thin layer of argparse over the package.

Each subcommand parses its arguments and calls one package function; no logic lives here. Errors
the user can cause arrive as :class:`~offloadkit.errors.OffloadkitError` and are printed as one
line (``offloadkit: error: ...``) with exit status 2, never as a traceback; so is an ``OSError`` (a
disk that fills up mid-write). Output paths are checked before the work (:mod:`offloadkit.output_paths`),
and a value the command does not know exactly (``--plan ngl8``) is refused, not guessed at. Every
option's ``--help`` line says what it does and its default; ``offloadkit --version`` the version.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from offloadkit import __version__
from offloadkit.errors import OffloadkitError
from offloadkit.output_paths import check_output_folder
from offloadkit.runtime.hybrid_commands import add_hybrid_arguments

Handler = Callable[[argparse.Namespace], int]

#: Modules that add subcommands: each has ``register(subparsers) -> None`` and keeps its handlers.
COMMAND_MODULES: tuple[str, ...] = (
    "offloadkit.hardware.commands",
    "offloadkit.plan.commands",
    "offloadkit.runtime.commands",
    "offloadkit.kernels.commands",
    "offloadkit.bench.commands",
)

#: ``make-model`` sizes: the defaults of :func:`offloadkit.model.writer.make_config` (a test keeps them equal;
#: the writer is not imported here because it imports torch, which would make ``--help`` slow).
MAKE_MODEL_SIZES: dict[str, tuple[int | None, str]] = {
    "layers": (2, "decoder layers"),
    "hidden": (64, "hidden size (the residual stream's width)"),
    "heads": (4, "attention heads"),
    "kv-heads": (2, "key/value heads (grouped-query attention when fewer than --heads)"),
    "experts": (4, "routed experts per MoE layer (ignored by llama)"),
    "top-k": (2, "experts each token is routed to (ignored by llama)"),
    "intermediate": (None, "FFN / expert width (default: 2 x --hidden)"),
    "vocab": (512, "vocabulary size (the byte-level tokenizer needs at least 259)"),
}


# ---- the parser's look ---------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after every option's help, except flags (off unless given), options without a
    default (their help says what happens without them) and help texts that state their default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = not any(action.default is none for none in (None, False, argparse.SUPPRESS))  # 0 is a default
        if "(default" in text or not shown or not action.option_strings:
            return text
        return super()._get_help_string(action)


class _SubParsers(argparse._SubParsersAction):
    """Subcommands whose ``--help`` opens with the line that lists them (``help=``) when none is given."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if "help" in kwargs and "description" not in kwargs:
            kwargs["description"] = kwargs["help"][:1].upper() + kwargs["help"][1:] + "."
        return super().add_parser(name, **kwargs)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter`; its subcommands (at every depth) are too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _SubParsers)


# ---- subcommands ---------------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    from offloadkit.model.summary import format_breakdown
    from offloadkit.model.zoo import load_spec

    print(format_breakdown(load_spec(args.model)))
    return 0


def cmd_make_model(args: argparse.Namespace) -> int:
    from offloadkit.model.writer import make_config, write_checkpoint

    out = check_output_folder(args.out, "--out", force=args.force)
    existed = out.exists() and any(out.iterdir())
    sizes = {k: v for k, v in dict(layers=args.layers, hidden=args.hidden, heads=args.heads,
                                   kv_heads=args.kv_heads, experts=args.experts, top_k=args.top_k,
                                   intermediate=args.intermediate, vocab=args.vocab,
                                   dtype=args.dtype).items() if v is not None}
    config = make_config(args.arch, **sizes)
    if args.shard_mb is not None and not args.shard_mb > 0:
        raise OffloadkitError(f"--shard-mb must be > 0, got {args.shard_mb:g}")
    shard = int(args.shard_mb * 2**20) if args.shard_mb else None
    out = write_checkpoint(out, config, seed=args.seed, max_shard_bytes=shard)
    print(f"wrote a random {args.arch} checkpoint (seed {args.seed}) to {out}"
          + (" (--force: its checkpoint files replaced those there)" if existed else ""))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from offloadkit.runtime.hybrid_commands import run_hybrid, wants_hybrid

    if wants_hybrid(args):
        return run_hybrid(args)
    from offloadkit.model.generate import SamplingConfig, stream_text
    from offloadkit.runtime.engines import load_engine

    if args.prompt is None:
        raise OffloadkitError("give --prompt TEXT: the text to continue")
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    model, tok = load_engine(args.engine or ("cpu" if args.device == "cpu" else "reference"), args.model)
    stream_text(model, tok, args.prompt, args.max_new_tokens, sampling)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from offloadkit.demo import run_demo

    run_demo(max_new_tokens=args.max_new_tokens)
    return 0


# ---- parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="offloadkit",
        description="Hybrid CPU-GPU inference of LLMs on one moderate GPU (a ScheInfer reimplementation).",
        epilog="'offloadkit COMMAND --help' describes each command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print offloadkit's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")

    p = sub.add_parser("info", help="parameters and bytes of a model, by block kind")
    p.add_argument("model", help="a zoo name (e.g. mixtral-8x7b), 'demo', or a folder with config.json")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("make-model", help="write a small random checkpoint in the Hugging Face layout")
    p.add_argument("--arch", required=True, choices=["mixtral", "llama", "qwen2_moe", "phimoe"],
                   help="the architecture to write")
    p.add_argument("--out", required=True, help="the folder to write (created; its parent folder must exist)")
    p.add_argument("--force", action="store_true",
                   help="write into an existing non-empty folder, replacing the checkpoint files there")
    for flag, (default, text) in MAKE_MODEL_SIZES.items():
        p.add_argument(f"--{flag}", type=int, default=default, help=text)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="the weights' dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--shard-mb", type=float,
                   help="split into shards of at most this many MiB (default: one model.safetensors)")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("generate", help="generate text from a local checkpoint")
    p.add_argument("--model", required=True,
                   help="'demo' or a folder with config.json, safetensors and tokenizer.json")
    p.add_argument("--prompt", help="the text to continue (required, except with --bench)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="new tokens at most; generation also stops at an end-of-text token and at the "
                        "model's context (max_position_embeddings, the prompt included)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches this (with --temperature)")
    p.add_argument("--seed", type=int, help="seed of the sampler (default: unseeded; greedy needs none)")
    p.add_argument("--engine", choices=["reference", "cpu", "hybrid"],
                   help="reference: plain PyTorch; cpu: offloadkit's CPU kernels; hybrid: the hybrid engine "
                        "(needs --device loopback|cuda) (default: reference, or what --device says)")
    add_hybrid_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the main job: the demo model's anatomy and text")
    p.add_argument("--max-new-tokens", type=int, default=80, help="new tokens per demo prompt")
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
    except OSError as e:  # a disk that filled up or a file that vanished during a write: not a bug to trace
        print(f"offloadkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\noffloadkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
