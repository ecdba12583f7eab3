"""Writing checkpoints: configs of every architecture, determinism, sharding, and transformers' view."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from offloadkit.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from offloadkit.model.checkpoint import open_checkpoint
from offloadkit.model.spec import ModelSpec
from offloadkit.model.tokenizer import byte_level_tokenizer, load_tokenizer
from offloadkit.model.writer import ROUTER_GAIN, make_config, random_weights, write_checkpoint

ARCHS = ("mixtral", "llama", "qwen2_moe", "phimoe")


# ---- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_make_config_describes_the_requested_model(arch: str) -> None:
    cfg = make_config(arch, layers=3, hidden=96, heads=6, kv_heads=3, experts=5, top_k=2, intermediate=40,
                      vocab=300, dtype="f16")
    spec = ModelSpec.from_config(cfg)
    assert cfg["model_type"] == arch and cfg["architectures"][0].endswith("ForCausalLM")
    assert (spec.n_layers, spec.hidden_size, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (3, 96, 6, 3, 16)
    assert spec.vocab_size == 300 and spec.dtype == "float16" and cfg["dtype"] == "float16"
    assert (spec.bos_token_id, spec.eos_token_id) == (1, (2,))
    assert spec.rope.theta == cfg["rope_parameters"]["rope_theta"]
    if arch == "llama":
        assert not spec.is_moe and spec.intermediate_size == 40
    else:
        assert (spec.n_experts, spec.top_k, spec.expert_intermediate_size) == (5, 2, 40)
    if arch == "qwen2_moe":
        assert spec.shared_expert_intermediate_size == 80 and spec.qkv_bias and not spec.o_bias
    if arch == "phimoe":
        assert spec.norm_kind == "layer" and spec.qkv_bias and spec.o_bias and spec.lm_head_bias
        assert spec.router == "sparsemixer"


def test_make_config_overrides_and_refusals() -> None:
    cfg = make_config("qwen2_moe", mlp_only_layers=[0], tie_word_embeddings=True)
    spec = ModelSpec.from_config(cfg)
    assert not spec.is_moe_layer(0) and spec.is_moe_layer(1) and "lm_head.weight" not in spec.tensors()
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported"):
        make_config("gpt2")
    with pytest.raises(ConfigError, match="top-2 only"):
        make_config("phimoe", top_k=3)
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        make_config("llama", heads=4, kv_heads=3)


# ---- random weights ------------------------------------------------------------------------------


def test_random_weights_are_deterministic_and_well_scaled(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", make_config("mixtral"), seed=5)
    b = write_checkpoint(tmp_path / "b", make_config("mixtral"), seed=5)
    c = write_checkpoint(tmp_path / "c", make_config("mixtral"), seed=6)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    deeper = random_weights(ModelSpec.from_config(make_config("mixtral", layers=4)), seed=5)
    ckpt = open_checkpoint(a)
    for name in ckpt:  # adding layers leaves the existing tensors as they were
        assert torch.equal(ckpt[name], deeper[name]), name
    w = {n: t.float() for n, t in ckpt.items()}
    assert abs(w["model.norm.weight"].mean() - 1) < 0.05
    q = w["model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std() * 64**0.5 - 1) < 0.1  # ~ N(0, 1/fan_in)
    router = w["model.layers.0.block_sparse_moe.gate.weight"]
    assert abs(router.std() * 64**0.5 / ROUTER_GAIN - 1) < 0.2


def test_random_phimoe_biases_are_small(tmp_path: Path) -> None:
    w = random_weights(ModelSpec.from_config(make_config("phimoe")), seed=0, dtype="float32")
    biases = [t for n, t in w.items() if n.endswith(".bias")]
    assert len(biases) == 2 * (4 + 2) + 1 + 1  # per layer q/k/v/o and two LayerNorms; final norm; lm_head
    assert max(float(t.abs().max()) for t in biases) < 0.15


# ---- given weights, dtypes, shards -------------------------------------------------------------


def test_trained_weights_round_trip_and_dtype_override(tmp_path: Path) -> None:
    config = make_config("llama", dtype="float32")
    trained = {n: t * 0.5 + 1 for n, t in random_weights(ModelSpec.from_config(config), seed=1).items()}
    trained["model.rotary_emb.inv_freq"] = torch.ones(8)  # a buffer a training script may carry along
    out = write_checkpoint(tmp_path / "t", config, trained, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ckpt = open_checkpoint(out)
    assert ckpt.dtype == "bfloat16" and "model.rotary_emb.inv_freq" not in ckpt.extra_names
    for name in ckpt:
        assert torch.equal(ckpt[name], trained[name].to(torch.bfloat16)), name
    again = write_checkpoint(tmp_path / "again", json.loads((out / "config.json").read_text()), ckpt)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_given_weights_are_checked(tmp_path: Path) -> None:
    config = make_config("mixtral")
    weights = random_weights(ModelSpec.from_config(config))
    name = "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    with pytest.raises(CheckpointError, match=f"lack 1 tensor.*{re.escape(name)}"):
        write_checkpoint(tmp_path / "x", config, {n: t for n, t in weights.items() if n != name})
    with pytest.raises(CheckpointError, match=rf"'{re.escape(name)}' has shape \(3, 3\), the config expects"):
        write_checkpoint(tmp_path / "x", config, {**weights, name: torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="config does not name: model.layers.0.extra.weight"):
        write_checkpoint(tmp_path / "x", config, {**weights, "model.layers.0.extra.weight": torch.zeros(3)})
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_shards_and_index(tmp_path: Path) -> None:
    config = make_config("mixtral", dtype="float32")
    out = write_checkpoint(tmp_path / "s", config, max_shard_bytes=64 * 64 * 4 * 3)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    spec = ModelSpec.from_config(config)
    assert set(index["weight_map"]) == set(spec.tensors())
    assert index["metadata"]["total_size"] == spec.total_params * 4
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    embed = out / index["weight_map"]["model.embed_tokens.weight"]  # larger than the limit: alone
    assert len([n for n, f in index["weight_map"].items() if f == embed.name]) == 1
    assert not (out / "model.safetensors").exists()
    # Writing again unsharded removes the shards, so no reader can pick stale weights.
    write_checkpoint(out, config, seed=1)
    assert not list(out.glob("model-*.safetensors")) and not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("*.partial"))


# ---- tokenizer files -----------------------------------------------------------------------------


def test_tokenizer_files(tmp_path: Path) -> None:
    out = write_checkpoint(tmp_path / "m", make_config("mixtral", vocab=300))
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["unk_token"]) == ("<s>", "</s>", "<unk>")
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    tok = load_tokenizer(out)
    assert tok.vocab_size == 300 and tok.bos_id == 1 and tok.eos_ids == (2,)
    with pytest.raises(ConfigError, match="vocab_size 200 is too small for the byte-level tokenizer"):
        write_checkpoint(tmp_path / "small", make_config("llama", vocab=200))
    with pytest.raises(ConfigError, match="the tokenizer has 400 tokens but the model's vocab_size is 300"):
        write_checkpoint(tmp_path / "m2", make_config("llama", vocab=300), tokenizer=byte_level_tokenizer(400))
    custom = write_checkpoint(tmp_path / "c", make_config("llama", vocab=512), tokenizer=byte_level_tokenizer(260))
    assert load_tokenizer(custom).vocab_size == 260


# ---- transformers reads what we write ----------------------------------------------------------


def hf_layout(ckpt, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Our Hub-named tensors as transformers 5 holds them: experts fused into gate_up_proj / down_proj."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name, t in ckpt.items():
        if spec.arch in ("mixtral", "phimoe"):
            name = name.replace(".block_sparse_moe.", ".mlp.")
        if spec.arch == "phimoe":
            name = name.replace(".mlp.gate.weight", ".mlp.router.weight")
        m = re.fullmatch(r"(.+\.experts)\.(\d+)\.(\w+)\.weight", name)
        if m:
            experts.setdefault(m[1], {})[(int(m[2]), m[3])] = t
        else:
            out[name] = t
    gate, up, down = spec.expert_names()
    for prefix, e in experts.items():
        ids = range(spec.n_experts)
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([e[i, gate], e[i, up]]) for i in ids])
        out[f"{prefix}.down_proj"] = torch.stack([e[i, down] for i in ids])
    return out


CASES = [(a, {}) for a in ARCHS] + [("llama", {"tie_word_embeddings": True}),
                                    ("qwen2_moe", {"mlp_only_layers": [1]})]


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=[f"{a}{'-' + next(iter(o)) if o else ''}"
                                                            for a, o in CASES])
def test_transformers_loads_what_we_write(tmp_path: Path, arch: str, overrides: dict) -> None:
    transformers = pytest.importorskip("transformers")
    out = write_checkpoint(tmp_path / arch, make_config(arch, **overrides), seed=2, max_shard_bytes=50_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ckpt = open_checkpoint(out)
    assert model.dtype == torch.bfloat16 and type(model).__name__ == make_config(arch)["architectures"][0]
    state = model.state_dict()
    ours = hf_layout(ckpt, ckpt.spec)
    if ckpt.spec.tie_word_embeddings:
        ours["lm_head.weight"] = ours["model.embed_tokens.weight"]
    assert set(state) == set(ours)
    for name, t in ours.items():
        assert torch.equal(state[name], t), name
    with torch.no_grad():
        logits = model(torch.tensor([[1, 70, 71, 72]])).logits
    assert logits.shape == (1, 4, ckpt.spec.vocab_size) and torch.isfinite(logits).all()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("héllo")["input_ids"] == load_tokenizer(out).encode("héllo")
