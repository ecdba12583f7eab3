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
# # 02 · Hardware profiles and simulation
#
# Chapter 01 showed that Mixtral-8x7B is 87 GiB of weights and that a token reads 24 GiB of them. Whether that runs at 2 or 20 tokens/s depends on three pipes: the CPU's DRAM, the GPU's memory, and the PCIe link between them. This chapter
#
# 1. **measures** this machine (the probe), and reads the **catalog** of moderate GPU systems (spec sheets × effective fractions, every figure with its source);
# 2. turns a profile into a **cost model**: the time of a task on a lane (`cpu`, `gpu`, `h2d`, `d2h`) from a roofline;
# 3. builds the **task graph** of an inference step and **simulates** it in virtual time: a Mixtral-8x7B on an RTX 4090 desktop, lane by lane;
# 4. shows what changes between **prefill** and **decode**.
#
# Every number below is labelled: **measured** (on this machine), **spec sheet** (catalog), or **simulated** (the cost model on a named profile). The cost model and the simulator are offloadkit's own formulation, not the paper's.

# %%
import torch
from offloadkit.hardware.catalog import load_catalog, load_profile
from offloadkit.hardware.probe import run_profile
from offloadkit.model.zoo import load_spec
from offloadkit.plan.plans import Workload, max_ngl, gpu_bytes_breakdown, check_fits, all_gpu
from offloadkit.runtime.sim import simulate
from offloadkit.viz import hardware as hw
from offloadkit.viz.timeline import timeline_figure

torch.set_num_threads(2)
mixtral = load_spec("mixtral-8x7b")

# %% [markdown]
# ## 1. This machine, measured
#
# `offloadkit profile` measures the DRAM read with `offloadkit.hardware.stream.measure_read` (the same routine chapter 04 and `offloadkit bench kernels` print), the CPU expert kernel's throughput across token counts, and the per-call overhead (and, on a machine with CUDA, the GPU and PCIe). Here we run it in `quick` mode (a smaller expert, a few seconds) and write the profile to a temporary file.
#
# The read keeps every sample, and the profile records their spread: on a shared machine (a cloud VM) the read can move by 2× within an hour, so this figure and the one chapter 04 prints may differ for that reason alone.

# %%
import pathlib
import tempfile

here, path = run_profile(pathlib.Path(tempfile.mkdtemp()) / "this-machine.toml", quick=True, progress=False)
print(f"measured on this machine: {here.cpu.name}, {here.cpu.cores} cores")
print(f"  DRAM read       {here.cpu.dram_bandwidth_gbps:6.1f} GB/s")
print(f"     how: {here.sources['cpu.dram_bandwidth_gbps']}")
print(f"  CPU f32 / bf16  {here.cpu.flops_f32_tflops * 1e3:6.1f} / {here.cpu.flops_bf16_tflops * 1e3:.1f} GFLOP/s")
print(f"  GPU             {here.gpu.name if here.gpu else 'none (CPU-only machine)'}")

# %%
hw.roofline_figure(here, mixtral)

# %% [markdown]
# The dashed line is this machine's **roof**: `min(peak FLOP rate, DRAM read × 2n / 2 bytes)` for a bf16 weight shared by `n` tokens, from the figures just measured. It bends at the ridge, where the expert stops being bound by DRAM and starts being bound by the CPU's arithmetic: a handful of tokens per weight. Decode sits far left (1 token), prefill far right (hundreds).
#
# The crosses are what the probe measured: its expert kernel's time at each token count, scaled per parameter to a Mixtral expert. The solid line is what the cost model makes of them: the measured time, but never faster than reading the weights at the measured DRAM bandwidth. Where crosses rise *above* the roof at a few tokens, the roof's assumption (every weight comes from DRAM) did not hold when the probe measured: the quick probe's expert (1024 × 2048, 12 MiB in bf16) fits in the last-level cache of many CPUs. A Mixtral expert (336 MiB in bf16) never does, hence the floor. `offloadkit profile` without `--quick` measures a 4096 × 4096 expert (96 MiB in bf16), past any cache.

# %% [markdown]
# ## 2. The catalog: moderate GPU systems
#
# Each profile is a TOML file under `data/hardware/` with a source for every figure and an explicit effective fraction where a spec peak is discounted (`offloadkit hardware show NAME` prints them).

# %%
catalog = load_catalog()
for p in catalog:
    print(f"{p.name:<22} {p.cpu.dram_bandwidth_gbps:6.1f} GB/s DRAM | {p.gpu.name:<24} {p.gpu.usable_memory_gib:5.1f} GiB, "
          f"{p.gpu.memory_bandwidth_gbps:6.0f} GB/s | {p.link.name:<13} {p.link.h2d_pinned_gbps:5.1f} GB/s")
hw.catalog_figure(catalog + [here])

# %% [markdown]
# Three orders of magnitude separate the pipes: GPU memory (~1 TB/s), DRAM (~50–150 GB/s), PCIe (~12–25 GB/s). The next figure prices **one Mixtral expert** (176 M parameters, bf16) on an RTX 4090 desktop three ways: on the CPU, on the GPU if it were resident, and streamed over PCIe first. At decode the CPU beats streaming; at prefill streaming wins, because its cost does not grow with tokens. That crossing is what ScheInfer's token assignment exploits.

# %%
rtx4090 = load_profile("rtx4090-desktop")
hw.block_time_figure(rtx4090, mixtral)

# %% [markdown]
# ## 3. Plans and memory
#
# A **plan** says which weights live on the GPU. For now three simple ones: `all-cpu`, `all-gpu`, and llama.cpp's `-ngl N` (N whole layers on the GPU). A plan must fit: resident weights + KV cache + activations + staging buffers ≤ usable GPU memory.

# %%
w = Workload(prompt_tokens=512, gen_tokens=128)
try:
    check_fits(all_gpu(mixtral), mixtral, rtx4090, w)
except Exception as e:
    print(type(e).__name__, ":", e)
n = max_ngl(mixtral, rtx4090, w)
print(f"largest ngl that fits on {rtx4090.name}: {n} of {mixtral.n_layers} layers")

# %% [markdown]
# ## 4. A simulated Mixtral-8x7B on an RTX 4090 desktop
#
# `simulate` builds the task graph of every step (prefill 512 tokens, then 128 decode steps), prices each task with the cost model, and runs it in virtual time: a task starts when its lane is free and its inputs are ready. Shapes only: no weights are needed. Routing is Zipf-skewed (some experts hot).

# %%
r = simulate(mixtral, rtx4090, f"ngl:{n}", w, "zipf:1.2")
print(r.table())

# %% [markdown]
# The prefill step: with many tokens, llama.cpp's op offload copies the weights of CPU layers to the GPU and multiplies there, so the `h2d` lane is busy the whole time.

# %%
timeline_figure(r.timeline, step=0)

# %% [markdown]
# One decode step: one token. Copying 100 MB of weights to multiply them by one vector would be absurd, so the CPU layers compute on the CPU — and the GPU idles while it waits. This idle GPU, and the idle PCIe link at decode, are what ScheInfer's CC/CG/GG split puts to work (a later chapter).

# %%
timeline_figure(r.timeline, step=1)

# %% [markdown]
# ## 5. Prefill vs decode, across plans and machines
#
# All **simulated**: the same model and workload under the three plans of section 3 on each catalog machine. A plan that does not fit the GPU says so (`all-gpu` fits none of them: 87 GiB of weights).

# %%
from offloadkit.errors import PlanError
rows = []
for p in catalog:
    for plan in ("all-cpu", f"ngl:{max_ngl(mixtral, p, w)}", "all-gpu"):
        try:
            res = simulate(mixtral, p, plan, w, "zipf:1.2", record=False)
        except PlanError:  # the plan does not fit this GPU
            rows.append((p.name, plan, None, None, "", ""))
            continue
        rows.append((p.name, plan, res.prefill_tokens_per_s, res.decode_tokens_per_s,
                     res.bounding_lane("prefill"), res.bounding_lane("decode")))
print(f"{'profile':<22} {'plan':<8} {'prefill tok/s':>13} {'decode tok/s':>12}  bound (prefill/decode)   [simulated]")
for name, plan, pp, tg, bp, bd in rows:
    if pp is None:
        print(f"{name:<22} {plan:<8} {'does not fit this GPU':>27}")
    else:
        print(f"{name:<22} {plan:<8} {pp:>13.1f} {tg:>12.2f}  {bp}/{bd}")

# %% [markdown]
# ## 6. The simulator computes the right thing
#
# A simulator that only adds up times could be wrong about *what* runs where. With `weights=`, the simulator also executes every task on real tensors (on the CPU, in the task order it scheduled), so we can check that a plan computes exactly the reference model's logits. Here a tiny random Mixtral under `ngl:1`:

# %%
from offloadkit.model.writer import make_config, random_weights
from offloadkit.model.spec import ModelSpec
from offloadkit.model.reference import ReferenceModel

tiny = ModelSpec.from_config(make_config("mixtral", layers=2, hidden=64, experts=4, vocab=300, dtype="float32"), "tiny")
weights = random_weights(tiny, seed=0)
ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(0))
sim = simulate(tiny, rtx4090, "ngl:1", Workload(6, 3), weights=weights, prompt_ids=ids)
got = torch.cat(sim.tokens, dim=1)[0].tolist()  # the prefill's token, then one per decode step
ref = ReferenceModel(tiny, weights).greedy(ids, len(got))[0].tolist()
print("simulated-with-numerics tokens:", got, " reference:", ref)
assert got == ref

# %% [markdown]
# ## What's next
#
# [Chapter 03](03_cuda_kernels.ipynb) writes the GPU lane's CUDA kernels; [chapter 04](04_cpu_experts.ipynb) the CPU lane's Numba experts, measured against this machine's DRAM bandwidth.
