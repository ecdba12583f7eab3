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
# # 00 · Quickstart: the whole engine in a few cells
#
# offloadkit runs a Mixture-of-Experts model that does not fit its GPU by splitting every weight block into slices: **GG** rows that live on the GPU, **CG** rows that stream over PCIe to it, **CC** rows the CPU computes where they lie. The split is sized to the machine (ScheInfer, [arXiv 2411.15715](https://arxiv.org/abs/2411.15715), reimplemented from its published description). This notebook goes through the whole path once, on whatever machine it runs on, a CPU-only laptop included:
#
# 1. load the demo model (a small Mixtral trained on Python's documentation);
# 2. measure this machine (a quick profile, about half a minute);
# 3. plan: the demo model for this machine, and Mixtral-8x7B for an RTX 4090 desktop;
# 4. generate text with the hybrid engine, and check its tokens against the reference model;
# 5. the timelines of both plans, and ScheInfer's speedup over llama.cpp, Fiddler and KTransformers.
#
# Every number says where it comes from: **measured** (a real run on this machine, named), or **simulated** (offloadkit's cost model on a named hardware profile). On a machine without a GPU the hybrid engine runs on the `LoopbackDevice`, CPU threads standing in for the GPU's streams: its tokens are real, its times are CPU times and are labelled so.

# %%
import time

import torch

from offloadkit.course import engine_tour as et
from offloadkit.hardware.catalog import load_profile
from offloadkit.hardware.probe import build_profile, measure
from offloadkit.model.checkpoint import open_checkpoint
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.summary import format_breakdown
from offloadkit.model.tokenizer import load_tokenizer
from offloadkit.model.zoo import load_spec, resolve_model
from offloadkit.plan.plans import Workload, gpu_bytes_breakdown
from offloadkit.plan.policies import make_plan
from offloadkit.runtime.compare import compare_policies
from offloadkit.runtime.sim import simulate
from offloadkit.viz import streaming as vs
from offloadkit.viz.timeline import timeline_figure

torch.set_num_threads(2)
started = time.perf_counter()
HAS_GPU = torch.cuda.is_available()
print("this machine has a CUDA GPU:", torch.cuda.get_device_name(0) if HAS_GPU else "no")

# %% [markdown]
# ## 1. The demo model
#
# A Mixtral-architecture checkpoint in `data/models/demo-mixtral`: 8 experts per layer, 2 chosen per token, 7.4 MiB in bf16, read memory-mapped. Its breakdown shows the shape of every MoE model: most bytes are in the experts.

# %%
folder = resolve_model("demo")
ckpt = open_checkpoint(folder)
spec, tok = ckpt.spec, load_tokenizer(folder)
reference = ReferenceModel(spec, ckpt)
print(format_breakdown(spec))

# %% [markdown]
# ## 2. Measure this machine
#
# `offloadkit profile --quick` measures the DRAM read bandwidth, the CPU expert kernels' time against tokens, and the CPU engine's fixed costs; on a machine with a CUDA GPU it measures the GPU and the PCIe link too. Here is the same probe from Python (no file written):

# %%
t0 = time.perf_counter()
here = build_profile(measure(quick=True, progress=False))
print(f"measured in {time.perf_counter() - t0:.0f} s: {here.name}")
print(f"  {here.description}")
print(f"  DRAM read {here.cpu.dram_bandwidth_gbps:.1f} GB/s, {here.cpu.cores} cores, GPU: "
      f"{here.gpu.name if here.gpu else 'none'}")

# %% [markdown]
# ## 3. Plan
#
# ### The demo model, for this machine
#
# Where the probe found no GPU (a CPU-only machine), there is no GPU to plan for. To still see a real hybrid plan, the demo model is planned for **this machine's measured CPU** plus a **catalog GPU and link** (the RTX 4090 desktop's spec-sheet figures), and because 7.4 MiB would fit any GPU whole, that GPU's usable memory is capped at 4 MiB with a what-if (`what_if(gpu_gib=...)`). The profile's name says all three. Where this machine has a GPU, its own measured profile is used as it is.

# %%
demo_profile = here if here.gpu is not None else et.hybrid_profile(here, "rtx4090-desktop", gpu_gib=0.004)
demo_w = Workload(prompt_tokens=16, gen_tokens=16)
demo_plan = make_plan("scheinfer", spec, demo_profile, demo_w)
gg = gpu_bytes_breakdown(demo_plan, spec, demo_w)["weights"]
print(f"profile: {demo_profile.name}")
print(f"plan {demo_plan.name}: {gg / 2**20:.2f} MiB of {spec.total_bytes / 2**20:.2f} MiB resident on the GPU "
      f"({gg / spec.total_bytes:.0%}); host rows: {demo_plan.assign} rule, {demo_plan.staging_buffers} staging buffer(s)")
assert 0 < gg < spec.total_bytes, "the demo plan should split the model between CPU and GPU"

# %% [markdown]
# ### Mixtral-8x7B, for an RTX 4090 desktop (simulated)
#
# The case the paper is about: 87 GiB of weights, a 24 GiB card. Only the model's published config is needed (no weights): the plan is made on the catalog profile, and everything about it is **simulated**.

# %%
mixtral, rtx4090 = load_spec("mixtral-8x7b"), load_profile("rtx4090-desktop")
big_w = Workload(prompt_tokens=512, gen_tokens=128)
big_plan = make_plan("scheinfer", mixtral, rtx4090, big_w, "zipf:1.2")
big_gg = gpu_bytes_breakdown(big_plan, mixtral, big_w)["weights"]
print(f"plan {big_plan.name} of {mixtral.name} on {rtx4090.name} ({big_w.label}): {big_gg / 2**30:.1f} GiB of "
      f"{mixtral.total_bytes / 2**30:.1f} GiB resident ({big_gg / mixtral.total_bytes:.0%}), host rows: "
      f"{big_plan.assign} rule  [simulated]")

# %% [markdown]
# ## 4. Generate with the hybrid engine
#
# `run_hybrid` opens the engine on the plan (on the `LoopbackDevice` here, its copies slowed to the profile's PCIe rate; on `CudaDevice` where there is a GPU), runs a warm-up, then a timed greedy generation of 16 tokens. Beside it, the reference model (plain torch, no plan) and the simulator (the same plan and prompt, executing every task on real tensors) generate the same continuation. All three must agree token for token: the split changes where each row is computed, never the result.

# %%
prompt = 'The "for" statement is used to'
prompt_ids = torch.tensor([tok.encode(prompt)])
run = et.run_hybrid(spec, ckpt, demo_profile, prompt_ids, 16, plan=demo_plan, reference=reference)
print(prompt + tok.decode(run.tokens))
print(f"\n[measured on {run.measured.timeline.machine}]")
print(f"  prompt of {prompt_ids.shape[1]} tokens: {run.measured.pp_tps:.0f} tok/s; continuation: "
      f"{run.measured.tg_tps:.1f} tok/s")
assert run.tokens == run.reference_tokens, "the hybrid engine must produce the reference model's greedy tokens"
assert run.simulated_tokens == run.reference_tokens
print("hybrid engine == reference model == simulator with numerics, token for token")

# %% [markdown]
# ## 5. Timelines
#
# Where every millisecond of a step went, lane by lane: `cpu` (the CC rows and whatever runs on the host), `gpu` (GG and CG rows), `h2d` (weights and activations going to the GPU), `d2h` (partial results coming back).
#
# ### The demo model's prefill: measured beside simulated
#
# Top: the engine's run on this machine (**measured**); bottom: the simulator's run of the same plan on the profile it was planned for (**simulated**). Each has its own time axis: on the loopback device the "GPU" is a CPU thread running torch twins of the CUDA kernels, orders of magnitude slower than the GPU the plan was sized for, so only the shape (which lanes work at once, in what order) compares, not the times.

# %%
m0, s0 = run.step(0)
vs.measured_vs_simulated_figure(m0, s0, f"demo-mixtral prefill ({prompt_ids.shape[1]} tokens), {demo_plan.name} plan")

# %% [markdown]
# ### Mixtral-8x7B's prefill on an RTX 4090 desktop (simulated)
#
# The same kind of picture at the paper's scale: a 512-token prompt. The `h2d` lane is busy almost all the time (streaming expert rows), while the CPU computes the rows that do not stream and the GPU computes what arrived.

# %%
big_run = simulate(mixtral, rtx4090, big_plan, Workload(512, 1), "zipf:1.2")
timeline_figure(big_run.timeline, step=0,
                title=f"Mixtral-8x7B prefill of 512 tokens, {big_plan.name} plan — simulated on {rtx4090.name}")

# %% [markdown]
# ## 6. Speedup over llama.cpp, Fiddler and KTransformers
#
# The same engine runs each system's placement as a plan (offloadkit's reimplementations of their placements, not their code; chapter 06): llama.cpp offloads whole layers, Fiddler keeps experts on the CPU and computes them there unless copying is cheaper, KTransformers computes every expert on the CPU. The table has three kinds of rows:
#
# - **measured**, demo model: each policy's plan run on the hybrid engine here, the same prompt, wall-clock seconds. On the loopback device the GPU lanes are CPU threads, so this measures the engine on this machine, not a GPU.
# - **simulated**, demo model: the same plans on the profile they were made for.
# - **simulated**, Mixtral-8x7B on `rtx4090-desktop`, pp512 + tg128, Zipf routing: the paper's setting.

# %%
runs = {"scheinfer": run}
for policy in et.TOUR_POLICIES[1:]:
    runs[policy] = et.run_hybrid(spec, ckpt, demo_profile, prompt_ids, 16, policy=policy, reference=reference)
    assert runs[policy].tokens == run.reference_tokens, policy
comparison = compare_policies(mixtral, rtx4090, big_w, "zipf:1.2", policies=et.TOUR_POLICIES)
rows = et.rows_from_runs(runs, "demo-mixtral") + et.rows_from_comparison(comparison)
print(f"demo-mixtral planned for: {demo_profile.name}\n")
print(et.speedup_table(rows))

# %%
et.speedup_figure(rows, "ScheInfer's speedup over each baseline (measured and simulated, as labelled)")

# %% [markdown]
# Read the rows by their source. The simulated Mixtral rows are the ones that speak to the paper's claim: ScheInfer's split keeps the CPU, the link and the GPU busy at once where the baselines leave two of them idle. The simulated demo rows say the same for a tiny model on a capped catalog GPU. The measured demo rows time the engine's real ordering on this machine, where the "GPU" is two CPU cores shared with everything else: they can go either way, and a run on a real GPU (`offloadkit generate --device cuda`) is what would measure the claim.

# %%
elapsed = time.perf_counter() - started
print(f"this notebook ran in {elapsed:.0f} s on {run.measured.timeline.machine.split(' + ')[0]}")

# %% [markdown]
# ## The chapters
#
# - [01 · MoE anatomy](01_moe_anatomy.ipynb): where a Mixture-of-Experts model keeps its bytes, and which experts a token uses.
# - [02 · Hardware and simulation](02_hardware_and_simulation.ipynb): hardware profiles, the cost model, the four-lane simulator.
# - [03 · CUDA kernels](03_cuda_kernels.ipynb): the GPU lane's kernels for GG and CG slices, and their CPU twins.
# - [04 · CPU experts](04_cpu_experts.ipynb): computing expert rows on the CPU at memory speed.
# - [05 · PCIe streaming](05_pcie_streaming.ipynb): pinned memory, double buffering, the pinned ring.
# - [06 · Partitioning](06_partitioning.ipynb): which rows stay resident on the GPU, sized to the machine.
# - [07 · Token assignment](07_token_assignment.ipynb): how each step splits the host rows between CPU and link.
# - [08 · The engine](08_engine.ipynb): the parts assembled, measured and simulated timelines, the prompt's effect.
# - [09 · Benchmarks](09_benchmarks.ipynb): against the real llama.cpp on the same weights, and the paper's experiment simulated.
