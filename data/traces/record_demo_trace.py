"""Record the routing trace of the demo checkpoint: which experts its tokens pick, layer by layer.

    python data/traces/record_demo_trace.py            # ~10 s on 2 cores; writes demo-mixtral-pydoc.npz

The prompt is the start of the ``for`` statement's help topic from the standard library's
``pydoc_data/topics.py`` (the text the demo model was trained on), then greedy decoding. The trace
holds the prefill's tokens and every decode step's token, in order, for every MoE layer
(:class:`offloadkit.plan.routing.RoutingTrace`). It is measured: the choices the trained routers
made on this machine (the same on any machine up to floating-point ties). Simulate with it:

    offloadkit simulate --model demo --profile rtx4090-desktop --routing trace:demo-mixtral-pydoc.npz
"""

from __future__ import annotations

import argparse
import platform
import pydoc_data.topics
from pathlib import Path

import torch

from offloadkit.plan.routing import record_trace
from offloadkit.runtime.engines import load_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).with_name("demo-mixtral-pydoc.npz")))
    args = parser.parse_args()

    model, tok = load_engine("reference", args.model)
    text = pydoc_data.topics.topics["for"]
    ids = tok.encode(text)[: args.prompt_tokens]
    meta = {"source": "measured", "checkpoint": args.model, "prompt": "pydoc_data.topics.topics['for'] of Python "
            + platform.python_version(), "prompt_tokens": len(ids), "gen_tokens": args.gen, "decoding": "greedy",
            "torch": torch.__version__, "machine": platform.node() or platform.machine()}
    trace = record_trace(model, ids, args.gen, meta=meta)
    path = trace.save(args.out)
    print(f"recorded {trace.n_tokens} tokens x {len(trace.layers)} MoE layers (top-{trace.top_k} of "
          f"{trace.n_experts}) in {len(trace.step_tokens)} steps -> {path}")


if __name__ == "__main__":
    main()
