"""The CPU twins of the CUDA kernels against formulas written here from the math (tests/numerics.py,
in f64 on the same stored weights, within the f32 error bounds), on tiny models of each architecture.

A twin is its kernel's specification, and most twins call the reference forward's own functions; so
each is checked against an independent formula (``@`` and a sigmoid for the expert, the norms'
definitions, a rotation by complex multiplication, softmax and top-k from their definitions), never
against the reference function it calls. Runs everywhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import (
    Bounded,
    assert_softmax_topk,
    assert_sparsemixer,
    assert_within,
    attention,
    exact,
    gamma,
    layer_norm,
    matmul,
    rms_norm,
    rope,
    sigmoid,
    swiglu_expert,
)

from offloadkit.errors import OffloadkitError
from offloadkit.kernels.cuda import twins
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.rope import attention_scale, rotary_tables
from offloadkit.model.spec import ModelSpec
from offloadkit.model.writer import make_config, random_weights

MOE_ARCHS = ("mixtral", "qwen2_moe", "phimoe")


def tiny_model(arch: str, dtype: str = "float32", **overrides) -> ReferenceModel:
    cfg = make_config(arch, layers=1, hidden=48, heads=4, kv_heads=2, experts=5, top_k=2, intermediate=40,
                      vocab=64, dtype=dtype, **overrides)
    spec = ModelSpec.from_config(cfg)
    return ReferenceModel(spec, random_weights(spec, seed=3))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_slices_accumulate_to_the_expert(arch, dtype):
    model = tiny_model(arch, dtype)
    x = torch.randn(3, model.spec.hidden_size)
    p = f"{model.spec.moe_prefix(0)}.experts.1"
    w = [model.weights[f"{p}.{n}.weight"] for n in model.spec.expert_names()]
    inter = w[0].shape[0]
    out = torch.randn_like(x)  # accumulated into, not overwritten
    want = swiglu_expert(x, *w, out=out)
    for rows in [(0, 13), (13, 13), (13, 29), (29, inter)]:  # GG, an empty CG, CG, CC
        twins.expert_swiglu(x, *w, out, rows)
    assert_within(out, want, "the expert's slices accumulated")


def test_expert_slice_buffer_and_bad_slices():
    model = tiny_model("mixtral")
    p = f"{model.spec.moe_prefix(0)}.experts.0"
    wg, wu, wd = (model.weights[f"{p}.{n}.weight"] for n in model.spec.expert_names())
    x = torch.randn(2, 48)
    staged = (wg[5:17].contiguous(), wu[5:17].contiguous(), wd[:, 5:17].contiguous())  # a CG staging buffer
    want = swiglu_expert(x, wg, wu, wd, (5, 17))
    assert_within(twins.expert_swiglu(x, *staged, torch.zeros_like(x)), want, "a staged slice")
    assert_within(twins.expert_swiglu(x, wg, wu, wd, torch.zeros_like(x), (5, 17)), want, "rows of the whole block")
    with pytest.raises(OffloadkitError, match=r"rows \[30, 41\) lies outside .* \[0, 40\)"):
        twins.expert_swiglu(x, wg, wu, wd, torch.zeros_like(x), (30, 41))
    with pytest.raises(OffloadkitError, match="x has dtype bfloat16"):
        twins.expert_swiglu(x.bfloat16(), wg, wu, wd, torch.zeros_like(x))


@pytest.mark.parametrize("arch", ["mixtral", "phimoe"])
def test_norms_are_their_formulas(arch):
    model = tiny_model(arch, "bfloat16")
    x = torch.randn(5, 48) * 3 + 1
    prefix = "model.layers.0.input_layernorm"
    w, eps = model.weights[f"{prefix}.weight"], model.spec.norm_eps
    if arch == "phimoe":
        b = model.weights[f"{prefix}.bias"]
        assert_within(twins.layer_norm(x, w, b, eps), layer_norm(x, w, b, eps), "layer_norm")
    else:
        assert_within(twins.rms_norm(x, w, eps), rms_norm(x, w, eps), "rms_norm")
    # the out= contract: normalising in place writes what the out-of-place call returns, bit for bit
    in_place = x.clone()
    assert twins.rms_norm(in_place, w, 1e-5, out=in_place) is in_place
    assert torch.equal(in_place, twins.rms_norm(x, w, 1e-5))


ROPE_CASES = {
    "default": ("mixtral", {}),
    "llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64}}),
    "linear": ("qwen2_moe", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}}),
    "longrope": ("phimoe", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                                "short_factor": [1.0 + 0.1 * i for i in range(6)],
                                                "long_factor": [2.0 + 0.1 * i for i in range(6)],
                                                "short_mscale": 1.1, "long_mscale": 1.3,
                                                "original_max_position_embeddings": 32}}),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_rotates_pairs_by_the_tables_of_every_variant(case):
    arch, overrides = ROPE_CASES[case]
    model = tiny_model(arch, **overrides)
    spec = model.spec
    positions = torch.arange(30, 37)  # past longrope's original 32 positions: the long scale is in the tables
    cos, sin = rotary_tables(spec, positions)
    # each table entry is a scaled rotation, cos² + sin² = scale² with the variant's scale, whatever the
    # angle's own rounding: torch's f32 cos and sin are within 1 ulp (2u), the scale is rounded to f32 and
    # multiplied in (2 more), so each entry is within γ_4 and the sum of squares within γ_8
    scale = attention_scale(spec, int(positions.max()) + 1)
    radius = cos.double().square() + sin.double().square()
    assert ((radius - scale**2).abs() <= gamma(8) * scale**2).all()
    x = torch.randn(len(positions), spec.n_heads, spec.head_dim)
    want = rope(x, cos, sin)  # complex multiplication of each (i, i + D/2) pair
    got = x.clone()
    assert twins.rope(got, cos, sin) is got
    assert_within(got, want, f"rope ({case})")


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_router_is_its_definition(arch):
    model = tiny_model(arch)
    spec = model.spec
    x = torch.randn(9, 48)
    m = spec.moe_prefix(0)
    gate = model.weights[f"{m}.gate.weight"]
    if arch == "qwen2_moe":  # the shared-expert gate row rides along as logit E
        logits = F.linear(x, torch.cat((gate, model.weights[f"{m}.shared_expert_gate.weight"])))
        w, e, shared = twins.router_topk(logits, spec.top_k, normalize=spec.norm_topk_prob, shared_gate=True)
        assert_softmax_topk(w, e, logits[:, :-1], spec.top_k, spec.norm_topk_prob, "qwen router")
        assert_within(shared, sigmoid(logits[:, -1:]), "the shared expert's gate")
    elif arch == "phimoe":
        logits = F.linear(x, gate)
        w, e, shared = twins.router_topk(logits, 2, mode="sparsemixer", jitter_eps=spec.router_jitter_eps)
        assert_sparsemixer(w, e, logits, spec.router_jitter_eps)
    else:
        logits = F.linear(x, gate)
        w, e, shared = twins.router_topk(logits, spec.top_k)
        assert_softmax_topk(w, e, logits, spec.top_k, True, "mixtral router")
    assert (shared is None) == (arch != "qwen2_moe")


def test_router_rejects_what_the_kernel_cannot_do():
    with pytest.raises(OffloadkitError, match="exactly 2"):
        twins.router_topk(torch.randn(3, 8), 3, mode="sparsemixer")
    with pytest.raises(OffloadkitError, match="top_k = 9 of 8"):
        twins.router_topk(torch.randn(3, 8), 9)


def test_permute_experts_unpermute_is_dispatch():
    model = tiny_model("mixtral")
    spec = model.spec
    x = torch.randn(11, 48)
    weights, experts = model.route(0, x)
    n, k = experts.shape
    x_perm, src, dst, offsets = twins.moe_permute(x, experts, spec.n_experts)
    assert offsets[-1] == experts.numel() and torch.equal(src[dst.long()], torch.arange(experts.numel()).int())
    assert torch.equal(x_perm, x[src.long() // k])  # each pick's row, moved exactly
    expert_w = [[model.weights[f"{spec.moe_prefix(0)}.experts.{e}.{name}.weight"] for name in spec.expert_names()]
                for e in range(spec.n_experts)]
    y_perm = torch.empty_like(x_perm)
    y_value, y_err = torch.empty(n * k, 48, dtype=torch.float64), torch.empty(n * k, 48, dtype=torch.float64)
    for e in range(spec.n_experts):
        a, b = int(offsets[e]), int(offsets[e + 1])
        assert (experts.reshape(-1)[src[a:b].long()] == e).all() and (src[a:b].diff() > 0).all()
        y_perm[a:b] = model.expert(0, e, x_perm[a:b])
        y = swiglu_expert(x_perm[a:b], *expert_w[e])  # the exact expert outputs of each group
        y_value[a:b], y_err[a:b] = y.value, y.err
    out0 = torch.randn_like(x)
    # unpermute alone: out += Σ_j w_j y_perm[dst[t k + j]], k products and the out term, in f32
    got = twins.moe_unpermute(y_perm, dst, weights, out0.clone())
    picked = exact(y_perm[dst.long()].view(n, k, 48))
    assert_within(got, squeeze(matmul(exact(weights[:, None, :]), picked, add=out0[:, None, :])), "unpermute")
    # and the whole path equals the MoE by its definition, Σ_j w_j expert_{e_j}(x_t), as dispatch does
    exact_y = Bounded(y_value[dst.long()].view(n, k, 48), y_err[dst.long()].view(n, k, 48))
    want = squeeze(matmul(exact(weights[:, None, :]), exact_y))
    assert_within(twins.moe_unpermute(y_perm, dst, weights, torch.zeros_like(x)), want, "permute, experts, unpermute")
    assert_within(model.moe_ffn(0, x), want, "the reference's dispatch")


def squeeze(b: Bounded) -> Bounded:
    return Bounded(b.value[:, 0], b.err[:, 0])


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_decode_is_softmax_attention(dtype, window):
    b, heads, kv, dim, capacity, length = 2, 6, 3, 16, 20, 13
    q = torch.randn(b, heads, dim)
    k = torch.randn(b, kv, capacity, dim).to(dtype)
    v = torch.randn(b, kv, capacity, dim).to(dtype)
    k[:, :, length:] = float("nan")  # the cache past `length` is never read
    v[:, :, length:] = float("nan")
    got = twins.attention_decode(q, k, v, length, window)
    want = attention(q[:, :, None], k[:, :, :length], v[:, :, :length], length - 1, window)
    assert_within(got, Bounded(want.value[:, :, 0], want.err[:, :, 0]), "attention_decode")
    with pytest.raises(OffloadkitError, match="length 21 must be in"):
        twins.attention_decode(q, k, v, 21)
