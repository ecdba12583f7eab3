"""``offloadkit demo``: the main job, in one screen.

It shows the two facts the whole toolkit starts from: where a Mixture-of-Experts model keeps its
bytes (almost all in experts a token mostly does not use), and that offloadkit's model core runs a
real checkpoint: the small Mixtral-architecture model trained on Python's own documentation, read
memory-mapped from ``data/models/demo-mixtral``, generating text, with the expert choices its
routers learned; and a simulated Mixtral-8x7B step on an RTX 4090 desktop under llama.cpp-style
plans. Later issues extend it with ScheInfer's plans and measured speedups.
"""

from __future__ import annotations

import sys
from typing import TextIO

from offloadkit.hardware.catalog import load_profile
from offloadkit.model.expert_usage import expert_counts, normalized_entropy, usage_bar
from offloadkit.model.generate import SamplingConfig, stream_text
from offloadkit.model.summary import format_breakdown, human
from offloadkit.model.zoo import load_spec, zoo_names
from offloadkit.plan.plans import Workload, max_ngl
from offloadkit.runtime.engines import load_engine
from offloadkit.runtime.sim import simulate

PROMPTS = ("The \"for\" statement is used to", "A class definition")


def run_simulation(spec, out: TextIO, profile: str = "rtx4090-desktop") -> None:
    """Simulate pp512 + tg128 of ``spec`` on ``profile`` under all-cpu and the largest ``ngl`` that fits."""
    hw, w = load_profile(profile), Workload(prompt_tokens=512, gen_tokens=128)
    rule = "-" * 78
    out.write(f"{rule}\nSimulated (cost model, no weights): {spec.name} on {profile}, pp512 + tg128\n{rule}\n")
    for plan in ("all-cpu", f"ngl:{max_ngl(spec, hw, w)}"):
        out.write(simulate(spec, hw, plan, w, "zipf:1.2", record=False).table() + "\n\n")
    out.write("ScheInfer's CC/CG/GG split (later chapters) puts the idle GPU and PCIe lanes of decode to work.\n\n")


def run_demo(max_new_tokens: int = 80, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    rule = "-" * 78
    if "mixtral-8x7b" in zoo_names():
        big = load_spec("mixtral-8x7b")
        out.write(f"{rule}\nWhy offloading: the model breakdown of {big.name} (from its published config)\n{rule}\n")
        out.write(format_breakdown(big) + "\n")
        out.write(f"=> {human(big.total_bytes, 'B')} of weights against a 24 GiB card: "
                  f"{100 * 24 * 2**30 / big.total_bytes:.0f}% of the model fits; a token reads only "
                  f"{human(big.bytes_of(big.active_params), 'B')} of it.\n\n")
        run_simulation(big, out)
    model, tok = load_engine("reference", "demo")
    spec = model.spec
    out.write(f"{rule}\nThe demo model: a small Mixtral trained on Python's documentation\n{rule}\n")
    out.write(format_breakdown(spec) + "\n\n")
    out.write(f"{rule}\nGenerating (greedy, reference engine on this CPU)\n{rule}\n")
    for prompt in PROMPTS:
        stream_text(model, tok, prompt, max_new_tokens, SamplingConfig(), out=out)
        out.write("\n")
    text = " ".join(PROMPTS) + ' The "while" statement is used for repeated execution as long as an expression is true.'
    counts = expert_counts(model, tok.encode(text))
    out.write(f"{rule}\nExpert choices of the trained routers on {len(tok.encode(text))} tokens "
              f"(measured; 1.00 = uniform)\n{rule}\n")
    for layer, c in counts.items():
        out.write(f"layer {layer}: picks {usage_bar(c)}  normalized entropy {normalized_entropy(c):.2f}\n")
