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
# # 06 · Partitioning: which rows live on the GPU
#
# Chapter 02 ran Mixtral-8x7B on an RTX 4090 desktop with llama.cpp's plan: whole layers on the GPU, the rest on the CPU. ScheInfer cuts finer. Every weight block (an expert, the attention projections, the lm_head) is split along its rows into three slices:
#
# - **GG** rows live in GPU memory and the GPU computes them;
# - **CG** rows live in host memory, are copied over PCIe at the step that needs them, and the GPU computes them;
# - **CC** rows live in host memory and the CPU computes them.
#
# Only GG is a memory decision, made once per machine and workload by the **partition**; the CG/CC boundary moves at every step (**token assignment**, chapter 07). This chapter
#
# 1. checks that the split computes exactly what the unsplit expert computes;
# 2. prices work with the **cost model** and computes the **bound** no placement can beat;
# 3. walks through the **adaptive partition** step by step for Mixtral-8x7B on `rtx4090-desktop`: fixed state, linear program, rounding, polish;
# 4. shows the resulting plan against the baselines, and its GPU memory;
# 5. hands you the **plan tuner**: change the machine and the workload, watch the plans move.
#
# **Whose algorithm is this?** The ScheInfer paper (arXiv 2411.15715) describes CC/CG/GG slices, an adaptive partition and per-step token assignment in its public abstract; its cost model and algorithms are not public. The cost model, the linear program, the rounding and the polish below are **offloadkit's own formulation** of those ideas (docs/DESIGN.md §4–6), not the paper's. Every speed in this chapter is **simulated** by that cost model on a named hardware profile, not measured.

# %%
import plotly.graph_objects as go
import torch

from offloadkit.hardware.catalog import load_profile
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.spec import ModelSpec
from offloadkit.model.writer import make_config, random_weights
from offloadkit.model.zoo import load_spec
from offloadkit.plan.bounds import workload_bounds
from offloadkit.plan.costmodel import CostModel
from offloadkit.plan.estimate import WorkloadCounts, expected_time
from offloadkit.plan.partition import fixed_state, partition, solve_lp
from offloadkit.plan.plans import splittable
from offloadkit.plan.plans import Workload, gpu_bytes_breakdown
from offloadkit.plan.policies import make_plan
from offloadkit.plan.routing import parse_routing
from offloadkit.runtime.compare import compare_policies
from offloadkit.viz import plan_tuner as pt

torch.set_num_threads(2)
mixtral = load_spec("mixtral-8x7b")
rtx4090 = load_profile("rtx4090-desktop")
GIB = 2**30

# %% [markdown]
# ## 1. CC + CG + GG = the expert
#
# An expert is a SwiGLU FFN, `y = W2 · (silu(W1 x) ⊙ W3 x)`, with `W1`, `W3` of shape [I, H] and `W2` of shape [H, I]. Row `j` of the intermediate dimension uses row `j` of `W1` and `W3` and column `j` of `W2`, and nothing else: the intermediate rows are independent until `W2` sums over them. So cutting the rows into three ranges and adding the three partial outputs gives the expert's output. That is why a block can be split anywhere, and why the three slices can run on three different lanes.
#
# We check it on a tiny random Mixtral (float32): the reference model's own expert function, once unsplit and once over three row ranges.

# %%
tiny = ModelSpec.from_config(make_config("mixtral", layers=1, hidden=64, intermediate=384, experts=4,
                                         dtype="float32"), "tiny-mixtral")
ref = ReferenceModel(tiny, random_weights(tiny, seed=0))
x = torch.randn(5, tiny.hidden_size, generator=torch.Generator().manual_seed(0))  # 5 tokens
rows = tiny.expert_intermediate_size
gg, cg = 128, 256  # rows [0, 128) GG, [128, 256) CG, [256, 384) CC
whole = ref.expert(0, 1, x)
parts = {name: ref.expert(0, 1, x, rows=r) for name, r in
         (("GG", (0, gg)), ("CG", (gg, cg)), ("CC", (cg, rows)))}
split = parts["GG"] + parts["CG"] + parts["CC"]

# %% [markdown]
# Exactly equal? Not bit for bit: float32 addition is not associative, and the split adds the `I` products of each output in a different order (three partial sums, then their sum). How far apart may they be? A dot product of `n` terms computed in float32 is within `n · u · Σ|terms|` of the exact one (first order, `u = 2⁻²⁴` the unit roundoff), and the intermediate `h = silu(W1 x) ⊙ W3 x` is itself a dot product of `H` terms. So each of the two results is within about `(H + I) · u · Σⱼ |W2ᵢⱼ| |hⱼ|` of the exact value, and they are within twice that of each other. That per-element bound is the tolerance, not an arbitrary `1e-5`. It is a worst case (every rounding error in the same direction), so the observed difference sits far below it; what matters is that a wrong split (a row dropped or counted twice) would miss it by orders of magnitude.

# %%
u = 2.0**-24
p = tiny.moe_prefix(0)
w2 = ref.weights[f"{p}.experts.1.w2.weight"]
h = torch.nn.functional.silu(x @ ref.weights[f"{p}.experts.1.w1.weight"].T) * (x @ ref.weights[f"{p}.experts.1.w3.weight"].T)
tol = 2 * (tiny.hidden_size + rows) * u * (h.abs() @ w2.abs().T)
diff = (split - whole).abs()
print(f"largest |split - whole| = {diff.max():.2e}; the bound there {tol.flatten()[diff.argmax()]:.2e}; "
      f"largest output {whole.abs().max():.2f}")
assert bool((diff <= tol).all()), "the split expert is further from the whole one than rounding explains"
print("CC + CG + GG equals the unsplit expert within float32 rounding, element by element")

# %% [markdown]
# ## 2. The cost model, and the bound no plan can beat
#
# The cost model prices a task on a lane as `overhead + max(bytes / bandwidth, FLOPs / FLOP rate)` (chapter 02). For one Mixtral expert (176 M parameters, 336 MiB in bf16) on `rtx4090-desktop` (spec sheets × effective fractions):

# %%
cost = CostModel(rtx4090, mixtral)
expert = next(b for b in mixtral.blocks() if b.kind == "expert")
print(f"{expert.name}: {expert.params / 1e6:.0f} M parameters, {mixtral.bytes_of(expert.params) / 2**20:.0f} MiB  "
      f"[simulated on {rtx4090.name}]")
for n in (1, 16, 512):
    print(f"  {n:>3} token{'s' if n > 1 else ' '}: CPU {cost.matmul_s('cpu', expert.params, n) * 1e3:7.2f} ms | "
          f"GPU if resident {cost.matmul_s('gpu', expert.params, n) * 1e3:5.2f} ms | "
          f"copy over PCIe {cost.copy_s('h2d', mixtral.bytes_of(expert.params)) * 1e3:5.2f} ms")

# %% [markdown]
# Copying an expert costs the same whatever the tokens; the CPU's cost grows with them once the arithmetic, not DRAM, is the limit. At one token the CPU is 2.5× faster than the copy; at 512 the copy is 9× faster.
#
# **The bound.** Whatever the placement, every weight row a phase uses must be read once: from GPU memory if resident, else either by the CPU or over PCIe (then by the GPU). `workload_bounds` solves a linear program over *any* placement and any per-step split with the lanes of the whole phase pooled (no waiting between layers, no overheads, no attention): no real schedule is faster. At decode it reduces to the host-resident active bytes over the sum of the DRAM and PCIe bandwidths.

# %%
w = Workload(prompt_tokens=512, gen_tokens=128)
routing = parse_routing("zipf:1.2")
bounds = workload_bounds(mixtral, rtx4090, w, routing)
print(f"bounds of mixtral-8x7b {w.label}, routing {routing.label} — simulated on {rtx4090.name}")
for phase, b in bounds.items():
    busy = ", ".join(f"{lane} {s:.2f} s" for lane, s in b.busy_s.items())
    print(f"  {phase:<8} {b.seconds:7.2f} s = {b.tokens_per_s:7.1f} tokens/s at best; bound by {b.bounding_lane:<4} "
          f"(lanes busy: {busy})")

# %% [markdown]
# ## 3. The adaptive partition, step by step
#
# `partition(spec, profile, workload, routing)` sizes the GG rows of every block to the machine and the workload, minimising the workload's expected time under the cost model. Four steps, each shown with its numbers for Mixtral-8x7B, pp512 + tg128, Zipf-1.2 routing, on `rtx4090-desktop`.
#
# ### 3a. Fixed state first
#
# Norms and routers are resident (tiny); the KV cache of every layer goes on the GPU if it fits; one prompt chunk's activations and two staging buffers for streamed slices (each as large as the largest block) are reserved. What is left is the **weight budget** for GG rows.

# %%
base, fixed = fixed_state(mixtral, rtx4090, w, ubatch=None, staging_buffers=2)
print(f"usable GPU memory {fixed.usable / GIB:.2f} GiB; KV cache of {fixed.kv_layers} layers on the GPU")
for k, v in fixed.breakdown.items():
    print(f"  {k:<22} {v / GIB:6.3f} GiB")
print(f"weight budget for GG rows: {fixed.budget / GIB:.2f} GiB of {mixtral.total_bytes / GIB:.1f} GiB of weights")

# %% [markdown]
# ### 3b. A linear program
#
# Variables: the GG rows `x_b` of every block, and, for each *scenario* (the prefill; the average decode step) and each layer, the rows each block computes on the CPU (`c`) and streams (`s`), with `c + s + x_b = rows_b`. The time of a layer `T` bounds each lane: CPU `Σ u·a(n)·c`, PCIe `Σ u·p·s`, GPU `Σ u·g(n)·(s + x)`, where `a`, `p`, `g` are the cost model's per-row prices and `u` the chance the block is used at such a step (hot experts have larger `u`). Minimise the scenarios' weighted `T`s subject to the weight budget. HiGHS solves it in milliseconds; its rows are continuous.

# %%
counts = WorkloadCounts.of(mixtral, w, routing, base.prefill_chunks(w.prompt_tokens))
x_lp = solve_lp(mixtral, cost, base, counts, fixed.budget)
objective = x_lp.pop("__objective__")
by_kind: dict[str, list[float]] = {}
for b in splittable(mixtral):
    held, total = by_kind.setdefault(b.kind, [0.0, 0.0]), mixtral.bytes_of(b.params)
    held[0] += x_lp[b.name] / b.rows * total
    held[1] += total
print(f"LP objective (its own estimate of the workload's weight time): {objective:.2f} s  [simulated]")
for kind, (held, total) in by_kind.items():
    print(f"  {kind:<9} {held / GIB:6.2f} of {total / GIB:6.2f} GiB GG ({100 * held / total:5.1f} %)")

# %% [markdown]
# The LP keeps nearly all the attention projections and the lm_head resident (every token uses them) and spends the rest on experts, hot ones first.
#
# ### 3c. Rounding, and 3d. polish
#
# Rows come in chunks of 128 (kernels stay efficient on whole tiles), so `x` is rounded down to the chunk and the memory left is refilled in the order of what the LP wanted. Then **repair** (`offloadkit.plan.repair`): moves (a block takes a chunk or all it lacks, from free memory or from another block) are kept while they lower `expected_time`, the token assigner's own estimate run on the workload's actual routing, step by step (`polish_evals` bounds how many estimates it may make: a count, not a clock, so the plan does not depend on the machine's load). Last, `make_plan("scheinfer", ...)` also starts the same search from the baselines' placements and keeps the best simulated plan.

# %%
stages = {
    "rounded (polish_evals=0)": partition(mixtral, rtx4090, w, routing, polish_evals=0),
    "polished (polish_evals=3000)": partition(mixtral, rtx4090, w, routing),
    "make_plan: + seeds from the baselines": make_plan("scheinfer", mixtral, rtx4090, w, routing),
}
print(f"{'stage':<40} {'GG weights':>10} {'expected weight time':>21}   [simulated on {rtx4090.name}]")
print(f"{'LP relaxation (continuous rows)':<40} {sum(v[0] for v in by_kind.values()) / GIB:>6.2f} GiB "
      f"{objective:>18.2f} s")
for name, plan in stages.items():
    gg = gpu_bytes_breakdown(plan, mixtral, w)["weights"]
    print(f"{name:<40} {gg / GIB:>6.2f} GiB {expected_time(mixtral, plan, cost, counts):>18.2f} s"
          + (f"   (seeded from {plan.meta['seeded_from']})" if plan.meta.get("seeded_from") else ""))

# %% [markdown]
# The LP's continuous answer is a lower estimate (it may keep fractions of a chunk and averages the decode steps); rounding costs a few per cent; the polish finds little or nothing more here, and seeding the search from the baselines' placements (the table says which one won; Fiddler's keeps whole hot experts resident) can win a little back. The estimates are the planner's (weights only, layer by layer); the simulator below adds attention, norms and the schedule.
#
# ## 4. Mixtral-8x7B on an RTX 4090 desktop
#
# Every policy planned and simulated on the same case, with the bound of each phase. The figures below are the plan tuner's, drawn once, without widgets.

# %%
comparison = compare_policies(mixtral, rtx4090, w, routing, policies=pt.TUNED_POLICIES)
print(comparison.table())

# %%
pt.draw_speed(go.Figure(), comparison)

# %%
pt.draw_speedup(go.Figure(), comparison)

# %% [markdown]
# Where the plans put the weights: scheinfer keeps about 90 % of every layer's attention and a slice of every expert resident (hotter experts more), and fills the GPU just as llama.cpp and Fiddler do; KTransformers keeps only the non-expert weights there, so most of its GPU sits empty.

# %%
pt.draw_plan(pt.plan_figure_skeleton(), comparison, mixtral, rtx4090)

# %%
plan = comparison.runs["scheinfer"].plan
for k, v in gpu_bytes_breakdown(plan, mixtral, w).items():
    print(f"scheinfer GPU memory: {k:<12} {v / GIB:6.2f} GiB")
print(f"usable: {rtx4090.gpu.usable_memory_gib:.2f} GiB on {rtx4090.name}")

# %% [markdown]
# ## 5. The plan tuner
#
# Change the machine (usable GPU memory, PCIe generation, DRAM bandwidth) or the workload (prompt, generation length, routing skew): the tuner derives a **what-if profile** from `rtx4090-desktop` (`offloadkit.hardware.whatif.what_if`), re-plans scheinfer and the three baselines, re-simulates them, and redraws the three figures in place. The redraw uses `compare_policies(quick=True)`: the decode time is the first 16 steps' time scaled to the whole generation, and scheinfer's plan is the partition without polish or seeding (the titles say so). The widgets need a live kernel (JupyterLab); a static rendering shows nothing here.
#
# Things to try: drop the GPU to 12 GiB (everything slows, scheinfer least); PCIe 3 (prefill, which streams, suffers most); DRAM at 120 GB/s (decode, which leans on the CPU, gains most); skew 0 (uniform routing: Fiddler's hot experts stop paying off).

# %%
tuner = pt.PlanTuner(mixtral, rtx4090)
tuner.widget()

# %% [markdown]
# The same panel driven from code: every control is a plain value, and `set` redraws once.

# %%
tuner.set(gpu_gib=16, pcie_gen=3)
print(tuner.status.value.replace("<b>", "").replace("</b>", "").replace("<br>", "\n"))
print(f"scheinfer decode on the what-if: {pt.trace(tuner.fig_speed, 'scheinfer').y[1]:.2f} tokens/s (simulated)")

# %% [markdown]
# ## What's next
#
# [Chapter 07](07_token_assignment.ipynb) opens the other half: at each step, how the host rows of each block are split between the CPU (CC) and streaming (CG), and why decode leans on the CPU and prefill on PCIe.
