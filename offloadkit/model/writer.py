"""Write checkpoints in the Hugging Face Hub layout: small random models, and trained ones.

Every test, notebook and benchmark that needs a model without downloading 90 GB makes one here:
``make_config("mixtral", layers=2, hidden=64)`` returns a complete ``config.json`` dict that both
offloadkit and transformers read, and ``write_checkpoint(dir, config)`` writes ``config.json``,
``model.safetensors`` (or shards and ``model.safetensors.index.json``), ``generation_config.json``,
``tokenizer.json`` and ``tokenizer_config.json``. ``transformers.AutoModelForCausalLM.from_pretrained``
loads the result, which is what lets the reference forward be checked against transformers.

Random weights are a pure function of ``(seed, tensor name, shape)``, drawn in float32 and rounded to
the target dtype, so a bf16 and an f32 checkpoint of one seed hold the same numbers up to rounding,
and adding layers does not change the existing ones. Scales keep activations near unit size:
linear weights ~ N(0, 1/fan_in), norms ~ 1, biases small, and router weights ``ROUTER_GAIN`` times
larger so that expert choices are decisive (not flipped by bf16 rounding). Trained weights (the demo
model's training script) go through the same path, one tensor at a time.

It refuses weights that miss a tensor of the spec, have a wrong shape, or carry tensors the spec does
not name (a sign that names or config are wrong); it never writes pickles.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import tokenizers
import torch

from offloadkit.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from offloadkit.model.checkpoint import INDEX_FILE, SINGLE_FILE, is_ignorable
from offloadkit.model.dtypes import normalize_dtype
from offloadkit.model.safetensors_io import write_safetensors
from offloadkit.model.spec import ModelSpec
from offloadkit.model.tokenizer import Tokenizer, byte_level_tokenizer

ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "llama": "LlamaForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "phimoe": "PhimoeForCausalLM"}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ROUTER_GAIN = 4.0  # router logits ~ N(0, 4^2): top-k choices with wide margins
BOS_ID, EOS_ID = 1, 2  # the byte-level tokenizer's <s> and </s>

# ---- configs -------------------------------------------------------------------------------------


def make_config(arch: str, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                experts: int = 4, top_k: int = 2, intermediate: int | None = None, vocab: int = 512,
                dtype: str = "bfloat16", **overrides: Any) -> dict[str, Any]:
    """A complete ``config.json`` dict of a small model of ``arch``.

    ``intermediate`` (default ``2 * hidden``) is the FFN width of llama and the expert width of the
    MoE models; Qwen-MoE's dense and shared-expert FFNs get twice that. ``overrides`` are raw
    config.json keys (``tie_word_embeddings=True``, ``mlp_only_layers=[0]``...) applied last. The result
    is checked by :class:`ModelSpec` (ConfigError if it does not describe a supported model).
    """
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(f"architecture {arch!r} is not supported; offloadkit supports "
                                           f"{', '.join(ARCHITECTURES)}")
    inter = intermediate or 2 * hidden
    theta = 10000.0 if arch == "llama" else 1e6
    dtype = normalize_dtype(dtype)
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch,
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6 if arch == "qwen2_moe" else 1e-5,
        "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
        "tie_word_embeddings": False, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "dtype": dtype,
    }
    if arch in ("mixtral", "llama"):
        cfg["head_dim"] = hidden // heads
    if arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if arch in ("mixtral", "phimoe"):
        cfg.update(num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None,
                   output_router_logits=False, router_aux_loss_coef=0.001)
    if arch == "mixtral":
        cfg["router_jitter_noise"] = 0.0
    if arch == "phimoe":  # Phi-3.5-MoE: LayerNorm, biased attention and lm_head, sparsemixer routing
        cfg.update(attention_bias=True, lm_head_bias=True, router_jitter_noise=0.01, input_jitter_noise=0.0)
    if arch == "qwen2_moe":  # Qwen1.5-MoE: shared expert with a sigmoid gate, q/k/v biases
        cfg.update(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=inter,
                   intermediate_size=2 * inter, shared_expert_intermediate_size=2 * inter,
                   norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True,
                   use_sliding_window=False, sliding_window=None, max_window_layers=layers,
                   output_router_logits=False, router_aux_loss_coef=0.001)
    cfg.update(overrides)
    ModelSpec.from_config(cfg)
    return cfg


# ---- random weights ------------------------------------------------------------------------------


def random_tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The float32 random value of tensor ``name``: a pure function of ``(seed, name, shape)``."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if name.endswith("norm.weight"):
        return 1.0 + 0.05 * x
    if name.endswith(".bias"):
        return 0.02 * x
    if name == "model.embed_tokens.weight":
        return x
    scale = 1.0 / math.sqrt(shape[-1])
    if name.endswith((".block_sparse_moe.gate.weight", ".mlp.gate.weight")):
        scale *= ROUTER_GAIN
    return x * scale


def random_weights(spec: ModelSpec, seed: int = 0, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``spec`` drawn by :func:`random_tensor`, in ``dtype`` (default: the spec's)."""
    to = TORCH_DTYPES[normalize_dtype(dtype or spec.dtype)]
    return {n: random_tensor(n, s, seed).to(to) for n, s in spec.tensors().items()}


def _check_weights(weights: Mapping[str, Any], spec: ModelSpec) -> None:
    expected = spec.tensors()
    missing = [n for n in expected if n not in weights]
    if missing:
        raise CheckpointError(f"the weights lack {len(missing)} tensor(s) of the {spec.arch} config: "
                              f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    for n, shape in expected.items():
        if tuple(weights[n].shape) != tuple(shape):
            raise CheckpointError(f"weight {n!r} has shape {tuple(weights[n].shape)}, the config expects "
                                  f"{tuple(shape)}")
    extra = [n for n in weights if n not in expected and not is_ignorable(n, spec)]
    if extra:
        raise CheckpointError(f"the weights hold {len(extra)} tensor(s) the {spec.arch} config does not "
                              f"name: {', '.join(extra[:6])}; are the names or the config wrong?")


# ---- writing -------------------------------------------------------------------------------------


def _shards(layout: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[list[Any]]:
    """Split the layout greedily, in order, into runs of at most ``max_bytes`` (a bigger tensor alone)."""
    shards: list[list[Any]] = [[]]
    size = 0
    for entry in layout:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _resolve_tokenizer(tokenizer: Any, spec: ModelSpec) -> tokenizers.Tokenizer:
    tok = tokenizer.backend if isinstance(tokenizer, Tokenizer) else tokenizer
    if tok is None:
        return byte_level_tokenizer(spec.vocab_size)
    if not isinstance(tok, tokenizers.Tokenizer):
        raise ConfigError(f"tokenizer must be a tokenizers.Tokenizer or an offloadkit Tokenizer, "
                          f"not {type(tok).__name__}")
    if tok.get_vocab_size(with_added_tokens=True) > spec.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens but the "
                          f"model's vocab_size is {spec.vocab_size}")
    return tok


def _write_tokenizer(out: Path, tok: tokenizers.Tokenizer, spec: ModelSpec) -> None:
    """tokenizer.json, and tokenizer_config.json naming the special tokens of the config's ids."""
    tok.save(str(out / "tokenizer.json"))
    bos, eos = spec.bos_token_id, spec.eos_token_id
    tok_cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bos is not None,
                               "add_eos_token": False, "clean_up_tokenization_spaces": False,
                               "model_max_length": spec.max_position_embeddings}
    named = {"bos_token": tok.id_to_token(bos) if bos is not None else None,
             "eos_token": tok.id_to_token(eos[0]) if eos else None,
             "unk_token": "<unk>" if tok.token_to_id("<unk>") is not None else None}
    tok_cfg.update({k: v for k, v in named.items() if v is not None})
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


def write_checkpoint(out_dir: str | Path, config: Mapping[str, Any],
                     weights: Mapping[str, torch.Tensor] | None = None, *, seed: int = 0,
                     dtype: str | None = None, max_shard_bytes: int | None = None,
                     tokenizer: Any = None) -> Path:
    """Write a model folder in the Hub layout; returns its path.

    ``weights`` (any mapping, a :class:`Checkpoint` included) must hold every tensor of the config's
    spec; ``None`` draws them from ``seed``. ``dtype`` overrides the config's dtype (the config
    written says so). ``max_shard_bytes`` writes ``model-0000i-of-0000n.safetensors`` shards and an
    index instead of one file. ``tokenizer`` is a ``tokenizers.Tokenizer`` or an offloadkit
    :class:`Tokenizer`; ``None`` writes :func:`byte_level_tokenizer` for the config's vocabulary.
    Weight files of an earlier write in ``out_dir`` are removed first, so that readers (who prefer
    ``model.safetensors`` or the index) cannot pick stale ones.
    """
    out = Path(out_dir)
    config = dict(config)
    config["dtype"] = normalize_dtype(dtype or config.get("dtype") or config.get("torch_dtype") or "float32")
    config.pop("torch_dtype", None)
    spec = ModelSpec.from_config(config, name=out.name)
    tok = _resolve_tokenizer(tokenizer, spec)
    to = TORCH_DTYPES[spec.dtype]
    layout = [(n, to, s) for n, s in spec.tensors().items()]
    produce: Callable[[str], torch.Tensor]
    if weights is None:
        shapes = spec.tensors()
        produce = lambda n: random_tensor(n, shapes[n], seed).to(to)
    else:
        _check_weights(weights, spec)
        produce = lambda n: torch.as_tensor(weights[n]).detach().to(device="cpu", dtype=to)

    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors"),
                  *out.glob("*.safetensors.partial")]:
        stale.unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if max_shard_bytes is None:
        write_safetensors(out / SINGLE_FILE, layout, produce)
    else:
        shards = _shards(layout, max_shard_bytes)
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / fname, shard, produce)
            weight_map.update({name: fname for name, _, _ in shard})
        index = {"metadata": {"total_size": sum(math.prod(s) * to.itemsize for _, _, s in layout),
                              "total_parameters": spec.total_params},
                 "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    gen = {"_from_model_config": True, "bos_token_id": config.get("bos_token_id"),
           "eos_token_id": config.get("eos_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    _write_tokenizer(out, tok, spec)
    return out


__all__ = ["ARCHITECTURES", "ROUTER_GAIN", "make_config", "random_tensor", "random_weights", "write_checkpoint"]
