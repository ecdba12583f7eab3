"""Every CUDA kernel on a real GPU through CuPy, against the exact result of its formula (f64, on the
device, from the same stored weights) within the f32 error bounds of tests/numerics.py; the router's
picks against the exact top-k, moe_permute's integer outputs against its CPU twin's, exactly.

Random inputs, odd sizes, slices whose boundaries are not multiples of the block size or of the
16-byte packs, NaN-poisoned memory outside every slice and past every cache length, realistic sizes
(a Mixtral expert), and a launch on a side stream. Where CuPy or CUDA is missing, every test here is
reported as *skipped* with the reason (``pytest -rs`` prints it), never passed.
"""

from __future__ import annotations

import pytest
import torch
from numerics import (
    assert_softmax_topk,
    assert_sparsemixer,
    assert_within,
    layer_norm,
    rms_norm,
    rope,
    sigmoid,
    swiglu_expert,
)
from test_cuda_emulated import attention_decode_formula, poisoned_expert, rotary, weighted_picks

from offloadkit.kernels.cuda import ops, twins
from offloadkit.kernels.cuda.loader import cupy_status

_OK, _WHY = cupy_status()
if _OK and not torch.cuda.is_available():
    _OK, _WHY = False, "CuPy sees a GPU but this torch is a CPU build: install a CUDA build of torch"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _OK, reason=f"GPU tests: {_WHY}")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEV = "cuda"


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
    want = swiglu_expert(x, *w, rows, out=out)
    got = out.clone()
    assert ops.expert_swiglu(x, *w, got, rows) is got  # accumulated in place, no copy
    torch.cuda.synchronize()
    assert_within(got, want, "expert_swiglu")


def test_expert_swiglu_on_a_side_stream_staged_and_the_prefill_path():
    wg, wu, wd = (t.to(DEV) for t in poisoned_expert(512, 300, (0, 300), torch.bfloat16, seed=0))
    staged = (wg[40:200].contiguous(), wu[40:200].contiguous(), wd[:, 40:200].contiguous())
    x = torch.randn(5, 512, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    got = torch.zeros(5, 512, device=DEV)
    ops.expert_swiglu(x, *staged, got, stream=side)
    side.synchronize()
    assert_within(got, swiglu_expert(x, wg, wu, wd, (40, 200)), "a staged slice on a side stream")
    x20, out20 = torch.randn(20, 512, device=DEV), torch.randn(20, 512, device=DEV)  # prefill: cuBLAS via torch
    assert_within(ops.expert_swiglu(x20, wg, wu, wd, out20.clone(), (40, 200)),
                  swiglu_expert(x20, wg, wu, wd, (40, 200), out=out20), "the prefill path")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 4096), (7, 67), (300, 5120)])
def test_norms(dtype, rows, hidden):
    x = torch.randn(rows, hidden, device=DEV) * 3
    w, b = (torch.randn(hidden, device=DEV).to(dtype) for _ in "wb")
    assert_within(ops.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), "rms_norm")
    assert_within(ops.layer_norm(x + 1, w, b, 1e-5), layer_norm(x + 1, w, b, 1e-5), "layer_norm")


@pytest.mark.parametrize("n, heads, dim", [(1, 32, 128), (37, 8, 128), (5, 3, 10)])
def test_rope(n, heads, dim):
    x = torch.randn(n, heads, dim, device=DEV)
    cos, sin = (t.to(DEV) for t in rotary(n, dim, scale=1.3))
    got = x.clone()
    ops.rope(got, cos, sin)
    assert_within(got, rope(x, cos, sin), "rope")


@pytest.mark.parametrize("n, n_experts, top_k, normalize, shared", [
    (1, 8, 2, True, False), (64, 60, 4, False, True), (33, 64, 8, True, True), (5, 256, 6, True, False)])
def test_router_softmax_topk(n, n_experts, top_k, normalize, shared):
    logits = torch.randn(n, n_experts + shared, device=DEV) * 2
    weights, experts, gate = ops.router_topk(logits, top_k, normalize=normalize, shared_gate=shared)
    assert_softmax_topk(weights, experts, logits[:, :n_experts], top_k, normalize)
    if shared:
        assert_within(gate, sigmoid(logits[:, -1:]), "the shared expert's gate")


@pytest.mark.parametrize("jitter_eps", [0.01, 0.3, 2.0])
def test_router_sparsemixer(jitter_eps):
    logits = torch.randn(100, 16, device=DEV)
    weights, experts, _ = ops.router_topk(logits, 2, mode="sparsemixer", jitter_eps=jitter_eps)
    assert_sparsemixer(weights, experts, logits, jitter_eps)


@pytest.mark.parametrize("n, k, n_experts, hidden", [(1, 2, 8, 4096), (513, 2, 8, 67), (100, 8, 64, 128)])
def test_moe_permute_unpermute(n, k, n_experts, hidden):
    x = torch.randn(n, hidden, device=DEV)
    experts = torch.stack([torch.randperm(n_experts)[:k] for _ in range(n)]).to(DEV)
    got = ops.moe_permute(x, experts, n_experts)
    want = twins.moe_permute(x, experts, n_experts)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    y_perm, weights, out = (torch.randn(*s, device=DEV) for s in ((n * k, hidden), (n, k), (n, hidden)))
    got = ops.moe_unpermute(y_perm, want[2], weights, out.clone())
    assert_within(got, weighted_picks(y_perm, want[2], weights, out), "moe_unpermute")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, heads, kv, dim, length, window", [
    (1, 32, 8, 128, 1, None), (4, 32, 8, 128, 1027, None), (2, 6, 2, 40, 17, None), (3, 16, 1, 256, 300, 64)])
def test_attention_decode(dtype, b, heads, kv, dim, length, window):
    q = torch.randn(b, heads, dim, device=DEV)
    k, v = (torch.randn(b, kv, length + 5, dim, device=DEV).to(dtype) for _ in "kv")
    k[:, :, length:], v[:, :, length:] = float("nan"), float("nan")
    assert_within(ops.attention_decode(q, k, v, length, window), attention_decode_formula(q, k, v, length, window),
                  "attention_decode")
