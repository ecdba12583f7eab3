"""The reference forward equals transformers 5.23 for each architecture, and keeps its contracts.

Parity: a 16-token prefill then 8 greedy decode steps, both sides with their own KV cache; logits
within 1e-4 relative error and identical tokens at every step (docs/DESIGN.md section 10). Then the
contracts other code relies on: bf16 weights widened at use, a differentiable and fast enough
forward for training, the routing record, cache behaviour and clear errors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_models import build_hf_model, check_parity, export, longrope_params, rel_err

from offloadkit.errors import CheckpointError, ConfigError, OffloadkitError
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.spec import ModelSpec

PARITY_CASES = {
    "mixtral": ("mixtral", {}),
    "mixtral-sliding-window": ("mixtral", {"sliding_window": 6}),
    "mixtral-tied": ("mixtral", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "llama-gqa": ("llama", {"num_key_value_heads": 1, "num_hidden_layers": 3}),
    "llama-bias-tied-headdim": ("llama", {"attention_bias": True, "tie_word_embeddings": True, "head_dim": 16}),
    "llama-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "llama-llama3": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "llama-longrope-crossing": ("llama", {"rope_parameters": longrope_params(8, 20) | {"factor": 4.0}}),
    "qwen2_moe-dense-layer-normtopk": ("qwen2_moe", {"num_hidden_layers": 3, "mlp_only_layers": [1],
                                                     "norm_topk_prob": True}),
    "qwen2_moe-no-normtopk": ("qwen2_moe", {"norm_topk_prob": False, "num_experts_per_tok": 3}),
    "qwen2_moe-sparse-step": ("qwen2_moe", {"num_hidden_layers": 4, "decoder_sparse_step": 2}),
    "phimoe": ("phimoe", {}),
    "phimoe-longrope-short": ("phimoe", {"rope_parameters": longrope_params(8, 32)}),
    "phimoe-longrope-crossing-in-decode": ("phimoe", {"rope_parameters": longrope_params(8, 20)}),
    "phimoe-longrope-long-prefill": ("phimoe", {"rope_parameters": longrope_params(8, 12),
                                                "sliding_window": 5}),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_parity_with_transformers(case: str, tmp_path: Path) -> None:
    arch, overrides = PARITY_CASES[case]
    hf = build_hf_model(arch, **overrides)
    err, run = check_parity(hf, tmp_path)
    assert err <= 1e-4
    if arch != "llama":
        assert len(run.experts) >= 4, f"routing is degenerate: only experts {sorted(run.experts)} were used"


@pytest.mark.parametrize("arch", ["mixtral", "phimoe"])
def test_parity_batched_with_preallocated_cache(arch: str, tmp_path: Path) -> None:
    hf = build_hf_model(arch, seed=3)
    check_parity(hf, tmp_path, prompt_len=9, steps=5, batch=3, max_len=32)


def test_parity_when_cache_must_grow(tmp_path: Path) -> None:
    hf = build_hf_model("qwen2_moe", seed=4)
    check_parity(hf, tmp_path, prompt_len=7, steps=6, max_len=8)  # 13 positions in 8 slots


# ---- contracts --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    return export(build_hf_model("mixtral", seed=1), tmp_path_factory.mktemp("mixtral"))


def test_cached_steps_equal_one_causal_forward(mixtral) -> None:
    spec, weights = mixtral
    model = ReferenceModel(spec, weights)
    ids = torch.randint(0, spec.vocab_size, (2, 14), generator=torch.Generator().manual_seed(0))
    full = model.forward(ids)
    cache = model.new_cache(2)
    parts = [model.forward(ids[:, :9], cache)] + [model.forward(ids[:, i:i + 1], cache) for i in range(9, 14)]
    assert cache.length == 14
    assert rel_err(torch.cat(parts, dim=1), full) < 1e-5


def test_routing_record(mixtral) -> None:
    spec, weights = mixtral
    routing: dict[int, torch.Tensor] = {}
    ReferenceModel(spec, weights).forward(torch.zeros(3, 5, dtype=torch.long), routing=routing)
    assert sorted(routing) == list(range(spec.n_layers))
    for sel in routing.values():
        assert sel.dtype == torch.long and sel.shape == (15, spec.top_k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_equal_f32_reference_on_widened_weights(mixtral, dtype: torch.dtype) -> None:
    spec, weights = mixtral
    stored = {n: w.to(dtype) for n, w in weights.items()}
    widened = {n: w.float() for n, w in stored.items()}
    ids = torch.randint(0, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    half = ReferenceModel(spec, stored).forward(ids)
    assert half.dtype == torch.float32
    assert rel_err(half, ReferenceModel(spec, widened).forward(ids)) <= 1e-6
    assert all(w.dtype == dtype for w in stored.values()), "the model must not convert its weights in place"


def test_forward_is_differentiable() -> None:
    """The demo trainer's use: every weight of a small 4-layer Mixtral receives a gradient."""
    spec = ModelSpec.from_config(dict(
        model_type="mixtral", vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1024, rope_theta=10000.0))
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.ones(s) if "norm" in n else 0.05 * torch.randn(s, generator=g)
               for n, s in spec.tensors().items()}
    weights = {n: w.requires_grad_() for n, w in weights.items()}
    model = ReferenceModel(spec, weights)
    ids = torch.randint(0, spec.vocab_size, (4, 65), generator=g)
    logits = model.forward(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, spec.vocab_size), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in weights.values())


def test_sparsemixer_router_is_differentiable(tmp_path: Path) -> None:
    spec, weights = export(build_hf_model("phimoe", seed=2), tmp_path)
    weights = {n: w.clone().requires_grad_() for n, w in weights.items()}
    ReferenceModel(spec, weights).forward(torch.arange(10)[None]).square().mean().backward()
    assert weights["model.layers.0.block_sparse_moe.gate.weight"].grad.abs().sum() > 0


def test_missing_or_misshapen_weights_are_refused(mixtral) -> None:
    spec, weights = mixtral
    with pytest.raises(CheckpointError, match="lack 1 tensor"):
        ReferenceModel(spec, {n: w for n, w in weights.items() if n != "model.norm.weight"})
    bad = dict(weights, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(CheckpointError, match="model.norm.weight has shape"):
        ReferenceModel(spec, bad)
    with pytest.raises(OffloadkitError, match="batch"):
        ReferenceModel(spec, weights).forward(torch.zeros(2, 3, dtype=torch.long), ReferenceModel(
            spec, weights).new_cache(1))


def test_greedy_convenience_matches_forward(mixtral) -> None:
    spec, weights = mixtral
    model = ReferenceModel(spec, weights)
    ids = torch.randint(0, spec.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    tokens = model.greedy(ids, 4)
    seq = torch.cat((ids, tokens), dim=1)
    assert torch.equal(model.forward(seq[:, :-1])[0, 5:].argmax(-1), tokens[0])


# ---- config reading the reference depends on ----------------------------------------------------------


def test_rope_original_max_follows_transformers() -> None:
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    spec = ModelSpec.from_config(base | {"rope_scaling": llama3})
    assert spec.rope.params["original_max_position_embeddings"] == 64  # defaults to max_position_embeddings
    top = base | {"original_max_position_embeddings": 16,
                  "rope_scaling": llama3 | {"original_max_position_embeddings": 32}}
    assert ModelSpec.from_config(top).rope.params["original_max_position_embeddings"] == 16  # top level wins


def test_qwen_per_layer_sliding_window_is_refused() -> None:
    cfg = dict(model_type="qwen2_moe", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
               num_attention_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=4,
               use_sliding_window=True, sliding_window=4)
    with pytest.raises(ConfigError, match="use_sliding_window"):
        ModelSpec.from_config(cfg)
