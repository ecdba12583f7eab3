"""Property tests of the reference forward: parity with transformers over random small shapes, and
the row-slice identity of SwiGLU that the CC / CG / GG split (docs/DESIGN.md section 3) stands on, checked
against the exact expert (f64, same stored weights) within the f32 error bound of tests/numerics.py."""

from __future__ import annotations

import tempfile
from itertools import pairwise
from pathlib import Path

import torch
from hf_models import ARCHS, build_hf_model, check_parity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import assert_within, swiglu_expert

from offloadkit.model.moe import swiglu


@st.composite
def hf_shapes(draw: st.DrawFn) -> tuple[str, dict]:
    """An architecture and the overrides of a small random config of it."""
    arch = draw(st.sampled_from(ARCHS))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    n_heads = draw(st.integers(1, 4))
    n_kv = draw(st.sampled_from([d for d in range(1, n_heads + 1) if n_heads % d == 0]))
    layers = draw(st.integers(1, 3))
    kw: dict = dict(hidden_size=head_dim * n_heads, num_attention_heads=n_heads, num_key_value_heads=n_kv,
                    num_hidden_layers=layers, intermediate_size=draw(st.integers(4, 40)),
                    vocab_size=draw(st.integers(16, 80)))
    if arch == "llama":
        kw["attention_bias"] = draw(st.booleans())
        return arch, kw
    experts = draw(st.integers(2, 6))
    top_k = 2 if arch == "phimoe" else draw(st.integers(1, experts))
    if arch == "qwen2_moe":
        kw.update(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=draw(st.integers(4, 24)),
                  shared_expert_intermediate_size=draw(st.integers(4, 24)), norm_topk_prob=draw(st.booleans()),
                  mlp_only_layers=draw(st.lists(st.integers(0, layers - 1), max_size=layers, unique=True)),
                  decoder_sparse_step=draw(st.integers(1, 2)))
    else:
        kw.update(num_local_experts=experts, num_experts_per_tok=top_k)
    return arch, kw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=hf_shapes(), prompt_len=st.integers(1, 12), steps=st.integers(1, 4), batch=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_parity_random_shapes(shape: tuple[str, dict], prompt_len: int, steps: int, batch: int, seed: int) -> None:
    arch, overrides = shape
    hf = build_hf_model(arch, seed=seed, **overrides)
    with tempfile.TemporaryDirectory() as folder:
        check_parity(hf, Path(folder), prompt_len=prompt_len, steps=steps, batch=batch, seed=seed)


@settings(max_examples=60, deadline=None)
@given(hidden=st.integers(1, 24), inter=st.integers(1, 40), tokens=st.integers(1, 6),
       cuts=st.lists(st.floats(0, 1), max_size=4), half=st.booleans(), seed=st.integers(0, 2**16))
def test_swiglu_row_slices_sum_to_whole(hidden: int, inter: int, tokens: int, cuts: list[float], half: bool,
                                        seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if half else torch.float32
    w_gate, w_up = (torch.randn(inter, hidden, generator=g).to(dtype) for _ in range(2))
    w_down = torch.randn(hidden, inter, generator=g).to(dtype)
    x = torch.randn(tokens, hidden, generator=g)
    bounds = sorted({0, inter, *(round(c * inter) for c in cuts)})
    parts = [swiglu(x, w_gate, w_up, w_down, rows=(r0, r1)) for r0, r1 in pairwise(bounds)]
    whole = swiglu(x, w_gate, w_up, w_down)
    assert whole.dtype == torch.float32
    # both are sums of the same I products, in two orders: each within the bound of the exact expert
    want = swiglu_expert(x, w_gate, w_up, w_down)
    assert_within(whole, want, "the whole expert")
    assert_within(torch.stack(parts).sum(0), want, f"the sum of the slices at {bounds}")


def test_expert_slices_sum_to_the_expert_of_a_model() -> None:
    """The model's own expert entry point takes row bounds too (the engine's CC / CG / GG split)."""
    from hf_models import export

    from offloadkit.model.reference import ReferenceModel

    with tempfile.TemporaryDirectory() as folder:
        spec, weights = export(build_hf_model("mixtral"), Path(folder))
    model = ReferenceModel(spec, {n: w.bfloat16() for n, w in weights.items()})
    x = torch.randn(5, spec.hidden_size)
    inter = spec.expert_intermediate_size
    g, s = 16, 24  # GG rows [0, g), CG [g, g + s), CC [g + s, I)
    parts = [model.expert(1, 3, x, rows=r) for r in ((0, g), (g, g + s), (g + s, inter))]
    p = f"{spec.moe_prefix(1)}.experts.3"
    want = swiglu_expert(x, *(model.weights[f"{p}.{n}.weight"] for n in spec.expert_names()))
    assert_within(sum(parts), want, "the expert's slices")
    assert_within(model.expert(1, 3, x), want, "the expert")
