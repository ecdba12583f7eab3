"""The CUDA kernels *run* on the CPU (one OS thread per CUDA thread, see offloadkit.kernels.cuda.emulate)
through the same wrappers a GPU run uses, and match the exact results of their formulas within the f32
error bounds of tests/numerics.py (f64, on the same stored weights): indexing, warp reductions, odd
sizes, slices that start and end off the 16-byte grid, NaN-poisoned memory outside every slice. The
router's picks must be a top-k of the exact probabilities (up to near-ties the bounds cannot order), and
moe_permute's integer outputs must equal its CPU twin's exactly.

This is not a GPU test (tests/test_cuda_kernels.py is): it proves the kernels' logic where no GPU
exists. It needs g++ (C++20); without one it skips with that reason. Shapes are small: every block
starts 128-256 threads.
"""

from __future__ import annotations

import math

import pytest
import torch
from numerics import (
    Bounded,
    assert_softmax_topk,
    assert_sparsemixer,
    assert_within,
    attention,
    exact,
    layer_norm,
    matmul,
    rms_norm,
    rope,
    sigmoid,
    swiglu_expert,
)

from offloadkit.kernels.cuda import ops, twins
from offloadkit.kernels.cuda.emulate import EmulatorBackend, compiler

pytestmark = pytest.mark.skipif(compiler() is None, reason="the CPU emulation of CUDA kernels needs g++ (C++20)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def emu() -> EmulatorBackend:
    return EmulatorBackend()


def poisoned_expert(hidden: int, inter: int, rows: tuple[int, int], dtype: torch.dtype, seed: int):
    """Expert weights whose rows (and W2 columns) outside ``rows`` are NaN: a kernel that reads past
    its slice produces NaN (which no error bound admits)."""
    g = torch.Generator().manual_seed(seed)
    wg, wu = (torch.randn(inter, hidden, generator=g) / hidden**0.5 for _ in range(2))
    wd = torch.randn(hidden, inter, generator=g) / inter**0.5
    r0, r1 = rows
    for w in (wg, wu):
        w[:r0], w[r1:] = float("nan"), float("nan")
    wd[:, :r0], wd[:, r1:] = float("nan"), float("nan")
    return wg.to(dtype), wu.to(dtype), wd.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, hidden, inter, rows", [
    (1, 64, 48, (0, 48)),      # aligned rows, whole block
    (3, 67, 45, (3, 30)),      # odd H: every row starts at a different offset from the 16-byte grid
    (8, 40, 37, (5, 6)),       # one intermediate row, MAX_TOKENS tokens
    (2, 264, 70, (17, 70)),    # several 128-bit packs per lane, slice to the end
])
def test_expert_swiglu(emu, dtype, n, hidden, inter, rows):
    w = poisoned_expert(hidden, inter, rows, dtype, seed=n)
    x = torch.randn(n, hidden)
    out = torch.randn(n, hidden)  # accumulated into
    got = ops.expert_swiglu(x, *w, out.clone(), rows, backend=emu)
    assert_within(got, swiglu_expert(x, *w, rows, out=out), "expert_swiglu")


def test_expert_swiglu_staged_slice_and_the_prefill_path(emu):
    wg, wu, wd = poisoned_expert(67, 45, (0, 45), torch.bfloat16, seed=1)
    staged = (wg[7:29].contiguous(), wu[7:29].contiguous(), wd[:, 7:29].contiguous())  # ld_down = 22, not I
    x, out = torch.randn(4, 67), torch.randn(4, 67)
    assert_within(ops.expert_swiglu(x, *staged, out.clone(), backend=emu),
                  swiglu_expert(x, wg, wu, wd, (7, 29), out=out), "a staged slice")
    x9, out9 = torch.randn(9, 67), torch.randn(9, 67)  # more than MAX_TOKENS: the torch (cuBLAS on a GPU) path
    assert_within(ops.expert_swiglu(x9, wg, wu, wd, out9.clone(), (7, 29), backend=emu),
                  swiglu_expert(x9, wg, wu, wd, (7, 29), out=out9), "the prefill path")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 7), (3, 67), (2, 600)])
def test_norms(emu, dtype, rows, hidden):
    x = torch.randn(rows, hidden) * 3
    w, b = torch.randn(hidden).to(dtype), torch.randn(hidden).to(dtype)
    assert_within(ops.rms_norm(x, w, 1e-5, backend=emu), rms_norm(x, w, 1e-5), "rms_norm")
    assert_within(ops.layer_norm(x + 1, w, b, 1e-5, backend=emu), layer_norm(x + 1, w, b, 1e-5), "layer_norm")
    y = x.clone()
    ops.rms_norm(y, w, 1e-6, out=y, backend=emu)  # in place
    assert_within(y, rms_norm(x, w, 1e-6), "rms_norm in place")


def rotary(n: int, dim: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables [n, dim] as offloadkit.model.rope.rotary_tables lays them out (halves repeated), at
    random angles and a scale (longrope's mscale)."""
    angles = torch.rand(n, dim // 2) * 8 * math.pi
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * scale, angles.sin() * scale


@pytest.mark.parametrize("n, heads, dim", [(1, 4, 16), (5, 3, 10), (2, 7, 128)])
def test_rope(emu, n, heads, dim):
    x = torch.randn(n, heads, dim)
    cos, sin = rotary(n, dim, scale=1.3)
    got = x.clone()
    ops.rope(got, cos, sin, backend=emu)
    assert_within(got, rope(x, cos, sin), "rope")


@pytest.mark.parametrize("n_experts, top_k, normalize, shared", [
    (8, 2, True, False), (60, 4, False, True), (5, 5, True, False), (33, 3, True, True)])
def test_router_softmax_topk(emu, n_experts, top_k, normalize, shared):
    logits = torch.randn(6, n_experts + shared) * 2
    weights, experts, gate = ops.router_topk(logits, top_k, normalize=normalize, shared_gate=shared, backend=emu)
    assert_softmax_topk(weights, experts, logits[:, :n_experts], top_k, normalize)
    assert (gate is None) == (not shared)
    if shared:
        assert_within(gate, sigmoid(logits[:, -1:]), "the shared expert's gate")


@pytest.mark.parametrize("jitter_eps", [0.01, 0.3, 2.0])  # from "only the max" to "nothing masked"
def test_router_sparsemixer(emu, jitter_eps):
    logits = torch.randn(9, 16)
    weights, experts, _ = ops.router_topk(logits, 2, mode="sparsemixer", jitter_eps=jitter_eps, backend=emu)
    assert_sparsemixer(weights, experts, logits, jitter_eps)


@pytest.mark.parametrize("n, k, n_experts, hidden", [(1, 2, 8, 16), (13, 2, 5, 33), (300, 1, 3, 4)])
def test_moe_permute_unpermute(emu, n, k, n_experts, hidden):
    x = torch.randn(n, hidden)
    experts = torch.stack([torch.randperm(n_experts)[:k] for _ in range(n)])  # > 256 picks: several rounds
    got = ops.moe_permute(x, experts, n_experts, backend=emu)
    want = twins.moe_permute(x, experts, n_experts)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    y_perm, weights, out = torch.randn(n * k, hidden), torch.rand(n, k), torch.randn(n, hidden)
    got = ops.moe_unpermute(y_perm, want[2], weights, out.clone(), backend=emu)
    assert_within(got, weighted_picks(y_perm, want[2], weights, out), "moe_unpermute")


def weighted_picks(y_perm: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> Bounded:
    """``out[t] + Σ_j weights[t, j] y_perm[dst[t k + j]]``: k products and the out term, summed in f32."""
    n, k = weights.shape
    picked = exact(y_perm[dst.long()].view(n, k, -1))
    want = matmul(exact(weights[:, None, :]), picked, add=out[:, None, :])
    return Bounded(want.value[:, 0], want.err[:, 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, heads, kv, dim, length, window", [
    (1, 4, 4, 64, 1, None),     # the first decode step: one key
    (2, 6, 2, 40, 17, None),    # GQA, odd-ish head dim, keys not a multiple of the 4 warps
    (1, 8, 1, 128, 23, 5),      # multi-query, sliding window
])
def test_attention_decode(emu, dtype, b, heads, kv, dim, length, window):
    q = torch.randn(b, heads, dim)
    k, v = (torch.randn(b, kv, length + 3, dim).to(dtype) for _ in range(2))
    k[:, :, length:], v[:, :, length:] = float("nan"), float("nan")  # capacity past the length is never read
    assert_within(ops.attention_decode(q, k, v, length, window, backend=emu),
                  attention_decode_formula(q, k, v, length, window), "attention_decode")


def attention_decode_formula(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int,
                             window: int | None) -> Bounded:
    """Softmax attention of the query at ``length - 1`` over the cache, with the bound of the kernel's
    warp-wide online softmaxes: ops.attention_decode launches 128 threads, 4 warps."""
    want = attention(q[:, :, None], k[:, :, :length], v[:, :, :length], length - 1, window, online_streams=4)
    return Bounded(want.value[:, :, 0], want.err[:, :, 0])
