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
# # 04 · CPU experts at memory speed
#
# In hybrid inference the CPU computes the **CC** slices of the expert weights (`docs/DESIGN.md` §3). At decode, one token per step, an expert is a matrix–vector product: **2 flops per weight against 2 bytes (bf16) or 4 bytes (f32) of weight**. A CPU core does ~50 flops in the time DRAM delivers one bf16 weight, so the arithmetic is nearly free and the speed limit is the memory: the best a kernel can do is read every weight byte once, as fast as the memory delivers it.
#
# This chapter builds offloadkit's CPU expert step by step and measures each step against that limit on **this machine**:
#
# 1. measure the machine's memory read (the ceiling);
# 2. a naive loop → parallel rows → vectorized (`fastmath`) → bf16 weights widened in registers;
# 3. the package's kernel, the full SwiGLU expert over a row slice (`offloadkit.kernels.cpu.experts`);
# 4. decode vs prefill: the roofline, and where the kernel switches to BLAS;
# 5. the real CPU engine generating text, with its measured timeline.
#
# Every figure here is **measured** on the machine named in it, in one run; timings are kept short, so expect ±15 % on a shared machine, and more between runs (section 1). The full benchmark (a Mixtral-8x7B expert, more token counts, more repetitions) is `offloadkit bench kernels`.

# %%
import inspect
import time

import numpy as np
import torch

from offloadkit.bench.kernels import time_call, torch_swiglu, torch_views
from offloadkit.course import cpu_steps
from offloadkit.kernels.cpu.experts import DECODE_MAX_TOKENS, ExpertWeights, expert_rows
from offloadkit.kernels.cpu.primitives import to_float32
from offloadkit.hardware.machine import machine_label
from offloadkit.hardware.stream import ReadMeter, measure_read
from offloadkit.viz import cpu_kernels

torch.set_num_threads(2)
MACHINE = machine_label()
print("measured on:", MACHINE, "| torch threads:", torch.get_num_threads())

# %% [markdown]
# ## 1. The ceiling: how fast can these threads read memory?
#
# A decode kernel reads each weight once, so its limit is a plain read of memory with the same threads. `offloadkit.hardware.stream.measure_read` is the one read routine offloadkit uses wherever it prints a "memory read" (`offloadkit profile`, `offloadkit bench kernels`, chapter 02): it reads a 512 MiB buffer, far past any CPU's caches, with all Numba threads, one contiguous run per thread (the way the kernels split their rows), XOR-folded so nothing is skipped; it keeps the best of at least 7 reads and every sample, so you see how steady the figure was.
#
# On a shared machine (a cloud VM, a laptop with a browser open) the read moves: this course's CI machine has read anywhere from 28 to 68 GB/s within one afternoon. So the cells below measure the read again beside each comparison and print the ratio to *that* read: a ratio taken within one run means something, a figure from another run may not.
#
# The weights for the first experiment: a matrix of 8192 × 4096 (W1 and W3 of a 4096-wide expert slice), 128 MiB in f32, 64 MiB in bf16, both well past a CPU's last-level cache.

# %%
H, ROWS = 4096, 8192
rng = np.random.default_rng(0)
W = (rng.standard_normal((ROWS, H), dtype=np.float32) * 0.02)   # f32 weights [rows, H]
W_bf16 = (W.view(np.uint32) >> 16).astype(np.uint16)             # the same weights as bf16 bits
x = rng.standard_normal(H, dtype=np.float32)
y = np.empty(ROWS, dtype=np.float32)

read = measure_read()
print(f"memory read (measured): {read.describe()}")

# %% [markdown]
# ## 2. Building the kernel
#
# The core of an expert is `y = W x` over rows of `W`. Four versions, each one idea more (`offloadkit/course/cpu_steps.py`). Here is the naive one:

# %%
print(inspect.getsource(cpu_steps.gemv_naive))


# %% [markdown]
# Without `fastmath` the compiler must add the products in program order: each addition waits for the previous one (~4 cycles of FMA latency), so one core handles about one weight per 4 cycles. Splitting the rows over threads (`prange`) multiplies that by the thread count. `fastmath=True` then allows reassociating the sum: LLVM uses 8-wide AVX2 FMAs into several independent accumulators, the loop outruns memory and **the CPU starts waiting on DRAM**. Finally, bf16 weights are read as `uint16` and widened in a register (`bits << 16` is the f32 with the same value): half the bytes, so half the time at the same GB/s.

# %%
def measure_step(name, fn):
    w = W_bf16 if "bf16" in name else W
    fn(w, x, y)                                   # compile (or load from the cache) first
    seconds = min(time_call(lambda: fn(w, x, y), min_s=0.05) for _ in range(3))
    return {"step": name, "gbps": w.nbytes / seconds / 1e9, "ms": seconds * 1e3, "bytes": w.nbytes}

steps = [measure_step(name, fn) for name, fn in cpu_steps.STEPS.items()]
read = measure_read()  # again, right after the steps: the ratios below are to this read
cpu_steps.gemv_bf16(W_bf16, x, y)
for label, weights in (("the same bf16 weights, widened", to_float32(W_bf16)), ("the original f32 weights", W)):
    want = weights.astype(np.float64) @ x
    print(f"bf16 kernel vs f64 product with {label}: relative error {np.abs(y - want).max() / np.abs(want).max():.1e}")
print(f"memory read measured right after the steps: {read.describe()}")
for s in steps:
    print(f"{s['step']:<26} {s['ms']:7.2f} ms  {s['gbps']:6.1f} GB/s  = {s['gbps'] / read.gbps:4.2f}x that read")

# %%
cpu_kernels.steps_figure(steps, read, MACHINE, f"y = W x, one token, {ROWS} x {H} weights, four kernel steps")

# %% [markdown]
# Steps 3 and 4 are the first that memory, not arithmetic, holds back: they come within reach of the dashed line (on the 2-core EPYC this chapter was written on, 55–80 % of it, moving with the machine's load). Step 4 reads half the bytes of step 3, so it takes less time; not always half, because at 2 bytes per weight the CPU must multiply, and widen, twice as many weights per second to keep the same GB/s. Fewer bytes per weight is the whole point of keeping weights in bf16: compare the ms above the bars. Its result is exact up to summation order against the bf16 weights it reads; the difference from the f32 weights is bf16's own rounding (here truncation: `bits >> 16`), which the model's checkpoint already carries.
#
# ## 3. The whole expert: `offloadkit.kernels.cpu.experts`
#
# A SwiGLU expert is `y = W2 · (silu(W1 x) ⊙ W3 x)` over a slice `[r0, r1)` of its intermediate rows. The package kernel does it in two parallel passes (read `offloadkit/kernels/cpu/decode.py`):
#
# - **gate/up**: each thread streams a contiguous run of W1 and W3 rows (contiguous in the Hugging Face layout `[I, H]`) and computes both dot products for every token in one pass over the row — each weight byte is read once for all tokens;
# - **down**: `W2` is `[H, I]`, so a slice is a column block; instead of a strided walk, threads split the *output* rows and each reads the contiguous run `W2[j, r0:r1]`, so no two threads write the same output.
#
# Partials over any split of `[0, I)` add up to the whole expert, which is what lets CC, CG and GG slices run in different places:

# %%
INTER = 4096   # an expert 4096 x 4096 (Mixtral's is 4096 x 14336): 192 MiB in f32, 96 MiB in bf16
w_gate, w_up = W[:INTER], W[INTER:2 * INTER]
w_down = rng.standard_normal((H, INTER), dtype=np.float32) * 0.02
experts = {"float32": ExpertWeights.from_torch(w_gate, w_up, w_down)}
experts["bfloat16"] = ExpertWeights.from_torch(*((a.view(np.uint32) >> 16).astype(np.uint16) for a in (w_gate, w_up, w_down)))

tokens = rng.standard_normal((2, H), dtype=np.float32)
full = expert_rows(tokens, experts["bfloat16"])
parts = expert_rows(tokens, experts["bfloat16"], rows=(0, 300)) + expert_rows(tokens, experts["bfloat16"], rows=(300, INTER))
print("CC + CG slices vs the whole expert (relative):", float(np.abs(parts - full).max() / np.abs(full).max()))


# %%
# torch's own SwiGLU (F.linear x 3 + SiLU) in the weights' dtype, as `offloadkit bench kernels` runs it
cases = {}
for dtype, ew in experts.items():
    tw = torch_views([ew.w_gate, ew.w_up, ew.w_down], dtype)
    xt = torch.from_numpy(tokens[:1]).to(tw[0].dtype)
    cases[(dtype, "offloadkit")] = lambda e=ew: expert_rows(tokens[:1], e)
    cases[(dtype, "torch")] = lambda x=xt, w=tw: torch_swiglu(x, w)

# Three rounds, the read sampled before the kernels in every round: a burst of load from a neighbour
# slows both sides of a ratio alike. Each figure is the best of its rounds.
meter, best = ReadMeter(), {}
for _ in range(3):
    meter.sample()
    for key, fn in cases.items():
        best[key] = min(best.get(key, float("inf")), time_call(fn, 0.05))
read = meter.result()
print(f"memory read, sampled between the kernels: {read.describe()}")
for dtype, ew in experts.items():
    ours, theirs = ew.nbytes / best[(dtype, "offloadkit")] / 1e9, ew.nbytes / best[(dtype, "torch")] / 1e9
    print(f"{dtype:>9}, n=1: offloadkit {ours:5.1f} GB/s = {ours / read.gbps:4.2f}x the read | "
          f"torch {theirs:5.1f} GB/s = {theirs / read.gbps:4.2f}x the read  (measured)")

# %% [markdown]
# ## 4. Decode vs prefill: the roofline
#
# With `n` tokens the kernel does `2n` flops per weight while reading each weight once, so its **arithmetic intensity** is `2n / bytes_per_weight` flops per byte. Below the ridge it is bound by memory (time flat in `n`, GFLOP/s growing with `n`); above it by the CPU's arithmetic, whose best on this machine is BLAS's f32 GEMM. So the package has two kernels: the decode kernel (never widens a whole matrix, reads every byte once for all tokens) and the prefill kernel, which widens blocks of rows to f32 once and hands them to torch's GEMM. Which one wins is a measurement, not a guess: on the 2-core AMD EPYC this chapter was written on, the decode kernel keeps ~100 GFLOP/s from about 8 tokens on, and torch's GEMM only beats that past a few dozen tokens, so `path="auto"` switches at `DECODE_MAX_TOKENS` (56 tokens for 16-bit weights, 40 for f32, measured on a Mixtral expert).

# %%
ew = experts["bfloat16"]
flops_per_token = 6 * H * INTER
points = []
for n in (1, 2, 4, 8, 16, 32, 64, 128, 512):
    xs = rng.standard_normal((n, H), dtype=np.float32)
    for path in ("decode", "prefill"):
        if (path == "decode" and n > 128) or (path == "prefill" and n < 8):
            continue
        s = min(time_call(lambda x=xs, p=path: expert_rows(x, ew, path=p), 0.03) for _ in range(2))
        points.append({"n": n, "path": path, "gflops": flops_per_token * n / s / 1e9})
xs = torch.from_numpy(rng.standard_normal((512, H), dtype=np.float32))
f32 = experts["float32"]
tf = torch_views([f32.w_gate, f32.w_up, f32.w_down], "float32")
gemm_s = min(time_call(lambda: torch_swiglu(xs, tf), 0.1) for _ in range(2))
peak = flops_per_token * 512 / gemm_s / 1e9
read = measure_read()
print(f"torch f32 GEMM, 512 tokens: {peak:.0f} GFLOP/s (measured)")
print(f"memory read, measured right after: {read.describe()}")
print(f"ridge for bf16 weights: n = {peak / read.gbps:.0f} tokens (2n flops per 2 bytes read)")

# %%
cpu_kernels.roofline_figure(points, peak, read, 2, DECODE_MAX_TOKENS["bfloat16"], MACHINE,
                            f"bf16 expert {H} x {INTER}: GFLOP/s against tokens")

# %% [markdown]
# Left of the ridge the decode kernel rides the memory roof: doubling the tokens nearly doubles the GFLOP/s for free, until the FMA units are busy (~8 tokens). From there it is flat, while the prefill kernel keeps climbing towards the GEMM's roof: it pays for widening each block once, a cost that fades as `n` grows, and BLAS gets more efficient with more tokens. The crossing of the two measured curves is where `path="auto"` switches.
#
# ## 5. The real CPU engine
#
# `offloadkit.runtime.cpu_engine.CpuEngine` runs a whole model on these kernels (experts, projections, router, lm_head) and records a **measured** `Timeline`: one task per norm, QKV projection, attention core, O projection, router, expert and lm_head (the task kinds of the simulator's graph), per layer and step. `offloadkit generate --engine cpu` uses it. Here it is on the demo model, checked token for token against the reference forward:

# %%
from offloadkit.model.generate import generate_ids
from offloadkit.paths import demo_model_dir
from offloadkit.runtime.engines import load_engine

if (demo_model_dir() / "model.safetensors").exists():
    engine, tok = load_engine("cpu", "demo")
    reference, _ = load_engine("reference", "demo")
    prompt = tok.encode('The "for" statement is used to')
    t0 = time.perf_counter()
    ids = list(generate_ids(engine, prompt, 16))
    elapsed = time.perf_counter() - t0
    print(tok.decode(prompt) + tok.decode(ids))
    print("same tokens as the reference forward:", ids == list(generate_ids(reference, prompt, 16)))
    print(f"{len(ids)} tokens in {elapsed:.2f} s (measured, prefill included)")
    timeline = engine.timeline
else:
    print("the demo checkpoint is not there yet: `make demo-model` trains it")
    timeline = None

# %%
if timeline is not None:
    print(f"{len(timeline)} task records, lanes {timeline.lanes()}, steps 0..{max(timeline.steps())}")
    cpu_kernels.task_kinds_figure(timeline, "CPU engine, demo model").show()

# %% [markdown]
# On a model this small every task is a few µs and call overhead dominates; on a real model the `expert` bars carry almost all the time, at the speed measured in section 3. The timeline is the same `Timeline` type the simulator produces, so a measured step and a simulated one can be drawn side by side.
#
# **What to take away.** A decode-time expert is a memory-streaming problem: keep weights in their stored dtype, widen in registers, read each byte once for all tokens, in long contiguous runs per thread. Then the kernel runs at the memory's speed, from Python, with Numba. Run `offloadkit bench kernels` for the full measurement on a Mixtral-8x7B expert.
