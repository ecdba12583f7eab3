"""The CPU twins of the CUDA kernels against the reference forward's math, on tiny models of each
architecture: a twin is the kernel's specification, so it must be the reference plus only the
kernel's contract (slice-and-accumulate, in-place rotation, permuted layout). Runs everywhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from offloadkit.errors import OffloadkitError
from offloadkit.kernels.cuda import twins
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.rope import apply_rope, rotary_tables
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
def test_expert_slices_accumulate_to_the_reference_expert(arch, dtype):
    model = tiny_model(arch, dtype)
    x = torch.randn(3, model.spec.hidden_size)
    p = f"{model.spec.moe_prefix(0)}.experts.1"
    w = [model.weights[f"{p}.{n}.weight"] for n in model.spec.expert_names()]
    inter = w[0].shape[0]
    out = torch.zeros_like(x)
    for rows in [(0, 13), (13, 13), (13, 29), (29, inter)]:  # GG, an empty CG, CG, CC
        twins.expert_swiglu(x, *w, out, rows)
    torch.testing.assert_close(out, model.expert(0, 1, x), rtol=1e-5, atol=1e-5)


def test_expert_slice_buffer_and_bad_slices():
    model = tiny_model("mixtral")
    p = f"{model.spec.moe_prefix(0)}.experts.0"
    wg, wu, wd = (model.weights[f"{p}.{n}.weight"] for n in model.spec.expert_names())
    x = torch.randn(2, 48)
    staged = (wg[5:17].contiguous(), wu[5:17].contiguous(), wd[:, 5:17].contiguous())  # a CG staging buffer
    torch.testing.assert_close(twins.expert_swiglu(x, *staged, torch.zeros_like(x)),
                               twins.expert_swiglu(x, wg, wu, wd, torch.zeros_like(x), (5, 17)))
    with pytest.raises(OffloadkitError, match=r"rows \[30, 41\) lies outside .* \[0, 40\)"):
        twins.expert_swiglu(x, wg, wu, wd, torch.zeros_like(x), (30, 41))
    with pytest.raises(OffloadkitError, match="x has dtype bfloat16"):
        twins.expert_swiglu(x.bfloat16(), wg, wu, wd, torch.zeros_like(x))


@pytest.mark.parametrize("arch", ["mixtral", "phimoe"])
def test_norms_are_the_reference_norm(arch):
    model = tiny_model(arch, "bfloat16")
    x = torch.randn(5, 48)
    prefix = "model.layers.0.input_layernorm"
    w = model.weights[f"{prefix}.weight"]
    got = (twins.layer_norm(x, w, model.weights[f"{prefix}.bias"], model.spec.norm_eps) if arch == "phimoe"
           else twins.rms_norm(x, w, model.spec.norm_eps))
    torch.testing.assert_close(got, model.norm(x, prefix))
    in_place = x.clone()
    twins.rms_norm(in_place, w, 1e-5, out=in_place)
    torch.testing.assert_close(in_place, twins.rms_norm(x, w, 1e-5))


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
def test_rope_tables_cover_every_variant(case):
    arch, overrides = ROPE_CASES[case]
    model = tiny_model(arch, **overrides)
    spec = model.spec
    positions = torch.arange(30, 37)  # past longrope's original 32 positions: the long scale is in the tables
    cos, sin = rotary_tables(spec, positions)
    x = torch.randn(len(positions), spec.n_heads, spec.head_dim)
    expected = apply_rope(x.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)  # the reference's [B, H, T, D]
    got = x.clone()
    assert twins.rope(got, cos, sin) is got
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_router_is_the_reference_router(arch):
    model = tiny_model(arch)
    x = torch.randn(9, 48)
    m = model.spec.moe_prefix(0)
    gate = model.weights[f"{m}.gate.weight"]
    expected_w, expected_e = model.route(0, x)
    if arch == "qwen2_moe":  # the shared-expert gate row rides along as logit E
        logits = F.linear(x, torch.cat((gate, model.weights[f"{m}.shared_expert_gate.weight"])))
        w, e, shared = twins.router_topk(logits, model.spec.top_k, normalize=model.spec.norm_topk_prob,
                                         shared_gate=True)
        torch.testing.assert_close(shared, torch.sigmoid(F.linear(x, model.weights[f"{m}.shared_expert_gate.weight"])))
    elif arch == "phimoe":
        w, e, shared = twins.router_topk(F.linear(x, gate), 2, mode="sparsemixer",
                                         jitter_eps=model.spec.router_jitter_eps)
    else:
        w, e, shared = twins.router_topk(F.linear(x, gate), model.spec.top_k)
    assert torch.equal(e, expected_e)
    torch.testing.assert_close(w, expected_w)
    assert shared is None or shared.shape == (9, 1)


def test_router_rejects_what_the_kernel_cannot_do():
    with pytest.raises(OffloadkitError, match="exactly 2"):
        twins.router_topk(torch.randn(3, 8), 3, mode="sparsemixer")
    with pytest.raises(OffloadkitError, match="top_k = 9 of 8"):
        twins.router_topk(torch.randn(3, 8), 9)


def test_permute_experts_unpermute_is_dispatch():
    model = tiny_model("mixtral")
    x = torch.randn(11, 48)
    weights, experts = model.route(0, x)
    x_perm, src, dst, offsets = twins.moe_permute(x, experts, model.spec.n_experts)
    assert offsets[-1] == experts.numel() and torch.equal(src[dst.long()], torch.arange(experts.numel()).int())
    y_perm = torch.empty_like(x_perm)
    for e in range(model.spec.n_experts):
        a, b = int(offsets[e]), int(offsets[e + 1])
        assert (experts.reshape(-1)[src[a:b].long()] == e).all() and (src[a:b].diff() > 0).all()
        y_perm[a:b] = model.expert(0, e, x_perm[a:b])
    out = twins.moe_unpermute(y_perm, dst, weights, torch.zeros_like(x))
    torch.testing.assert_close(out, model.moe_ffn(0, x), rtol=1e-5, atol=1e-6)


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
    first = 0 if window is None else length - window
    kk = k[:, :, first:length].float().repeat_interleave(heads // kv, dim=1)
    vv = v[:, :, first:length].float().repeat_interleave(heads // kv, dim=1)
    expected = F.scaled_dot_product_attention(q[:, :, None], kk, vv)[:, :, 0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(OffloadkitError, match="length 21 must be in"):
        twins.attention_decode(q, k, v, 21)
