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
# # 03 · CUDA kernels for the GPU lane
#
# The GPU lane computes attention, norms, the router and the GG and CG slices of every weight block
# (docs/DESIGN.md, sections 3 and 9). offloadkit writes those kernels in raw CUDA C (`kernels/*.cu`, shipped
# inside the package), loads them with CuPy and launches them on torch's CUDA streams. This chapter
# writes the most important one, the **decode expert**, step by step, and shows how every kernel is
# proven on machines that have no GPU:
#
# 1. **NVRTC compiles** every kernel for compute capabilities 8.0, 8.6, 8.9 and 9.0 on every test run,
#    with the options CuPy would use; it needs no driver and no GPU.
# 2. **A CPU twin** (`offloadkit.kernels.cuda.twins`) is each kernel's specification in plain torch, built on
#    the reference forward's own math.
# 3. **A CPU emulation** (`offloadkit.kernels.cuda.emulate`) runs the very CUDA source, one OS thread per
#    CUDA thread, and is compared with the twin.
# 4. Where a GPU exists, the **GPU tests** compare the real kernels with their twins.
#
# > offloadkit is a reimplementation from the ScheInfer paper's published description; these kernels,
# > the cost model and the algorithms are offloadkit's own.

# %%
import collections
import re
import time
import torch
import torch.nn.functional as F
from offloadkit.kernels.cuda import nvrtc, ops, twins
from offloadkit.kernels.cuda.loader import Launch, cupy_status, i32
from offloadkit.kernels.cuda.emulate import EmulatorBackend, compiler
from offloadkit.model.moe import swiglu

torch.manual_seed(0)
torch.set_num_threads(2)
ok, why = cupy_status()
GPU = ok and torch.cuda.is_available()
EMU = EmulatorBackend() if (not GPU and compiler()) else None
DEV = "cuda" if GPU else "cpu"
print(f"NVRTC {nvrtc.nvrtc_version()}; kernels: {', '.join(nvrtc.kernel_names())}")
print("GPU:", "yes, the kernels run on it" if GPU else f"no ({why.split(':')[0]})")
print("CPU emulation:", "g++ found" if compiler() else "no g++, only the twins run")

# %% [markdown]
# ## 1. The contract: a slice of an expert, added into a buffer
#
# A SwiGLU expert is $y = W_2\,(\mathrm{silu}(W_1 x) \odot W_3 x)$ with $W_1, W_3 \in \mathbb{R}^{I\times H}$ and
# $W_2 \in \mathbb{R}^{H \times I}$. Split the intermediate rows $[0, I)$ into GG, CG and CC slices: each
# slice computes a partial output, and the partials **add up** to $y$. So the GPU kernel takes a row
# slice $[r_0, r_1)$ and *adds* its partial into an output buffer; the CPU's CC partial is added last.
#
# The twin states that contract in four lines of torch on top of `offloadkit.model.moe.swiglu`:

# %%
H, inter, n = 256, 200, 3
w_gate = (torch.randn(inter, H) / H**0.5).bfloat16()
w_up = (torch.randn(inter, H) / H**0.5).bfloat16()
w_down = (torch.randn(H, inter) / inter**0.5).bfloat16()
x = torch.randn(n, H)

out = torch.zeros(n, H)
for rows in [(0, 64), (64, 131), (131, inter)]:          # GG, CG, CC: the boundaries need not be round
    twins.expert_swiglu(x, w_gate, w_up, w_down, out, rows)
print("max |sum of the slices - the whole expert| =", (out - swiglu(x, w_gate, w_up, w_down)).abs().max().item())

# %% [markdown]
# ## 2. Version 1: naive
#
# The first kernel anyone writes: one thread per (intermediate row $i$, token $t$), each looping over
# the hidden dimension. It computes the right thing, but
#
# - the 32 threads of a warp read 32 *different rows* at each step, $2H$ bytes apart: every warp-wide
#   load touches 32 memory sectors to use 2 bytes of each (**uncoalesced**);
# - each token's thread re-reads the whole weight row: $n$ tokens cost $n$ times the weight traffic,
#   and decode is memory bound.
#
# We compile it with NVRTC, exactly as the test suite does (no GPU involved):

# %%
V1 = r"""
#include <cuda_bf16.h>
template <typename T>
__global__ void gate_up_v1(const float* x, int n, int hidden, const T* w_gate, const T* w_up, int rows,
                           float* act) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;  // intermediate row
    const int t = blockIdx.y;                              // token
    if (i >= rows) return;
    float g = 0.f, u = 0.f;
    for (int j = 0; j < hidden; ++j) {
        const float xj = x[t * hidden + j];
        g += __bfloat162float(w_gate[(size_t)i * hidden + j]) * xj;
        u += __bfloat162float(w_up[(size_t)i * hidden + j]) * xj;
    }
    act[t * rows + i] = g / (1.f + expf(-g)) * u;
}
"""
v1 = nvrtc.compile_source(V1, "gate_up_v1.cu", ("gate_up_v1<__nv_bfloat16>",), arch="8.9", target="ptx")
print(f"compiled for sm_89 in {v1.seconds:.2f} s: {len(v1.ptx):,} bytes of PTX, entry {v1.lowered['gate_up_v1<__nv_bfloat16>']}")

# %% [markdown]
# ## 3. Version 2: coalesced, one warp per row, weights read once for all tokens
#
# Give each intermediate row to a **warp**: lane $l$ reads elements $l, l+32, \dots$, so one warp-wide
# load reads 64 contiguous bytes. Each weight element, once in a register, is used for **all** $n$
# tokens, so the weight traffic no longer grows with $n$. The 32 lanes' partial sums are then combined
# with 5 **warp shuffles** (`__shfl_xor_sync`, a butterfly: registers move between lanes, no shared
# memory).

# %%
V2 = r"""
#include <cuda_bf16.h>
#define MAX_TOKENS 8
template <typename T>
__global__ void gate_up_v2(const float* x, int n, int hidden, const T* w_gate, const T* w_up, int rows,
                           float* act) {
    const int lane = threadIdx.x % 32;
    const int i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // one warp per intermediate row
    if (i >= rows) return;
    float g[MAX_TOKENS] = {}, u[MAX_TOKENS] = {};
    for (int j = lane; j < hidden; j += 32) {
        const float wg = __bfloat162float(w_gate[(size_t)i * hidden + j]);
        const float wu = __bfloat162float(w_up[(size_t)i * hidden + j]);
        for (int t = 0; t < MAX_TOKENS; ++t)
            if (t < n) { g[t] += wg * x[t * hidden + j]; u[t] += wu * x[t * hidden + j]; }
    }
    for (int t = 0; t < n; ++t) {
        float gs = g[t], us = u[t];
        for (int o = 16; o > 0; o >>= 1) {
            gs += __shfl_xor_sync(0xffffffffu, gs, o);
            us += __shfl_xor_sync(0xffffffffu, us, o);
        }
        if (lane == 0) act[t * rows + i] = gs / (1.f + expf(-gs)) * us;
    }
}
"""
v2 = nvrtc.compile_source(V2, "gate_up_v2.cu", ("gate_up_v2<__nv_bfloat16>",), arch="8.9", target="ptx")
print(f"compiled in {v2.seconds:.2f} s: {len(v2.ptx):,} bytes of PTX")

# %% [markdown]
# ## 4. Version 3: 128-bit loads, the kernel that ships
#
# Still one warp per row, but each lane now loads **16 bytes at once** (8 bf16 weights, one
# `ld.global.cs.v4` instruction; `.cs` tells the caches the weights are streamed, used once). A row may
# start anywhere relative to the 16-byte grid (odd $H$, slices starting at odd rows), so the few
# elements before the first aligned one, and after the last full pack, are read one by one. This is
# `warp_dot` in `kernels/expert_swiglu.cu`, shared by the gate/up kernel and the down kernel:

# %%
src = nvrtc.read_source("expert_swiglu")
start = src.index("template <typename T>\n__device__ __forceinline__ void warp_dot")
print(src[start:src.index("// w_gate, w_up point at row r0")])

# %% [markdown]
# What the three versions ask of the memory system shows in their PTX: the global loads of the
# shipped kernel are 128-bit vectors, the warp sums are `shfl.sync.bfly` instructions.

# %%
v3 = nvrtc.compile_source(src, "expert_swiglu.cu", ("expert_gate_up<__nv_bfloat16>",), arch="8.9", target="ptx")
for name, result in [("v1 naive", v1), ("v2 coalesced", v2), ("v3 vectorized", v3)]:
    loads = collections.Counter(re.findall(r"ld\.global(?:\.\w+)*", result.ptx))
    shuffles = len(re.findall(r"shfl\.sync\.bfly", result.ptx))
    print(f"{name:<14} global loads: {dict(loads)}   shuffles: {shuffles}")
lines = v3.ptx.splitlines()
at = next(i for i, line in enumerate(lines) if "ld.global.cs.v4" in line)
print("\n".join(lines[at - 2:at + 6]))

# %% [markdown]
# ## 5. Does each version compute the right thing?
#
# On a GPU the three kernels run for real. Without one, the CPU emulation compiles the same CUDA source
# with g++ (a few CUDA intrinsics in C++: barriers, shuffles through a mailbox) and runs it one OS
# thread per CUDA thread. Either way the result is compared with the twin's $\mathrm{silu}(W_1x)\odot W_3x$.

# %%
expected_act = F.silu(x @ w_gate.float().T) * (x @ w_up.float().T)

def run_draft(name, source, grid, block):
    act = torch.empty(n, inter, device=DEV)
    args = (x.to(DEV), i32(n), i32(H), w_gate.to(DEV), w_up.to(DEV), i32(inter), act)
    if GPU:
        import cupy
        mod = cupy.RawModule(code=source, options=nvrtc.compile_options(), name_expressions=[f"{name}<__nv_bfloat16>"])
        conv = [cupy.asarray(a.view(torch.int16) if a.dtype == torch.bfloat16 else a) if torch.is_tensor(a) else a
                for a in args]
        mod.get_function(f"{name}<__nv_bfloat16>")(grid, block, tuple(conv))
        torch.cuda.synchronize()
    else:
        EMU.add_source(name, source, [f"{name}<__nv_bfloat16>"])
        EMU.run([Launch(name, f"{name}<__nv_bfloat16>", grid, block, args)])
    return act.cpu()

if GPU or EMU:
    where = "on the GPU" if GPU else "in the CPU emulation"
    for name, source, grid, block in [("gate_up_v1", V1, (-(-inter // 128), n), (128,)),
                                      ("gate_up_v2", V2, (-(-inter // 4),), (128,))]:
        t0 = time.perf_counter()
        err = (run_draft(name, source, grid, block) - expected_act).abs().max().item()
        print(f"{name} {where}: max error {err:.1e} ({time.perf_counter() - t0:.1f} s)")
    backend = ops.DEFAULT_BACKEND if GPU else EMU
    got = ops.expert_swiglu(*(t.to(DEV) for t in (x, w_gate, w_up, w_down)), torch.zeros(n, H, device=DEV),
                                 (64, 131), backend=backend)
    want = twins.expert_swiglu(x, w_gate, w_up, w_down, torch.zeros(n, H), (64, 131))
    print(f"shipped expert_swiglu, slice [64, 131), {where}: max error vs twin {(got.cpu() - want).abs().max().item():.1e}")
else:
    print("no GPU and no g++: only the twins run here (section 1)")

# %% [markdown]
# ## 6. The roofline the kernel should reach
#
# Napkin math from the header of `kernels/expert_swiglu.cu`, for an RTX 4090 (1008 GB/s of GDDR6X,
# 82.6 TFLOP/s of f32 FMA) and one Mixtral-8x7B expert in bf16. These figures are **computed**, not
# measured: `benchmarks/cuda_kernels.py` measures the kernel on a real GPU against the device's own
# copy bandwidth.

# %%
BW, FLOPS = 1008e9, 82.6e12
params = 3 * 4096 * 14336
print(f"expert: {params / 1e6:.0f} M weights = {2 * params / 1e6:.0f} MB in bf16")
print(f"{'tokens':>6} {'memory ms':>10} {'compute ms':>11} {'FLOP/byte':>10}  bound")
for tokens in range(1, 9):
    t_mem, t_flop = 2 * params / BW * 1e3, 2 * tokens * params / FLOPS * 1e3
    print(f"{tokens:>6} {t_mem:>10.3f} {t_flop:>11.4f} {tokens:>10}  {'memory' if t_mem > t_flop else 'compute'}")
print(f"the ridge: {FLOPS / BW:.0f} FLOP/byte -> memory bound until ~{FLOPS / BW:.0f} tokens; cuBLAS takes over past 8")

# %% [markdown]
# ## 7. The compile check: every kernel, as CuPy would compile it
#
# The loader hands `cupy.RawModule` the source (with `common.cuh` pasted in), `nvrtc.NVRTC_OPTIONS` plus the
# CUDA include path, and every kernel's *name expression* (templates instantiated per weight dtype).
# CuPy appends a few options of its own and compiles to a cubin for the GPU it runs on. The test suite
# (`tests/test_cuda_compile.py`) does exactly that with NVRTC for sm_80, sm_86, sm_89 and sm_90 on every
# run, and fails with NVRTC's log on any error *or warning*. Here, sm_89 only:

# %%
print("options:", nvrtc.compile_options() + nvrtc.CUPY_APPENDED_OPTIONS + (nvrtc.arch_flag("8.9"),))
for name in nvrtc.kernel_names():
    r = nvrtc.compile_kernel(name, "8.9")
    print(f"  {name:<18} {len(nvrtc.KERNELS[name])} kernels  cubin {len(r.image):>8,} B  {r.seconds:.2f} s")

# %% [markdown]
# The check can fail, and when it does it shows NVRTC's own message, pointing at the real file and line:

# %%
broken = nvrtc.read_source("rope").replace("xr[i] = x1 * c[i] - x2 * s[i];", "xr[i] = x1 * c[i] - x2 * sinus[i];")
try:
    nvrtc.compile_source(broken, "rope.cu", ("rope",), arch="8.0", target="cubin")
except nvrtc.KernelCompileError as e:
    print(e)

# %% [markdown]
# ## 8. The rest of the GPU lane, against the twins
#
# One MoE layer's GPU path on 5 tokens, kernel by kernel: RMSNorm, the router (softmax → top-2 →
# renormalise), grouping tokens by expert, the experts, scattering their weighted outputs back, and
# one decode step of attention over a cache. Each result is compared with its twin. (The router GEMM
# and the prefill experts run on cuBLAS through torch: they are matrix products, not custom kernels.)

# %%
CHECKS = [
    "expert_swiglu: bf16/f16/f32 weights, 1-8 tokens, a whole Mixtral expert and slices off the 16-byte grid, NaN outside the slice",
    "rmsnorm / layernorm: 1-300 rows, H = 67 .. 5120, in place",
    "rope: 1-37 tokens, 3-32 heads, head_dim 10-128",
    "router_topk: 8-256 experts, top-1..8, renormalised or not, Qwen's shared gate, PhiMoE's sparsemixer",
    "moe_permute / moe_unpermute: 1-513 tokens, top-1..8, 3-64 experts",
    "attention_decode: 1-1027 keys, GQA 1-32 query heads per KV head, sliding window, NaN past the length",
]
g = torch.Generator().manual_seed(1)
E, K, KV, D, L = 8, 2, 2, 32, 19
h = torch.randn(5, H, generator=g)
norm_w = (1 + 0.1 * torch.randn(H, generator=g)).bfloat16()
router = torch.randn(E, H, generator=g) / H**0.5
backend = ops.DEFAULT_BACKEND if GPU else EMU
lane = ops if backend else twins
kw = {"backend": backend} if backend else {}
d = lambda t: t.to(DEV)

xn = lane.rms_norm(d(h), d(norm_w), 1e-5, **kw)
weights, experts, _ = lane.router_topk(xn @ d(router).T, K, **kw)           # the router GEMM: cuBLAS via torch
x_perm, src_idx, dst_idx, offsets = lane.moe_permute(xn, experts, E, **kw)
y_perm = torch.cat([swiglu(x_perm[a:b], d(w_gate), d(w_up), d(w_down))   # one expert, reused: prefill path
                    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)])
moe_out = lane.moe_unpermute(y_perm, dst_idx, weights, torch.zeros_like(xn), **kw)
q, kc, vc = torch.randn(5, 4, D, generator=g), torch.randn(5, KV, L + 3, D, generator=g), torch.randn(5, KV, L + 3, D, generator=g)
attn = lane.attention_decode(d(q), d(kc).bfloat16(), d(vc).bfloat16(), L, **kw)

t_xn = twins.rms_norm(h, norm_w, 1e-5)
t_w, t_e, _ = twins.router_topk(t_xn @ router.T, K)
t_perm = twins.moe_permute(t_xn, t_e, E)
t_y = torch.cat([swiglu(t_perm[0][a:b], w_gate, w_up, w_down) for a, b in zip(t_perm[3][:-1].tolist(), t_perm[3][1:].tolist(), strict=True)])
t_out = twins.moe_unpermute(t_y, t_perm[2], t_w, torch.zeros_like(t_xn))
t_attn = twins.attention_decode(q, kc.bfloat16(), vc.bfloat16(), L)
mode = "GPU kernels" if GPU else ("emulated kernels" if backend else "twins only")
for name, a, b in [("rmsnorm", xn, t_xn), ("router weights", weights, t_w), ("moe output", moe_out, t_out),
                   ("attention_decode", attn, t_attn)]:
    print(f"{mode:>16} vs twin  {name:<17} max |diff| = {(a.cpu() - b).abs().max().item():.1e}")
print("router picks equal:", torch.equal(experts.cpu(), t_e))
if not GPU:
    print("\nOn a GPU, tests/test_cuda_kernels.py runs each kernel against its twin:")
    print("\n".join("  - " + c for c in CHECKS))

# %% [markdown]
# ## What to take away
#
# - A kernel file in `kernels/` opens with what it computes, its launch shape and its roofline; its twin
#   in `offloadkit/kernels/cuda/twins.py` is the specification, written on top of the reference forward.
# - *Coalescing* (a warp reads contiguous bytes), *reuse* (each weight read once for all tokens),
#   *vector loads* (16 bytes per instruction) and *warp shuffles* (reductions without shared memory)
#   are the four ideas that take the decode expert to the memory roofline.
# - Without a GPU, NVRTC still compiles the kernels exactly as CuPy would, and the emulation still runs
#   them; with one, `pytest tests/test_cuda_kernels.py` and `python benchmarks/cuda_kernels.py` check
#   correctness and speed.
