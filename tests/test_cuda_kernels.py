"""Every CUDA kernel against its CPU twin, on a real GPU through CuPy.

Random inputs, odd sizes, slices whose boundaries are not multiples of the block size or of the
16-byte packs, NaN-poisoned memory outside every slice and past every cache length, realistic sizes
(a Mixtral expert), and a launch on a side stream. Where CuPy or CUDA is missing, every test here is
reported as *skipped* with the reason (``pytest -rs`` prints it), never passed.
"""

from __future__ import annotations

import pytest
import torch
from test_cuda_emulated import poisoned_expert

from offloadkit.kernels.cuda import ops, twins
from offloadkit.kernels.cuda.loader import cupy_status

_OK, _WHY = cupy_status()
if _OK and not torch.cuda.is_available():
    _OK, _WHY = False, "CuPy sees a GPU but this torch is a CPU build: install a CUDA build of torch"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _OK, reason=f"GPU tests: {_WHY}")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEV = "cuda"


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, hidden, inter, rows", [
    (1, 4096, 14336, (0, 14336)),      # a whole Mixtral expert, one token
    (3, 4096, 14336, (1000, 5001)),    # a slice off the 128-row and 16-byte grids
    (8, 67, 45, (3, 30)),              # odd H: unaligned rows
    (2, 1000, 333, (332, 333)),        # a one-row slice at the end
])
def test_expert_swiglu(dtype, n, hidden, inter, rows):
    w = tuple(t.to(DEV) for t in poisoned_expert(hidden, inter, rows, dtype, seed=n))
    x, out = torch.randn(n, hidden, device=DEV), torch.randn(n, hidden, device=DEV)
    expected = twins.expert_swiglu(x, *w, out.clone(), rows)
    got = out.clone()
    assert ops.expert_swiglu(x, *w, got, rows) is got  # accumulated in place, no copy
    torch.cuda.synchronize()
    close(got, expected)


def test_expert_swiglu_on_a_side_stream_staged_and_prefill():
    wg, wu, wd = (t.to(DEV) for t in poisoned_expert(512, 300, (0, 300), torch.bfloat16, seed=0))
    staged = (wg[40:200].contiguous(), wu[40:200].contiguous(), wd[:, 40:200].contiguous())
    x = torch.randn(5, 512, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    got = torch.zeros(5, 512, device=DEV)
    ops.expert_swiglu(x, *staged, got, stream=side)
    side.synchronize()
    close(got, twins.expert_swiglu(x, wg, wu, wd, torch.zeros_like(got), (40, 200)))
    x20 = torch.randn(20, 512, device=DEV)  # prefill: cuBLAS through torch
    close(ops.expert_swiglu(x20, wg, wu, wd, torch.zeros(20, 512, device=DEV), (40, 200)),
          twins.expert_swiglu(x20, wg, wu, wd, torch.zeros(20, 512, device=DEV), (40, 200)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 4096), (7, 67), (300, 5120)])
def test_norms(dtype, rows, hidden):
    x = torch.randn(rows, hidden, device=DEV) * 3
    w, b = (torch.randn(hidden, device=DEV).to(dtype) for _ in "wb")
    close(ops.rms_norm(x, w, 1e-5), twins.rms_norm(x, w, 1e-5))
    close(ops.layer_norm(x, w, b, 1e-5), twins.layer_norm(x, w, b, 1e-5))


@pytest.mark.parametrize("n, heads, dim", [(1, 32, 128), (37, 8, 128), (5, 3, 10)])
def test_rope(n, heads, dim):
    x, cos, sin = (torch.randn(*s, device=DEV) for s in ((n, heads, dim), (n, dim), (n, dim)))
    got = x.clone()
    ops.rope(got, cos, sin)
    close(got, twins.rope(x.clone(), cos, sin), 1e-5)


@pytest.mark.parametrize("n, n_experts, top_k, normalize, shared", [
    (1, 8, 2, True, False), (64, 60, 4, False, True), (33, 64, 8, True, True), (5, 256, 6, True, False)])
def test_router_softmax_topk(n, n_experts, top_k, normalize, shared):
    logits = torch.randn(n, n_experts + shared, device=DEV) * 2
    got = ops.router_topk(logits, top_k, normalize=normalize, shared_gate=shared)
    want = twins.router_topk(logits, top_k, normalize=normalize, shared_gate=shared)
    assert torch.equal(got[1], want[1])
    close(got[0], want[0], 1e-5)
    if shared:
        close(got[2], want[2], 1e-5)


@pytest.mark.parametrize("jitter_eps", [0.01, 0.3, 2.0])
def test_router_sparsemixer(jitter_eps):
    logits = torch.randn(100, 16, device=DEV)
    got = ops.router_topk(logits, 2, mode="sparsemixer", jitter_eps=jitter_eps)
    want = twins.router_topk(logits, 2, mode="sparsemixer", jitter_eps=jitter_eps)
    assert torch.equal(got[1], want[1])
    close(got[0], want[0], 1e-5)


@pytest.mark.parametrize("n, k, n_experts, hidden", [(1, 2, 8, 4096), (513, 2, 8, 67), (100, 8, 64, 128)])
def test_moe_permute_unpermute(n, k, n_experts, hidden):
    x = torch.randn(n, hidden, device=DEV)
    experts = torch.stack([torch.randperm(n_experts)[:k] for _ in range(n)]).to(DEV)
    got = ops.moe_permute(x, experts, n_experts)
    want = twins.moe_permute(x, experts, n_experts)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    y_perm, weights, out = (torch.randn(*s, device=DEV) for s in ((n * k, hidden), (n, k), (n, hidden)))
    close(ops.moe_unpermute(y_perm, want[2], weights, out.clone()),
          twins.moe_unpermute(y_perm, want[2], weights, out.clone()), 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, heads, kv, dim, length, window", [
    (1, 32, 8, 128, 1, None), (4, 32, 8, 128, 1027, None), (2, 6, 2, 40, 17, None), (3, 16, 1, 256, 300, 64)])
def test_attention_decode(dtype, b, heads, kv, dim, length, window):
    q = torch.randn(b, heads, dim, device=DEV)
    k, v = (torch.randn(b, kv, length + 5, dim, device=DEV).to(dtype) for _ in "kv")
    k[:, :, length:], v[:, :, length:] = float("nan"), float("nan")
    close(ops.attention_decode(q, k, v, length, window), twins.attention_decode(q, k, v, length, window))
