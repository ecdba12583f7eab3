"""Writes notebooks/04_cpu_experts.ipynb (without outputs). Run from the repository root: python FILE."""

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = []
md = lambda s: cells.append(new_markdown_cell(s.strip()))  # noqa: E731
code = lambda s: cells.append(new_code_cell(s.strip()))  # noqa: E731

md(r"""
# 04 · CPU experts at memory speed

In hybrid inference the CPU computes the **CC** slices of the expert weights (`DESIGN.md` §3). At decode, one token per step, an expert is a matrix–vector product: **2 flops per weight against 2 bytes (bf16) or 4 bytes (f32) of weight**. A CPU core does ~50 flops in the time DRAM delivers one bf16 weight, so the arithmetic is nearly free and the speed limit is the memory: the best a kernel can do is read every weight byte once, as fast as the memory delivers it.

This chapter builds offloadkit's CPU expert step by step and measures each step against that limit on **this machine**:

1. measure the machine's memory read (the ceiling);
2. a naive loop → parallel rows → vectorized (`fastmath`) → bf16 weights widened in registers;
3. the package's kernel, the full SwiGLU expert over a row slice (`offloadkit.kernels.cpu.experts`);
4. decode vs prefill: the roofline, and where the kernel switches to BLAS;
5. the real CPU engine generating text, with its measured timeline.

Every figure here is **measured** on the machine named under it, in one run; timings are kept short, so expect ±15 % on a shared machine. The full benchmark (a Mixtral-8x7B expert, more token counts, more repetitions) is `offloadkit bench kernels`.
""")

code(r"""
import inspect
import time

import numba
import numpy as np
import plotly.graph_objects as go
import torch

from offloadkit.bench.kernels import time_call
from offloadkit.course import cpu_steps
from offloadkit.kernels.cpu.experts import DECODE_MAX_TOKENS, ExpertWeights, expert_rows
from offloadkit.kernels.cpu.primitives import to_float32
from offloadkit.hardware.machine import machine_label
from offloadkit.hardware.stream import read_gbps

torch.set_num_threads(2)
MACHINE = machine_label()
print("measured on:", MACHINE, "| torch threads:", torch.get_num_threads())
""")

md(r"""
## 1. The ceiling: how fast can these threads read memory?

A decode kernel reads each weight once, so its limit is a plain read of the same bytes with the same threads. `offloadkit.hardware.stream.read_gbps` reads every byte of the arrays it is given (contiguous runs, one per thread, XOR-folded so nothing is skipped). We use a matrix of 8192 × 4096 weights (W1 and W3 of a 4096-wide expert slice): 128 MiB in f32, 64 MiB in bf16, both well past the 32 MiB L3 cache, so every read comes from DRAM.
""")

code(r"""
H, ROWS = 4096, 8192
rng = np.random.default_rng(0)
W = (rng.standard_normal((ROWS, H), dtype=np.float32) * 0.02)   # f32 weights [rows, H]
W_bf16 = (W.view(np.uint32) >> 16).astype(np.uint16)             # the same weights as bf16 bits
x = rng.standard_normal(H, dtype=np.float32)
y = np.empty(ROWS, dtype=np.float32)

dram_gbps = read_gbps([W], repeats=5)
print(f"memory read, {W.nbytes / 2**20:.0f} MiB with {numba.get_num_threads()} threads: {dram_gbps:.1f} GB/s (measured)")
""")

md(r"""
## 2. Building the kernel

The core of an expert is `y = W x` over rows of `W`. Four versions, each one idea more (`offloadkit/kernels/cpu_steps.py`). Here is the naive one:
""")

code(r"""
print(inspect.getsource(cpu_steps.gemv_naive))
""")

md(r"""
Without `fastmath` the compiler must add the products in program order: each addition waits for the previous one (~4 cycles of FMA latency), so one core handles about one weight per 4 cycles. Splitting the rows over threads (`prange`) multiplies that by the thread count. `fastmath=True` then allows reassociating the sum: LLVM uses 8-wide AVX2 FMAs into several independent accumulators, the loop outruns memory and **the CPU starts waiting on DRAM**. Finally, bf16 weights are read as `uint16` and widened in a register (`bits << 16` is the f32 with the same value): half the bytes, so half the time at the same GB/s.
""")

code(r"""
def measure_step(name, fn):
    w = W_bf16 if "bf16" in name else W
    fn(w, x, y)                                   # compile (or load from the cache) first
    seconds = min(time_call(lambda: fn(w, x, y), min_s=0.05) for _ in range(3))
    return {"step": name, "gbps": w.nbytes / seconds / 1e9, "ms": seconds * 1e3, "bytes": w.nbytes}

steps = [measure_step(name, fn) for name, fn in cpu_steps.STEPS.items()]
cpu_steps.gemv_bf16(W_bf16, x, y)
for label, weights in (("the same bf16 weights, widened", to_float32(W_bf16)), ("the original f32 weights", W)):
    want = weights.astype(np.float64) @ x
    print(f"bf16 kernel vs f64 product with {label}: relative error {np.abs(y - want).max() / np.abs(want).max():.1e}")
for s in steps:
    print(f"{s['step']:<26} {s['ms']:7.2f} ms  {s['gbps']:6.1f} GB/s  = {s['gbps'] / dram_gbps:5.0%} of the read")
""")

code(r"""
fig = go.Figure(go.Bar(x=[s["step"] for s in steps], y=[s["gbps"] for s in steps],
                       text=[f"{s['gbps']:.1f} GB/s<br>{s['ms']:.2f} ms" for s in steps], textposition="outside"))
fig.add_hline(y=dram_gbps, line_dash="dash", annotation_text=f"memory read {dram_gbps:.1f} GB/s (measured)")
fig.update_layout(title=f"y = W x, one token, {ROWS} x {H} weights — measured on {MACHINE}",
                  yaxis_title="weight bytes read per second (GB/s)", height=420, margin=dict(t=60))
fig
""")

md(r"""
Steps 3 and 4 sit near the dashed line: from there on the kernel is as fast as the memory. Step 4 reads half the bytes of step 3 at about the same GB/s, so it takes about half the time: that is the whole point of keeping weights in bf16. Its result is exact up to summation order against the bf16 weights it reads; the difference from the f32 weights is bf16's own rounding (here truncation: `bits >> 16`), which the model's checkpoint already carries.

## 3. The whole expert: `offloadkit.kernels.cpu.experts`

A SwiGLU expert is `y = W2 · (silu(W1 x) ⊙ W3 x)` over a slice `[r0, r1)` of its intermediate rows. The package kernel does it in two parallel passes (read `offloadkit/kernels/cpu/decode.py`):

- **gate/up**: each thread streams a contiguous run of W1 and W3 rows (contiguous in the Hugging Face layout `[I, H]`) and computes both dot products for every token in one pass over the row — each weight byte is read once for all tokens;
- **down**: `W2` is `[H, I]`, so a slice is a column block; instead of a strided walk, threads split the *output* rows and each reads the contiguous run `W2[j, r0:r1]`, so no two threads write the same output.

Partials over any split of `[0, I)` add up to the whole expert, which is what lets CC, CG and GG slices run in different places:
""")

code(r"""
INTER = 4096   # an expert 4096 x 4096 (Mixtral's is 4096 x 14336): 192 MiB in f32, 96 MiB in bf16
w_gate, w_up = W[:INTER], W[INTER:2 * INTER]
w_down = rng.standard_normal((H, INTER), dtype=np.float32) * 0.02
experts = {"float32": ExpertWeights.from_torch(w_gate, w_up, w_down)}
experts["bfloat16"] = ExpertWeights.from_torch(*((a.view(np.uint32) >> 16).astype(np.uint16) for a in (w_gate, w_up, w_down)))

tokens = rng.standard_normal((2, H), dtype=np.float32)
full = expert_rows(tokens, experts["bfloat16"])
parts = expert_rows(tokens, experts["bfloat16"], rows=(0, 300)) + expert_rows(tokens, experts["bfloat16"], rows=(300, INTER))
print("CC + CG slices vs the whole expert (relative):", float(np.abs(parts - full).max() / np.abs(full).max()))
""")

code(r"""
def torch_expert(x, w):
    F = torch.nn.functional
    return F.linear(F.silu(F.linear(x, w[0])) * F.linear(x, w[1]), w[2])

rows = []
for dtype, ew in experts.items():
    read = read_gbps([ew.w_gate, ew.w_up, ew.w_down], repeats=3)
    tw = [torch.from_numpy(a) for a in (ew.w_gate, ew.w_up, ew.w_down)]
    if dtype == "bfloat16":
        tw = [t.view(torch.int16).view(torch.bfloat16) for t in tw]
    xt = torch.from_numpy(tokens[:1]).to(tw[0].dtype)
    torch_s = min(time_call(lambda x=xt, w=tw: torch_expert(x, w), 0.05) for _ in range(3))
    ours_s = min(time_call(lambda e=ew: expert_rows(tokens[:1], e), 0.05) for _ in range(3))
    rows.append((dtype, read, ew.nbytes / ours_s / 1e9, ew.nbytes / torch_s / 1e9))
    print(f"{dtype:>9}: read {read:5.1f} GB/s | offloadkit {ew.nbytes / ours_s / 1e9:5.1f} GB/s "
          f"({ew.nbytes / ours_s / 1e9 / read:4.0%} of the read) | torch {ew.nbytes / torch_s / 1e9:5.1f} GB/s  (measured, n=1)")
""")

md(r"""
## 4. Decode vs prefill: the roofline

With `n` tokens the kernel does `2n` flops per weight while reading each weight once, so its **arithmetic intensity** is `2n / bytes_per_weight` flops per byte. Below the ridge it is bound by memory (time flat in `n`, GFLOP/s growing with `n`); above it by the CPU's arithmetic, whose best on this machine is BLAS's f32 GEMM. So the package has two kernels: the decode kernel (never widens a whole matrix, reads every byte once for all tokens) and the prefill kernel, which widens blocks of rows to f32 once and hands them to torch's GEMM. Which one wins is a measurement, not a guess: on this machine the decode kernel keeps ~100 GFLOP/s from about 8 tokens on, and torch's GEMM only beats that past a few dozen tokens, so `path="auto"` switches at `DECODE_MAX_TOKENS` (56 tokens for 16-bit weights, 40 for f32, measured on a Mixtral expert).
""")

code(r"""
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
tf = [torch.from_numpy(a) for a in (experts["float32"].w_gate, experts["float32"].w_up, experts["float32"].w_down)]
gemm_s = min(time_call(lambda: torch_expert(xs, tf), 0.1) for _ in range(2))
peak = flops_per_token * 512 / gemm_s / 1e9
read = read_gbps([ew.w_gate, ew.w_up, ew.w_down], repeats=3)
print(f"torch f32 GEMM, 512 tokens: {peak:.0f} GFLOP/s; memory read {read:.1f} GB/s (measured)")
print(f"ridge for bf16 weights: n = {peak / read:.0f} tokens (1 flop per byte per token)")
""")

code(r"""
ns = np.logspace(0, np.log10(512), 60)
fig = go.Figure()
fig.add_scatter(x=ns, y=np.minimum(peak, read * ns), name="roofline (bf16 weights): min(GEMM peak, read x n)",
                line=dict(dash="dash", color="gray"))
for path, color in (("decode", "#1f77b4"), ("prefill", "#d62728")):
    pts = [p for p in points if p["path"] == path]
    fig.add_scatter(x=[p["n"] for p in pts], y=[p["gflops"] for p in pts], mode="lines+markers",
                    name=f"{path} kernel", line=dict(color=color))
fig.add_vline(x=DECODE_MAX_TOKENS["bfloat16"], line_dash="dot", annotation_text="auto switches here")
fig.update_layout(title=f"bf16 expert {H} x {INTER}: GFLOP/s against tokens — measured on {MACHINE}",
                  xaxis=dict(type="log", title="tokens n"), yaxis=dict(type="log", title="GFLOP/s"), height=450)
fig
""")

md(r"""
Left of the ridge the decode kernel rides the memory roof: doubling the tokens nearly doubles the GFLOP/s for free, until the FMA units are busy (~8 tokens). From there it is flat, while the prefill kernel keeps climbing towards the GEMM's roof: it pays for widening each block once, a cost that fades as `n` grows, and BLAS gets more efficient with more tokens. The crossing of the two measured curves is where `path="auto"` switches.

## 5. The real CPU engine

`offloadkit.runtime.cpu_engine.CpuEngine` runs a whole model on these kernels (experts, projections, router, lm_head) and records a **measured** `Timeline`: one task per norm, QKV projection, attention core, O projection, router, expert and lm_head (the task kinds of the simulator's graph), per layer and step. `offloadkit generate --engine cpu` uses it. Here it is on the demo model, checked token for token against the reference forward:
""")

code(r"""
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
""")

code(r"""
if timeline is not None:
    decode = [r for r in timeline if r.step > 0]
    kinds = sorted({r.kind for r in decode})
    steps = timeline.steps()[1:]
    per_kind = {k: 1e6 * sum(r.duration_s for r in decode if r.kind == k) / len(steps) for k in kinds}
    fig = go.Figure(go.Bar(x=list(per_kind), y=list(per_kind.values())))
    fig.update_layout(title=f"CPU engine, demo model: µs per decode step by task kind — {timeline.label}",
                      yaxis_title="µs per step", height=380)
    fig.show()
    print(f"{len(timeline)} task records, lanes {timeline.lanes()}, steps 0..{max(timeline.steps())}")
""")

md(r"""
On a model this small every task is a few µs and call overhead dominates; on a real model the `expert` bars carry almost all the time, at the speed measured in section 3. The timeline is the same `Timeline` type the simulator produces, so a measured step and a simulated one can be drawn side by side.

**What to take away.** A decode-time expert is a memory-streaming problem: keep weights in their stored dtype, widen in registers, read each byte once for all tokens, in long contiguous runs per thread. Then the kernel runs at the memory's speed, from Python, with Numba. Run `offloadkit bench kernels` for the full measurement on a Mixtral-8x7B expert.
""")

for i, cell in enumerate(cells):  # the ids nbstripout would give them (`make nbtest` verifies)
    cell["id"] = str(i)
nb = new_notebook(cells=cells, metadata={"kernelspec": {"display_name": "Python 3", "language": "python",
                                                        "name": "python3"}})
nbformat.write(nb, "notebooks/04_cpu_experts.ipynb")
print("written", len(cells), "cells")
