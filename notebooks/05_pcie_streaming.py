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
# # 05 · Streaming weights over PCIe: pinned memory, double buffering, the pinned ring
#
# A **CG** slice lives in host memory and is copied to the GPU at the step that computes it (chapter 06 decides which rows are resident, chapter 07 how many host rows stream at each step). This chapter looks at the copy itself, the `h2d` lane:
#
# 1. why the copies come from **pinned** (page-locked) host memory, and what that is worth;
# 2. **double buffering**: why a streamed weight needs two staging buffers on the GPU before its copy can overlap the compute of the weight before it, simulated for Mixtral-8x7B and then measured on the hybrid engine;
# 3. a whole hybrid step run by the engine, its **measured** timeline beside the simulator's prediction of the same step, and why the two differ;
# 4. how the engine gets pinned memory for Mixtral's ~64 GiB of host rows without pinning them all: the **pinned ring**.
#
# Every figure says what it is: **measured** (a real run, the machine named), **simulated** (offloadkit's cost model on a named hardware profile), or **catalog figures** (spec sheets × effective fractions). The measured runs here use the engine's `LoopbackDevice`: CPU threads standing in for a GPU, so that the engine's ordering (streams, events, staging buffers) runs on any laptop. Its times are never GPU figures, and every figure made from them says so.

# %%
from dataclasses import replace

import torch

from offloadkit.errors import PlanError
from offloadkit.hardware.catalog import load_catalog, load_profile
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.spec import ModelSpec
from offloadkit.model.writer import make_config, random_weights
from offloadkit.model.zoo import load_spec
from offloadkit.plan.plans import Workload
from offloadkit.plan.policies import make_plan
from offloadkit.runtime.devices import LoopbackDevice
from offloadkit.runtime.engine import HybridEngine, measure_generation
from offloadkit.runtime.sim import simulate
from offloadkit.runtime.streaming import default_pinned_budget
from offloadkit.viz import streaming as vs

torch.set_num_threads(2)
GIB = 2**30
mixtral = load_spec("mixtral-8x7b")
rtx4090 = load_profile("rtx4090-desktop")
HAS_GPU = torch.cuda.is_available()
print("this machine has a CUDA GPU:", torch.cuda.get_device_name(0) if HAS_GPU else "no")

# %% [markdown]
# ## 1. Why pinned memory
#
# A GPU copies host memory with its own **copy engine** (DMA): it reads physical pages over PCIe while the CPU and the GPU's cores do other work. It can only do that from memory the operating system has promised not to move or swap out: **pinned** (page-locked) memory. From ordinary **pageable** memory (a `torch.empty`, a memory-mapped checkpoint) the driver first copies the bytes itself, chunk by chunk, into a pinned buffer of its own, and the DMA runs from there. So a pageable copy crosses host memory twice, is paced by the CPU's memcpy, and cannot run asynchronously: `copy_(..., non_blocking=True)` from pageable memory returns only when the copy is done, so it cannot overlap anything the same host thread would issue next.
#
# The price of pinning: page-locked memory cannot be swapped or reclaimed, and locking it takes time (the OS maps every page up front). Pinning most of a machine's RAM starves everything else.
#
# How much faster is pinned? Where this notebook runs on a machine with a CUDA GPU, it **measures** the four copies (host→device and device→host, pinned and pageable, 256 MiB each, best of 5) with `offloadkit.hardware.probe_cuda.copy_gbps`, the routine `offloadkit profile` uses. Without a GPU it shows the **catalog's** link figures instead; those are spec-sheet rates times assumed effective fractions, not measurements.

# %%
if HAS_GPU:
    gpu_name = torch.cuda.get_device_name(0)
    rates = [vs.measured_link_rates(gpu_name, 256 * 2**20)]
    source = f"measured on this machine's GPU ({gpu_name}): 256 MiB copies, best of 5"
else:
    rates = vs.catalog_link_rates(load_catalog())
    source = ("simulated/catalog figures (spec sheets × effective fractions) of the catalog profiles: "
              "this machine has no GPU, so nothing here is measured")
print("What this section shows:", source)
for r in rates:
    print(f"  {r.name.replace('<br>', ' '):<40} h2d {r.h2d_pinned:5.1f} GB/s pinned, {r.h2d_pageable:5.1f} pageable "
          f"({r.ratio('h2d'):.1f}×) | d2h {r.d2h_pinned:5.1f} / {r.d2h_pageable:5.1f} GB/s")
vs.pinned_vs_pageable_figure(rates, source)

# %% [markdown]
# Read the catalog's bars with care: the pinned figure is the PCIe generation's rate times 0.8, and the pageable one is **assumed** to be 0.3 × that, on every machine, so the 3.3× is the same everywhere by construction. The profile says so itself:

# %%
print(rtx4090.sources["link.h2d_pageable_gbps"])

# %% [markdown]
# On a real machine the pageable rate depends on the CPU's memcpy speed and the driver's staging, so it differs from machine to machine more than the pinned rate does; `offloadkit profile` measures both (run on a machine with a GPU, the figure above shows that machine's own). What the difference costs a step: the simulator prices copies at the pinned or the pageable rate by the plan's `pinned` flag. Mixtral-8x7B on `rtx4090-desktop`, a prefill of 2048 tokens whose expert rows all stream (the plan of section 2), **simulated**:

# %%
pp2048 = Workload(prompt_tokens=2048, gen_tokens=0)
stream2 = vs.streaming_plan(mixtral, 2, stream_min_tokens=32)
for pinned in (True, False):
    r = simulate(mixtral, rtx4090, replace(stream2, pinned=pinned), pp2048, "zipf:1.2", record=False)
    print(f"host rows {'pinned  ' if pinned else 'pageable'}: prefill {r.prefill_s:5.2f} s, h2d lane busy "
          f"{r.busy_prefill_s['h2d']:5.2f} s  [simulated on {rtx4090.name}]")

# %% [markdown]
# The step is bound by the `h2d` lane, so it grows by as much as the copies do. llama.cpp copies from its memory-mapped (pageable) weights, which is one of the reasons its op offload is slow (chapter 06's `llamacpp` plan has `pinned=False`).
#
# ## 2. Double buffering
#
# A streamed slice lands in a **staging buffer** in GPU memory; the GPU reads its weights there. With `k` staging buffers (the plan's `staging_buffers`), copy `i` goes into buffer `i mod k`, and it may only start once the compute that read the previous contents of that buffer (copy `i − k`) has ended: the step graph adds that dependency (`StepBuilder.stream_weights`), and the engine turns it into an event wait on the copy stream.
#
# - `k = 1`: copy, compute, copy, compute. While the GPU computes expert 3, the link idles, because the next copy has nowhere to go.
# - `k = 2`: copy `i + 1` runs into the other buffer while the GPU computes `i`. The link stays busy; the compute hides behind the copies (or the copies behind the compute, whichever is longer).
# - `k = 3` and more only help when copies or computes vary in length, so that one can run two ahead.
#
# Each buffer costs GPU memory: as much as the largest streamed slice (336 MiB for a whole Mixtral expert in bf16).
#
# ### Simulated: Mixtral-8x7B on an RTX 4090 desktop
#
# A plan whose expert rows all stream: attention, norms, routers and the lm_head resident, the KV cache on the GPU, every expert row in host memory, copied whenever an expert has at least 32 tokens (`threshold` rule). A prefill of 2048 tokens, Zipf-skewed routing. The same plan with 1, 2 and 3 staging buffers:

# %%
sims = {}
print(f"{'buffers':>7} {'step':>8} {'h2d busy':>9} {'gpu busy':>9} {'copy ∥ compute':>15}   [simulated on {rtx4090.name}]")
for k in (1, 2, 3):
    r = simulate(mixtral, rtx4090, vs.streaming_plan(mixtral, k, stream_min_tokens=32), pp2048, "zipf:1.2")
    sims[k] = vs.rebase(r.timeline, 0)
    tl = sims[k]
    print(f"{k:>7} {vs.step_s(tl):>7.3f}s {tl.busy_s('h2d'):>8.3f}s {tl.busy_s('gpu'):>8.3f}s "
          f"{vs.copy_compute_overlap_s(tl):>14.3f}s")

# %%
vs.staging_figure(sims, layers=(0, 1), what="Mixtral-8x7B prefill of 2048 tokens, every expert row streamed")

# %% [markdown]
# The first two of 32 layers. With **one** buffer the link (`h2d`) stops after every expert's copy until the GPU has computed that expert: the white gaps on the `h2d` row are the orange expert tasks above them, and a copy never runs while a streamed expert computes (0 s of overlap). With **two**, the copies run back to back and each expert's compute sits under the next expert's copy. The step gets shorter by almost exactly the GPU's expert compute, and no more: it cannot be shorter than the `h2d` lane's busy time, which is the same in all three runs (the same bytes over the same link). A third buffer changes nothing here; the link was already never waiting.
#
# Two more things the figure shows:
#
# - On a real GPU at prefill the copy is the long part: a Mixtral expert is 336 MiB, 14 ms over PCIe 4.0 x16 at the profile's 25 GB/s, while computing it for a few hundred tokens takes the profile's RTX 4090 about a millisecond. So double buffering saves about a tenth here. The more tokens per expert, the more compute there is to hide:

# %%
print(f"{'prompt':>7} {'1 buffer':>9} {'2 buffers':>10} {'saved':>6}   [simulated on {rtx4090.name}, every expert row streamed]")
for n in (128, 512, 2048):
    one, two = (simulate(mixtral, rtx4090, vs.streaming_plan(mixtral, k, stream_min_tokens=32), Workload(n, 0),
                         "zipf:1.2", record=False).prefill_s for k in (1, 2))
    print(f"{n:>7} {one:>8.3f}s {two:>9.3f}s {100 * (1 - two / one):>5.1f}%")

# %% [markdown]
# - Between the layers the link idles even with two buffers: the copies of layer 1's experts are issued when layer 1's router has chosen them, and the router runs after layer 1's attention. At decode that is essential (only 2 of 8 experts are used, and nobody knows which before the router); in a prefill that uses every expert, the copies could start earlier.
#
# ### Measured: the hybrid engine on the loopback device
#
# Now the same experiment for real, on `HybridEngine`: the executor's four lane threads issue the same step graph onto device streams, copies wait on events, the weights land in `staging_buffers` buffers and the engine checks (`check=True`) that no staging buffer was overwritten while its reader ran. There is no GPU here, so the device is the `LoopbackDevice`: one CPU thread per stream, the GPU's kernels replaced by their CPU twins, and copies slowed to the profile's PCIe rate (`LoopbackDevice.throttled(rtx4090.link)`: memcpy, then wait until the copy has taken as long as 25 GB/s would make it).
#
# The model is a small random Mixtral (2 layers, 4 experts of 512 × 2048, float32: 12 MiB per expert), every expert row streamed, a prompt of 4 tokens. Each step is run 5 times after a warm-up; the figure shows the run with the median step time.

# %%
small = ModelSpec.from_config(make_config("mixtral", layers=2, hidden=512, intermediate=2048, experts=4, vocab=512,
                                          dtype="float32"), "small-mixtral")
weights = random_weights(small, seed=0)
prompt = torch.randint(0, small.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))


def report(runs: dict) -> dict:
    """Print each buffer count's measured step times and what filled them; return the median run of each."""
    medians = {k: vs.median_run(v) for k, v in runs.items()}
    for k, tl in medians.items():
        times = ", ".join(f"{t.makespan_s * 1e3:.1f}" for t in runs[k])
        print(f"  {k} buffer{'s' if k > 1 else ' '}: median step {tl.makespan_s * 1e3:5.1f} ms (runs: {times}) | copies "
              f"{vs.copies_s(tl) * 1e3:4.1f} ms at {vs.copy_gbps(tl):4.1f} GB/s | streamed compute "
              f"{vs.streamed_compute_s(tl) * 1e3:4.1f} ms | both at once {vs.copy_compute_overlap_s(tl) * 1e3:4.1f} ms")
    one, two = medians[1], medians[2]
    most = min(vs.copies_s(one), vs.streamed_compute_s(one))
    print(f"  a second buffer can hide at most the shorter of copies and compute: {most * 1e3:.1f} ms; "
          f"the median step changed by {(two.makespan_s - one.makespan_s) * 1e3:+.1f} ms")
    return medians


runs = vs.staging_runs(small, weights, rtx4090, lambda: LoopbackDevice.throttled(rtx4090.link), prompt)
print(f"measured on {vs.median_run(runs[1]).machine}")
at_link = report(runs)

# %%
vs.staging_figure(at_link, what=f"small-mixtral prefill of 4 tokens, every expert row streamed, "
                                f"copies throttled to {rtx4090.name}'s PCIe rate")

# %% [markdown]
# The mechanism is the simulator's: with one buffer, no copy ever runs while a streamed expert computes ("both at once" is 0); with two or three, the next copy runs under the current expert. What that can save is bounded the same way too: by the shorter of the copies and the compute. But here both lengths are this machine's, not a GPU's, and they vary from run to run (compare the five runs of each line):
#
# - The loopback's "GPU" is a CPU thread running the kernels' torch twins. An expert takes it milliseconds, where an RTX 4090 would take tens of microseconds: on this device compute is the long part, the reverse of a real GPU.
# - A copy is a real memcpy, throttled so that it is never *faster* than 25 GB/s, but it can be slower: the printed rate is what the copies achieved. On this VM a memcpy of weights that are not in the cache runs at anywhere from a few GB/s to over 20 GB/s, depending on what else the machine is doing, and it shares the 2 cores and the memory bandwidth with the twins computing beside it.
#
# So whether the second buffer shortens this step, and by how much, depends on the run; the simulator's answer for a real GPU is the one above. To see double buffering pay on the loopback, recreate the situation where the link is as slow as the compute: slow the `h2d` copies until one copy lasts as long as the loopback computes one expert (the balance point, where a second buffer helps most). The rate comes from the run just measured, not from a constant:

# %%
one = at_link[1]
copy_bytes = max(r.bytes_ for r in one.records if vs.is_weight_copy(r))
streamed = vs.is_streamed_compute(one)
expert_times = sorted(r.duration_s for r in one.records if streamed(r))
expert_s = expert_times[len(expert_times) // 2]
slow_gbps = round(copy_bytes / expert_s / 1e9, 1)
print(f"one streamed expert computes in {expert_s * 1e3:.2f} ms on the loopback (median, measured); "
      f"a link of {slow_gbps:.1f} GB/s copies its {copy_bytes / 2**20:.0f} MiB in that time")
slowed = report(vs.staging_runs(small, weights, rtx4090,
                                lambda: LoopbackDevice(copy_gbps={"h2d": slow_gbps, "d2h": rtx4090.link.d2h_pinned_gbps}),
                                prompt))

# %%
vs.staging_figure(slowed, what=f"small-mixtral prefill of 4 tokens, every expert row streamed, "
                                f"h2d slowed to {slow_gbps:.1f} GB/s")

# %% [markdown]
# Now the copies spend most of their time waiting in the throttle (sleeping, not computing), and the loopback shows what the simulator showed for Mixtral, larger: with one buffer the step is every copy plus every compute, one after the other; with two, copies and computes run side by side and the step shrinks towards the longer of the two; a third adds little. (Where this run's memcpy was slower than the slowed link, the printed copy rate says so, and the copies cost CPU time again.) The saving is at most the shorter of copies and compute, here made equal on purpose; on a real GPU at prefill the compute is the much shorter one, which is why Mixtral saved about a tenth.

# %% [markdown]
# ## 3. A hybrid step, measured beside its simulation
#
# The ScheInfer rule now (`balance`, chapter 07): the same small model with a quarter of each expert's rows resident (GG), and at every step the host rows split between the CPU (CC) and the link (CG) so that both lanes finish together, by the cost model of `rtx4090-desktop`. Two staging buffers. The engine runs a greedy generation of 4 tokens on the loopback device throttled to that profile's link; the simulator runs the same plan, prompt and weights, executing every task on real tensors (`weights=`) so that its routing is the model's own. Both must produce the reference model's tokens.

# %%
n_new = 4
hybrid = vs.streaming_plan(small, 2, expert_share=0.25, assign="balance")
with HybridEngine(small, weights, hybrid, rtx4090, LoopbackDevice.throttled(rtx4090.link),
                  workload=Workload(prompt.shape[1], n_new), check=True) as engine:
    measure_generation(engine, prompt, n_new)  # warm-up
    measured = measure_generation(engine, prompt, n_new)
    small_mode = engine.executor.streamer.mode
reference = ReferenceModel(small, weights)
predicted = simulate(small, rtx4090, hybrid, Workload(prompt.shape[1], n_new - 1), weights=reference, prompt_ids=prompt)
ref_tokens = reference.greedy(prompt, n_new)[0].tolist()
sim_tokens = torch.cat(predicted.tokens, dim=1)[0].tolist()
print(f"plan: {hybrid.name}")
print("reference tokens:           ", ref_tokens)
print("hybrid engine (measured):   ", measured.tokens)
print("simulator with numerics:    ", sim_tokens)
assert measured.tokens == ref_tokens == sim_tokens
for step in range(n_new):
    a = sorted((r.name, r.bytes_) for r in measured.timeline.select(step=step).records)
    b = sorted((r.name, r.bytes_) for r in predicted.timeline.select(step=step).records)
    assert a == b, f"step {step}: the engine ran another graph than the simulator"
print("every step: the same tasks with the same bytes in the engine and in the simulator")

# %% [markdown]
# The engine and the simulator agree on **what** runs: the same tokens, and at every step the same tasks moving the same bytes (the router's choices, and with them the CC/CG split, came out the same). They disagree on **how long** it takes:

# %%
m0, s0 = vs.rebase(measured.timeline, 0), vs.rebase(predicted.timeline, 0)
vs.measured_vs_simulated_figure(m0, s0, "small-mixtral prefill (4 tokens), balance rule, 2 staging buffers")

# %%
vs.lane_busy_figure(m0, s0, "small-mixtral prefill (4 tokens), balance rule")

# %%
m1, s1 = vs.rebase(measured.timeline, 1), vs.rebase(predicted.timeline, 1)
vs.measured_vs_simulated_figure(m1, s1, "small-mixtral decode step 1, balance rule, 2 staging buffers")

# %% [markdown]
# The shapes match: the same lanes in the same order, the CPU computing its CC rows while the CG rows cross the link, activations going over (`h2d`) and partial sums coming back (`d2h`). The times do not, and they should not be expected to:
#
# - **The `gpu` lane** is a CPU thread running the twins, plain torch on 2 cores, sharing them with everything else. An RTX 4090 does the same work with ~1 TB/s of memory bandwidth, so the simulated GPU lane is one to two orders of magnitude shorter. The split itself was sized for the profile's GPU: on this device the GPU lane, which should be the idle one, is the busiest.
# - **The `cpu` lane** is real (Numba kernels), but on this machine's 2 threads, not the profile's 16-core Ryzen 9 7950X; it also shares the 2 cores with the stream threads.
# - **Python**: every task is dispatched by a Python thread, tens of microseconds each, and the lanes contend for the interpreter. Small tasks (norms, the router, activation copies), which the simulator prices at the profile's 5 µs kernel launch, take far longer here.
# - **The copies** are the closest: throttled to the profile's 25 GB/s, but never faster than this machine's memcpy, which on this VM is often slower (section 2), and slower still when the cores are busy.
#
# What the loopback *does* prove is the ordering: every value read after it was written, on the right side (`check=True` checked that on every step, and that no staging buffer was reused too early), and the tokens are the reference's. For times, a profile's simulation or a run on a real GPU (`offloadkit generate --device cuda`) is the thing to read.
#
# ## 4. Where the pinned ring is used instead of pinning everything
#
# An asynchronous copy needs pinned host memory. `WeightStreamer` (the engine's `runtime/streaming.py`) has three ways to get it, chosen once when the engine opens:
#
# - **`pinned`**: when the host rows of every block that may stream fit the **pinned budget** (by default a quarter of the machine's RAM), it copies them once into pinned memory, block by block, in the layout the GPU wants. Every CG copy is then one DMA from there.
# - **`ring`**: when they do not fit, it pins only `staging_buffers` **slots**, each the size of the largest streamed slice. Before each copy the engine's `h2d` thread packs the slice from the memory-mapped checkpoint into the next slot (a host memcpy), then queues the DMA; a slot is refilled only after the copy that read it has ended (an event wait).
# - **`pageable`**: a plan with `pinned=False` (llama.cpp's) packs into ordinary memory, and CUDA copies it synchronously through the driver's own staging (section 1).
#
# The small model of sections 2 and 3 is far under any budget:

# %%
budget_here = default_pinned_budget()
small_sizing = vs.streamer_sizing(small, hybrid, budget_here)
print(f"small-mixtral under '{hybrid.name}': {small_sizing.host_bytes / 2**20:.0f} MiB of host rows may stream; "
      f"this machine's pinned budget {budget_here / GIB:.1f} GiB -> mode {small_sizing.mode!r} "
      f"(the engine of section 3 chose {small_mode!r})")
assert small_sizing.mode == small_mode

# %% [markdown]
# Mixtral-8x7B on a 24 GB card is another matter. The ScheInfer plan for `rtx4090-desktop` (chapter 06, pp512 + tg128, Zipf routing) keeps what fits on the GPU; the rows it does not keep may stream. What `WeightStreamer` would allocate, from the plan's shapes (no weights needed), on that profile's host (128 GiB, so a 32 GiB budget by the same quarter rule):

# %%
w = Workload(prompt_tokens=512, gen_tokens=128)
plan = make_plan("scheinfer", mixtral, rtx4090, w, "zipf:1.2")
budget = rtx4090.cpu.memory_bytes // 4
sizing = vs.streamer_sizing(mixtral, plan, budget)
print(f"{plan.name} plan of mixtral-8x7b on {rtx4090.name} ({w.label}), {plan.staging_buffers} staging buffer(s)  "
      f"[computed from the plan]")
print(f"  blocks with host rows that may stream: {sizing.streamed_blocks}")
print(f"  their host rows:                       {sizing.host_bytes / GIB:6.2f} GiB  (what 'pinned' mode would lock)")
print(f"  pinned budget on {rtx4090.name}:   {budget / GIB:6.2f} GiB  (a quarter of {rtx4090.cpu.memory_gib:.0f} GiB)")
print(f"  largest streamed slice (one slot):     {sizing.slot_bytes / GIB:6.2f} GiB")
print(f"  -> mode {sizing.mode!r}: pins {sizing.pinned_bytes / GIB:.2f} GiB "
      f"({sizing.host_bytes / max(sizing.pinned_bytes, 1):.0f}× less than pinning every host row)")
vs.streamer_figure(sizing, f"Mixtral-8x7B, {plan.name} plan for {rtx4090.name} ({w.label})",
                   f"computed from the plan's shapes; pinned budget: a quarter of the profile's "
                   f"{rtx4090.cpu.memory_gib:.0f} GiB host memory")

# %% [markdown]
# About half the host's memory would have to be locked to pin every host row: more than the budget, and more than a desktop can spare while it also holds the memory-mapped checkpoint. So the engine pins a ring of slots instead. What the ring costs: every streamed byte crosses host memory once more (memory-mapped checkpoint → pinned slot) before the DMA reads it. The host's DRAM (~60 GB/s on this profile) is faster than the link (25 GB/s), so with a slot to spare the packing of the next slice overlaps the current copy; but it is DRAM bandwidth the CPU lane, which computes the CC rows from the same DRAM, no longer has.
#
# Note the plan's staging buffers, printed above. The ScheInfer policy also starts from the baselines' placements, which fill the card, gives such a candidate one buffer where two do not fit, and keeps whichever candidate its simulator finds fastest. With one buffer there is one ring slot too, so packing, copying and computing a streamed slice take turns; section 2 showed what that costs at prefill. Which placement the plan came from, and whether one more buffer fits beside its resident rows:

# %%
print("seeded from:", plan.meta.get("seeded_from"), "| staging buffers:", plan.staging_buffers)
r1 = simulate(mixtral, rtx4090, plan, w, "zipf:1.2", record=False)
print(f"as planned ({plan.staging_buffers} buffer{'s' if plan.staging_buffers > 1 else ''}): prefill {r1.prefill_tokens_per_s:6.1f} tok/s, decode {r1.decode_tokens_per_s:5.2f} tok/s  "
      f"[simulated on {rtx4090.name}]")
try:
    more = plan.staging_buffers + 1
    r2 = simulate(mixtral, rtx4090, replace(plan, staging_buffers=more), w, "zipf:1.2", record=False)
    print(f"with {more} buffers:        prefill {r2.prefill_tokens_per_s:6.1f} tok/s, decode {r2.decode_tokens_per_s:5.2f} tok/s")
except PlanError as e:  # the plan filled the card: one more buffer does not fit beside its resident rows
    print(f"with {more} buffers: {type(e).__name__}: {str(e)[:160]}…")

# %% [markdown]
# ## What's next
#
# [Chapter 06](06_partitioning.ipynb) decides which rows stay resident (the GG rows this chapter took as given), and [chapter 07](07_token_assignment.ipynb) how many of the others stream at each step. On a machine with a GPU, `offloadkit generate --device cuda` runs the same engine with `CudaDevice`: real streams, pinned memory and the CUDA kernels of chapter 03, and its timelines are GPU measurements.
