"""ModelSpec from config.json: parameter counts of the paper's models, and the errors for bad configs."""

import json

import pytest

from offloadkit.errors import ConfigError, DTypeError, ModelNotFoundError, UnsupportedArchitectureError
from offloadkit.model.spec import ModelSpec, normalize_dtype
from offloadkit.model.zoo import load_spec, resolve_model, zoo_names

# Published total parameter counts (model cards), in billions.
PUBLISHED = {
    "mixtral-8x7b": 46.7, "phi-3.5-moe": 41.9, "qwen2-57b-a14b": 57.4, "qwen1.5-moe-a2.7b": 14.3,
    "llama-2-70b": 69.0, "llama-2-13b": 13.0, "llama-2-7b": 6.74,
}
# Published active parameters per token, where the model card gives one.
ACTIVE = {"mixtral-8x7b": 12.9, "phi-3.5-moe": 6.6, "qwen2-57b-a14b": 14.0, "qwen1.5-moe-a2.7b": 2.7}


def test_zoo_has_every_paper_model():
    assert set(PUBLISHED) <= set(zoo_names())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_total_params_match_published(name):
    spec = load_spec(name)
    assert spec.total_params / 1e9 == pytest.approx(PUBLISHED[name], rel=0.01)


@pytest.mark.parametrize("name", sorted(ACTIVE))
def test_active_params_match_published(name):
    assert load_spec(name).active_params / 1e9 == pytest.approx(ACTIVE[name], rel=0.03)


def test_mixtral_blocks_and_bytes():
    spec = load_spec("mixtral-8x7b")
    experts = [b for b in spec.blocks() if b.kind == "expert"]
    assert len(experts) == 32 * 8
    assert experts[0].rows == 14336 and experts[0].params == 3 * 4096 * 14336
    assert spec.total_bytes == 2 * spec.total_params  # bf16
    assert spec.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2
    names = spec.tensors()
    assert names["model.layers.3.block_sparse_moe.experts.5.w2.weight"] == (4096, 14336)
    assert names["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)


def test_qwen_dense_layers_and_shared_expert():
    cfg = json.loads((resolve_model("qwen1.5-moe-a2.7b") / "config.json").read_text())
    cfg.update(mlp_only_layers=[0], decoder_sparse_step=2, num_hidden_layers=4)
    spec = ModelSpec.from_config(cfg)
    assert [spec.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    kinds = {b.kind for b in spec.layer_blocks(1)}
    assert {"shared_expert", "shared_gate", "router", "expert"} <= kinds
    assert "ffn" in {b.kind for b in spec.layer_blocks(0)}
    assert "model.layers.1.self_attn.q_proj.bias" in spec.tensors()


def test_phimoe_layernorm_and_biases():
    spec = load_spec("phi-3.5-moe")
    t = spec.tensors()
    assert spec.norm_kind == "layer" and spec.router == "sparsemixer"
    for name in ("model.layers.0.input_layernorm.bias", "model.norm.bias", "lm_head.bias",
                 "model.layers.0.self_attn.o_proj.bias"):
        assert name in t


# ---- bad input ---------------------------------------------------------------------------------

def write_cfg(tmp_path, **cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


BASE = dict(model_type="mixtral", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ModelSpec.from_file(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="mixtral-8x7b"):
        resolve_model(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelSpec.from_file(tmp_path)


def test_unsupported_architecture_lists_supported(tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*mixtral, llama, qwen2_moe, phimoe"):
        ModelSpec.from_file(write_cfg(tmp_path, **(BASE | {"model_type": "gpt2"})))


@pytest.mark.parametrize("field", ["hidden_size", "num_local_experts", "vocab_size"])
def test_missing_required_field_is_named(tmp_path, field):
    cfg = {k: v for k, v in BASE.items() if k != field}
    with pytest.raises(ConfigError, match=f"missing the required field '{field}'"):
        ModelSpec.from_file(write_cfg(tmp_path, **cfg))


def test_bad_field_values(tmp_path):
    with pytest.raises(ConfigError, match="'num_hidden_layers' must be an integer"):
        ModelSpec.from_config(BASE | {"num_hidden_layers": "two"})
    with pytest.raises(ConfigError, match="exceeds the number of experts"):
        ModelSpec.from_config(BASE | {"num_experts_per_tok": 5})
    with pytest.raises(ConfigError, match="hidden_act 'gelu'"):
        ModelSpec.from_config(BASE | {"hidden_act": "gelu"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        ModelSpec.from_file(tmp_path)


def test_unsupported_dtype():
    with pytest.raises(DTypeError, match="unsupported dtype 'int8'"):
        ModelSpec.from_config(BASE | {"torch_dtype": "int8"})
    assert normalize_dtype("torch.bfloat16") == "bfloat16"


def test_rope_layouts_agree():
    old = ModelSpec.from_config(BASE | {"rope_theta": 5e5})
    new = ModelSpec.from_config(BASE | {"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
    assert old.rope == new.rope
    with pytest.raises(ConfigError, match="rope scaling 'yarn'"):
        ModelSpec.from_config(BASE | {"rope_scaling": {"type": "yarn", "factor": 2.0}})
