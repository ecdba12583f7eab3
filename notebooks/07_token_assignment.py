# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Token assignment: CPU or PCIe, at every step
#
# Chapter 06 decided which rows are **GG** (resident on the GPU). The other rows of a block live in host memory, and at every step each of them can be computed by the CPU (**CC**) or copied over PCIe and computed by the GPU (**CG**). That split costs no memory, so it is free to change from one step to the next: **token assignment** (`offloadkit.plan.assign.TokenAssigner`, the `balance` rule) chooses it for the tokens the step actually has and the experts the router actually picked. This chapter
#
# 1. shows why decode leans on the CPU and prefill on streaming, for one Mixtral expert and `n = 1 … 512` tokens;
# 2. reads which experts the demo model's tokens chose, from its recorded routing trace;
# 3. draws one step's assignment per layer and per block;
# 4. compares a step's timeline without token assignment (host rows always on the CPU) and with it;
# 5. gives you a scrubber over the steps of a generation.
#
# As in chapter 06, the `balance` rule and its cost model are **offloadkit's own formulation** of the per-step assignment the ScheInfer paper (arXiv 2411.15715) names in its public abstract. Every time here is **simulated** on a named profile; only the routing trace is **measured** (the choices a real model made).

# %%
import pydoc_data.topics
from dataclasses import replace

import numpy as np
import torch

from offloadkit.hardware.catalog import load_profile
from offloadkit.model.zoo import load_spec
from offloadkit.plan.plans import Workload
from offloadkit.plan.policies import make_plan
from offloadkit.plan.routing import RoutingTrace, record_trace
from offloadkit.runtime.engines import load_engine
from offloadkit.runtime.sim import simulate
from offloadkit.viz import assignment as va
from offloadkit.viz.timeline import timeline_figure

torch.set_num_threads(2)
mixtral = load_spec("mixtral-8x7b")
rtx4090 = load_profile("rtx4090-desktop")

# %% [markdown]
# ## 1. Prefill vs decode: one expert, three ways
#
# Take one Mixtral expert (336 MiB in bf16) with no GG rows, used by `n` tokens. Its host rows can all run on the CPU (time grows with `n` once the CPU is compute-bound), all be streamed (a copy costs the same for any `n`, then a quick GPU matmul), or be split: stream `s` rows while the CPU computes the rest, both lanes at once. `balance` picks the `s` (in chunks of 128 rows) that minimises the busier lane.

# %%
curve = va.balance_curve(mixtral, rtx4090)
print(f"{curve.block}, no GG rows — simulated on {rtx4090.name}")
print(f"{'tokens':>6} {'CPU only':>10} {'stream all':>11} {'balanced':>9} {'streamed':>9}")
for n, c, s, b, share in zip(curve.tokens, curve.cpu_only_s, curve.stream_all_s, curve.balanced_s,
                             curve.streamed_share, strict=True):
    print(f"{n:>6} {c * 1e3:>7.2f} ms {s * 1e3:>8.2f} ms {b * 1e3:>6.2f} ms {100 * share:>8.0f} %")
va.balance_figure(curve, rtx4090.name)

# %% [markdown]
# At **decode** (1 token) the CPU reads the expert from DRAM at 62 GB/s, 2.5× faster than PCIe copies it at 25 GB/s, so most rows stay on the CPU, but not all: streaming 29 % of them while the CPU does the other 71 % finishes both lanes together, 28 % sooner than the CPU alone. Up to ~16 tokens nothing changes (the CPU is still bound by reading the weights). Past that the CPU's arithmetic becomes the limit and its time grows with `n`, while the copy's does not: by **prefill** sizes (512 tokens) 91 % of the rows stream and the split is 10× faster than the CPU alone. A fixed rule (llama.cpp streams everything from 32 tokens, nothing below) is right at the two ends and wrong in between; the balanced split is never worse than either.
#
# ## 2. Which experts the tokens chose: a recorded trace
#
# The split depends on how many tokens each expert gets, which the router decides at run time. `data/traces/demo-mixtral-pydoc.npz` is a **measured** routing trace: the demo checkpoint (a 4-layer, 8-expert, top-2 Mixtral trained on Python's documentation) reading 256 tokens of the `for` statement's help text, then generating 64 tokens greedily, with every token's experts recorded in every layer.

# %%
trace = RoutingTrace.load("demo-mixtral-pydoc.npz")
print(f"{trace.model}: {len(trace.layers)} MoE layers, {trace.n_experts} experts, top-{trace.top_k}; "
      f"{trace.n_tokens} tokens in {len(trace.step_tokens)} steps (prefill {trace.step_tokens[0]}, then 1 per step)")
print("recorded:", {k: trace.meta[k] for k in ("source", "prompt", "decoding", "machine")})

# %% [markdown]
# That the trace is what this model does, not a made-up file: run the demo model's prefill on the same prompt here and compare its choices with the trace's first 256 tokens.

# %%
model, tokenizer = load_engine("reference", "demo")
ids = tokenizer.encode(pydoc_data.topics.topics["for"])[: int(trace.step_tokens[0])]
again = record_trace(model, ids, 0)
same = (np.sort(again.experts, -1) == np.sort(trace.experts[:, : len(ids)], -1)).all(-1).mean()
print(f"tokens whose two experts match the trace in every layer: {100 * same:.1f} % (measured on this machine)")

# %%
prefill_counts = va.trace_counts(trace, slice(0, 1))
decode_counts = va.trace_counts(trace, slice(1, None))
va.expert_counts_figure(prefill_counts, f"Tokens per expert in the prefill ({trace.step_tokens[0]} tokens × top-"
                        f"{trace.top_k})<br><sup>measured: routing trace of {trace.model} "
                        f"({trace.meta['prompt']})</sup>", trace.layers)

# %%
va.expert_counts_figure(decode_counts, f"Tokens per expert over the {len(trace.step_tokens) - 1} decode steps"
                        f"<br><sup>measured: routing trace of {trace.model}, greedy decoding</sup>", trace.layers)

# %% [markdown]
# Routing is far from uniform: uniform routing would give each expert 64 of the prefill's 512 choices per layer, but the busiest expert of a layer gets several times the tokens of the quietest (the ratios are printed below). At a decode step only 2 of 8 experts of a layer have work at all, so which ones they are decides what the step reads. A plan's GG rows should favour the hot experts, and at each step the assigner only splits the experts that were picked, with the tokens they got.

# %%
steps = trace.step_tokens.size
ratio = prefill_counts.max(axis=1) / prefill_counts.min(axis=1)
print("prefill, busiest / quietest expert per layer:", [f"{r:.1f}x" for r in ratio])
hot = [int(np.argmax(decode_counts[i])) for i in range(len(trace.layers))]
print("hottest expert per layer over the decode steps:", {f"L{lay}": f"E{e}" for lay, e in zip(trace.layers, hot, strict=True)})
print(f"share of decode tokens that used it: "
      f"{[f'{decode_counts[i, e] / (steps - 1):.0%}' for i, e in enumerate(hot)]}")

# %% [markdown]
# ## 3. One step's assignment, per layer
#
# Now at full size: Mixtral-8x7B's ScheInfer plan on `rtx4090-desktop` (chapter 06) for pp512 + tg32. The demo trace cannot drive Mixtral (4 layers against 32), so the routing is synthetic, Zipf-skewed with exponent 1.2, seeded. The scrubber object of section 5 simulates the whole generation once; here we draw two of its steps with the static figure functions.

# %%
w = Workload(prompt_tokens=512, gen_tokens=32)
plan = make_plan("scheinfer", mixtral, rtx4090, w, "zipf:1.2")
scrubber = va.StepScrubber(mixtral, rtx4090, plan, w, "zipf:1.2")
va.assignment_figure(scrubber.splits(0), f"Token assignment · {scrubber.label(0)}", rtx4090.name)

# %%
va.assignment_figure(scrubber.splits(1), f"Token assignment · {scrubber.label(1)}", rtx4090.name)

# %% [markdown]
# The green GG part is the plan's; red and blue are the step's. In the **prefill** every expert is used, and about half of the host bytes stream: the experts with the most tokens (whose CPU time grows with them) go over PCIe, the ones with few tokens stay on the CPU, until both lanes take about as long. At **decode** only two experts per layer are used (so the bars are shorter: the step reads less), and most host rows are computed on the CPU. Layers whose two chosen experts are both fully resident need neither. One layer per block:

# %%
va.layer_assignment_figure(scrubber.splits(1), 0, scrubber.label(1), rtx4090.name)

# %% [markdown]
# ## 4. A step with and without token assignment
#
# The same plan (the same GG rows) under two rules: `cpu` (host rows always on the CPU: no CG, the PCIe link idle) and `balance`. Simulated on the same routing.

# %%
plan_cpu = replace(plan, assign="cpu", label="scheinfer GG, cpu rule")
before = simulate(mixtral, rtx4090, plan_cpu, w, "zipf:1.2")
after = scrubber.result
print(f"{'rule':<8} {'prefill tok/s':>13} {'decode tok/s':>12}   [simulated on {rtx4090.name}]")
for name, r in (("cpu", before), ("balance", after)):
    print(f"{name:<8} {r.prefill_tokens_per_s:>13.1f} {r.decode_tokens_per_s:>12.2f}")

# %%
timeline_figure(before.timeline, step=0, title=f"Prefill, host rows on the CPU (cpu rule)<br><sup>"
                f"{before.timeline.label}</sup>")

# %%
timeline_figure(after.timeline, step=0, title=f"Prefill, token assignment (balance)<br><sup>"
                f"{after.timeline.label}</sup>")

# %% [markdown]
# Without token assignment the prefill is one long CPU lane while the `h2d` lane and the GPU idle. With it the weights stream on `h2d` while the CPU computes the rest, and the step is several times shorter. At decode the gain is smaller (most rows stay on the CPU anyway), but the link still takes its share:

# %%
timeline_figure(before.timeline, step=1, title=f"Decode step 1, cpu rule<br><sup>{before.timeline.label}</sup>")

# %%
timeline_figure(after.timeline, step=1, title=f"Decode step 1, balance<br><sup>{after.timeline.label}</sup>")

# %% [markdown]
# ## 5. The step scrubber
#
# Move the slider over the generation's steps (0 is the prefill): the step's assignment and its timeline redraw in place. Watch the decode steps differ: the router picks other experts, some resident, some not, and the split follows. (The widget needs a live kernel.)

# %%
scrubber.widget()

# %%
scrubber.show(7)  # the slider's callback, from code
print(scrubber.label(7), "—", f"{sum(s.cg * s.bytes_per_row for s in scrubber.splits(7)) / 2**20:.0f} MiB streamed")

# %% [markdown]
# ## What's next
#
# The plans and rules here are simulated. The engine chapters run them on a real CPU and, where there is one, a real GPU, and measure.
