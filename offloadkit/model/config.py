"""Reading a Hugging Face ``config.json`` into the fields of a :class:`ModelSpec`.

Published configs come in two layouts: the old one (``rope_theta`` + ``rope_scaling``, written by
transformers 4.x and found on the Hub) and the new one (``rope_parameters``, written by
transformers 5). Both are accepted. Fields that change the numerics must be present or have the same
default transformers gives them; anything offloadkit does not implement is refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from offloadkit.errors import ConfigError, UnsupportedArchitectureError
from offloadkit.model.dtypes import normalize_dtype

SUPPORTED = ("mixtral", "llama", "qwen2_moe", "phimoe")
ROPE_TYPES = ("default", "linear", "llama3", "longrope")

#: Fields every supported config must carry.
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
REQUIRED_MOE = {
    "mixtral": ("num_local_experts", "num_experts_per_tok"),
    "phimoe": ("num_local_experts", "num_experts_per_tok"),
    "qwen2_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "llama": (),
}
#: transformers' defaults for fields a published config may leave out.
DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32, "rope_theta": 1e6},
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0},
    "qwen2_moe": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10000.0,
                  "shared_expert_intermediate_size": 5632, "norm_topk_prob": False,
                  "decoder_sparse_step": 1, "qkv_bias": True},
    "phimoe": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32, "rope_theta": 1e6,
               "router_jitter_noise": 0.01},
}


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters, normalized from either the old (``rope_theta`` +
    ``rope_scaling``) or the new (``rope_parameters``) config layout."""

    theta: float
    rope_type: str = "default"
    params: Mapping[str, Any] = field(default_factory=dict)


def _get(cfg: Mapping[str, Any], key: str, arch: str, name: str) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if key in DEFAULTS[arch]:
        return DEFAULTS[arch][key]
    raise ConfigError(f"config of {name or 'the model'} ({arch}) is missing the required field {key!r}")


def _int(cfg: Mapping[str, Any], key: str, arch: str, name: str, minimum: int = 1) -> int:
    v = _get(cfg, key, arch, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"config field {key!r} must be an integer >= {minimum}, found {v!r}")
    return v


def _rope(cfg: Mapping[str, Any], arch: str, name: str) -> dict[str, Any]:
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    params.update(scaling)
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or DEFAULTS[arch]["rope_theta"]
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope scaling {rope_type!r} of {name or 'the model'} is not supported "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    if rope_type in ("llama3", "longrope"):
        # As transformers' standardize_rope_params: a top-level field (Phi-3 / PhiMoE configs) wins over
        # the one in rope_scaling; without either, the pretraining length is max_position_embeddings.
        if cfg.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        elif "original_max_position_embeddings" not in params:
            params["original_max_position_embeddings"] = _get(cfg, "max_position_embeddings", arch, name)
    return {"rope": RopeSpec(theta=float(theta), rope_type=rope_type, params=params)}


def spec_kwargs_from_config(cfg: Mapping[str, Any], name: str = "") -> dict[str, Any]:
    """The keyword arguments of :class:`ModelSpec` for a parsed ``config.json``."""
    arch = cfg.get("model_type")
    if arch is None:
        raise ConfigError(f"config of {name or 'the model'} has no 'model_type' field; offloadkit "
                          f"supports {', '.join(SUPPORTED)}")
    if arch not in SUPPORTED:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported; offloadkit supports {', '.join(SUPPORTED)}")
    for key in REQUIRED + REQUIRED_MOE[arch]:
        _get(cfg, key, arch, name)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (offloadkit implements SwiGLU with silu)")
    if arch == "llama" and cfg.get("mlp_bias"):
        raise ConfigError("llama configs with mlp_bias=true are not supported")

    n_heads = _int(cfg, "num_attention_heads", arch, name)
    n_kv = cfg.get("num_key_value_heads") or n_heads
    hidden = _int(cfg, "hidden_size", arch, name)
    head_dim = cfg.get("head_dim") or hidden // n_heads
    if n_heads % n_kv:
        raise ConfigError(f"num_attention_heads ({n_heads}) must be a multiple of num_key_value_heads ({n_kv})")
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))

    kw: dict[str, Any] = dict(
        arch=arch, name=name,
        vocab_size=_int(cfg, "vocab_size", arch, name),
        hidden_size=hidden,
        n_layers=_int(cfg, "num_hidden_layers", arch, name),
        n_heads=n_heads, n_kv_heads=int(n_kv), head_dim=int(head_dim),
        intermediate_size=_int(cfg, "intermediate_size", arch, name),
        norm_eps=float(_get(cfg, "rms_norm_eps", arch, name)),
        max_position_embeddings=_int(cfg, "max_position_embeddings", arch, name),
        dtype=normalize_dtype(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos_ids,
        **_rope(cfg, arch, name),
    )
    if arch == "llama":
        kw.update(qkv_bias=bool(cfg.get("attention_bias", False)), o_bias=bool(cfg.get("attention_bias", False)))
    if arch in ("mixtral", "phimoe"):
        kw.update(n_experts=_int(cfg, "num_local_experts", arch, name),
                  top_k=_int(cfg, "num_experts_per_tok", arch, name), norm_topk_prob=True)
        kw["sliding_window"] = cfg.get("sliding_window")
    if arch == "phimoe":
        if kw["top_k"] != 2:
            raise ConfigError(f"PhiMoE's sparsemixer routing is defined for top-2 only, config asks top-{kw['top_k']}")
        bias = bool(cfg.get("attention_bias", False))
        kw.update(norm_kind="layer", qkv_bias=bias, o_bias=bias, lm_head_bias=bool(cfg.get("lm_head_bias", False)),
                  router="sparsemixer", router_jitter_eps=float(_get(cfg, "router_jitter_noise", arch, name)))
    if arch == "qwen2_moe":
        mlp_only = cfg.get("mlp_only_layers") or []
        kw.update(n_experts=_int(cfg, "num_experts", arch, name),
                  top_k=_int(cfg, "num_experts_per_tok", arch, name),
                  moe_intermediate_size=_int(cfg, "moe_intermediate_size", arch, name),
                  shared_expert_intermediate_size=_int(cfg, "shared_expert_intermediate_size", arch, name, 0),
                  norm_topk_prob=bool(_get(cfg, "norm_topk_prob", arch, name)),
                  decoder_sparse_step=_int(cfg, "decoder_sparse_step", arch, name),
                  mlp_only_layers=tuple(int(i) for i in mlp_only),
                  qkv_bias=bool(_get(cfg, "qkv_bias", arch, name)))
        if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or ()):
            # transformers applies Qwen2-MoE's window to some layers only (layer_types); a ModelSpec has
            # one window for all layers, so refuse rather than compute something different.
            raise ConfigError("qwen2_moe configs with use_sliding_window=true (per-layer sliding attention) "
                              "are not supported; the published Qwen-MoE checkpoints do not use it")
    if kw.get("top_k", 0) > kw.get("n_experts", 0):
        raise ConfigError(f"num_experts_per_tok ({kw['top_k']}) exceeds the number of experts ({kw['n_experts']})")
    return kw
