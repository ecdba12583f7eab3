"""The CUDA kernels *run* on the CPU (one OS thread per CUDA thread, see offloadkit.kernels.cuda.emulate)
through the same wrappers a GPU run uses, and match their CPU twins: indexing, warp reductions, odd
sizes, slices that start and end off the 16-byte grid, NaN-poisoned memory outside every slice.

This is not a GPU test (tests/test_cuda_kernels.py is): it proves the kernels' logic where no GPU
exists. It needs g++ (C++20); without one it skips with that reason. Shapes are small: every block
starts 128-256 threads.
"""

from __future__ import annotations

import pytest
import torch

from offloadkit.kernels.cuda import ops, twins
from offloadkit.kernels.cuda.emulate import EmulatorBackend, compiler

pytestmark = pytest.mark.skipif(compiler() is None, reason="the CPU emulation of CUDA kernels needs g++ (C++20)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def emu() -> EmulatorBackend:
    return EmulatorBackend()


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def poisoned_expert(hidden: int, inter: int, rows: tuple[int, int], dtype: torch.dtype, seed: int):
    """Expert weights whose rows (and W2 columns) outside ``rows`` are NaN: a kernel that reads past
    its slice produces NaN."""
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
    out = torch.randn(n, hidden)
    got = ops.expert_swiglu(x, *w, out.clone(), rows, backend=emu)
    close(got, twins.expert_swiglu(x, *w, out.clone(), rows))


def test_expert_swiglu_staged_slice_and_prefill(emu):
    wg, wu, wd = poisoned_expert(67, 45, (0, 45), torch.bfloat16, seed=1)
    staged = (wg[7:29].contiguous(), wu[7:29].contiguous(), wd[:, 7:29].contiguous())  # ld_down = 22, not I
    x, out = torch.randn(4, 67), torch.randn(4, 67)
    close(ops.expert_swiglu(x, *staged, out.clone(), backend=emu),
          twins.expert_swiglu(x, wg, wu, wd, out.clone(), (7, 29)))
    x9 = torch.randn(9, 67)  # more than MAX_TOKENS: the torch (cuBLAS on a GPU) path, same contract
    close(ops.expert_swiglu(x9, wg, wu, wd, torch.zeros(9, 67), (7, 29), backend=emu),
          twins.expert_swiglu(x9, wg, wu, wd, torch.zeros(9, 67), (7, 29)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 7), (3, 67), (2, 600)])
def test_norms(emu, dtype, rows, hidden):
    x = torch.randn(rows, hidden) * 3
    w, b = torch.randn(hidden).to(dtype), torch.randn(hidden).to(dtype)
    close(ops.rms_norm(x, w, 1e-5, backend=emu), twins.rms_norm(x, w, 1e-5))
    close(ops.layer_norm(x, w, b, 1e-5, backend=emu), twins.layer_norm(x, w, b, 1e-5))
    y = x.clone()
    ops.rms_norm(y, w, 1e-6, out=y, backend=emu)  # in place
    close(y, twins.rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("n, heads, dim", [(1, 4, 16), (5, 3, 10), (2, 7, 128)])
def test_rope(emu, n, heads, dim):
    x, cos, sin = torch.randn(n, heads, dim), torch.randn(n, dim), torch.randn(n, dim)
    got = x.clone()
    ops.rope(got, cos, sin, backend=emu)
    close(got, twins.rope(x.clone(), cos, sin))


@pytest.mark.parametrize("n_experts, top_k, normalize, shared", [
    (8, 2, True, False), (60, 4, False, True), (5, 5, True, False), (33, 3, True, True)])
def test_router_softmax_topk(emu, n_experts, top_k, normalize, shared):
    logits = torch.randn(6, n_experts + shared) * 2
    got = ops.router_topk(logits, top_k, normalize=normalize, shared_gate=shared, backend=emu)
    want = twins.router_topk(logits, top_k, normalize=normalize, shared_gate=shared)
    assert torch.equal(got[1], want[1])
    close(got[0], want[0])
    if shared:
        close(got[2], want[2])


@pytest.mark.parametrize("jitter_eps", [0.01, 0.3, 2.0])  # from "only the max" to "nothing masked"
def test_router_sparsemixer(emu, jitter_eps):
    logits = torch.randn(9, 16)
    got = ops.router_topk(logits, 2, mode="sparsemixer", jitter_eps=jitter_eps, backend=emu)
    want = twins.router_topk(logits, 2, mode="sparsemixer", jitter_eps=jitter_eps)
    assert torch.equal(got[1], want[1])
    close(got[0], want[0])


@pytest.mark.parametrize("n, k, n_experts, hidden", [(1, 2, 8, 16), (13, 2, 5, 33), (300, 1, 3, 4)])
def test_moe_permute_unpermute(emu, n, k, n_experts, hidden):
    x = torch.randn(n, hidden)
    experts = torch.stack([torch.randperm(n_experts)[:k] for _ in range(n)])  # > 256 picks: several rounds
    got = ops.moe_permute(x, experts, n_experts, backend=emu)
    want = twins.moe_permute(x, experts, n_experts)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    y_perm, weights, out = torch.randn(n * k, hidden), torch.rand(n, k), torch.randn(n, hidden)
    close(ops.moe_unpermute(y_perm, want[2], weights, out.clone(), backend=emu),
          twins.moe_unpermute(y_perm, want[2], weights, out.clone()))


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
    close(ops.attention_decode(q, k, v, length, window, backend=emu),
          twins.attention_decode(q, k, v, length, window))
