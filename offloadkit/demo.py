"""``offloadkit demo``: the main job, in one screen.

It shows the two facts the whole toolkit starts from: where a Mixture-of-Experts model keeps its
bytes (almost all in experts a token mostly does not use), and that offloadkit's model core runs a
real checkpoint: the small Mixtral-architecture model trained on Python's own documentation, read
memory-mapped from ``data/models/demo-mixtral``, generating text, with the expert choices its
routers learned; and Mixtral-8x7B simulated on an RTX 4090 desktop under ScheInfer's plan beside the
plans of llama.cpp, Fiddler and KTransformers (offloadkit's reimplementations of their placements, on one
cost model), with the speedups and the bound. The simulated section takes a few seconds (the partition's
LP and four simulations).
"""

from __future__ import annotations

import sys
from typing import TextIO

from offloadkit.hardware.catalog import load_profile
from offloadkit.model.expert_usage import expert_counts, normalized_entropy, usage_bar
from offloadkit.model.generate import SamplingConfig, stream_text
from offloadkit.model.summary import format_breakdown, human
from offloadkit.model.zoo import load_spec, zoo_names
from offloadkit.plan.plans import Workload, gpu_bytes_breakdown
from offloadkit.runtime.compare import compare_policies
from offloadkit.runtime.engines import load_engine

PROMPTS = ("The \"for\" statement is used to", "A class definition")
#: ScheInfer and the systems it is measured against (offloadkit's plans of them: offloadkit/plan/policies.py).
DEMO_POLICIES = ("scheinfer", "llamacpp", "fiddler", "ktransformers")
#: How each assignment rule runs the rows that are not resident, in a few words.
ASSIGN_WORDS = {"cpu": "on the CPU", "threshold": "copied to the GPU at steps of >= {n} tokens, else on the CPU",
                "fiddler": "each expert on the CPU or copied whole (Fiddler's rule)",
                "balance": "split per step between the CPU and streaming to the GPU"}


def run_simulation(spec, out: TextIO, profile: str = "rtx4090-desktop", routing: str = "zipf:1.2") -> None:
    """Simulate pp512 + tg128 of ``spec`` on ``profile`` under ScheInfer's plan and the baselines' plans,
    side by side with the speedups and the bound, and say what each plan keeps on the GPU."""
    hw, w = load_profile(profile), Workload(prompt_tokens=512, gen_tokens=128)
    rule = "-" * 78
    out.write(f"{rule}\nSimulated (cost model, no weights): {spec.name} on {profile}, pp512 + tg128, "
              f"routing {routing}\n{rule}\n")
    comparison = compare_policies(spec, hw, w, routing, policies=DEMO_POLICIES)
    out.write(comparison.table() + "\n\n")
    out.write(f"What each plan keeps resident on the GPU (simulated on {profile}):\n")
    for name, run in comparison.runs.items():
        if run.plan is None:
            out.write(f"  {name:<14} cannot run: {run.error}\n")
            continue
        gpu = gpu_bytes_breakdown(run.plan, spec, w)
        resident = gpu["weights"] / spec.total_bytes
        out.write(f"  {name:<14} {gpu['weights'] / 2**30:5.1f} GiB of weights ({resident:.0%} of the model), "
                  f"{sum(run.plan.kv_on_gpu)}/{spec.n_layers} layers' KV cache; host rows: "
                  f"{ASSIGN_WORDS[run.plan.assign].format(n=run.plan.stream_min_tokens)}\n")
    out.write("\nScheInfer's GG/CG/CC split puts the CPU, the PCIe link and the GPU to work at once; "
              "'offloadkit plan' describes its plan, 'offloadkit simulate --policy all' compares every policy.\n\n")


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
