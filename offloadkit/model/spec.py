"""``ModelSpec``: what a model *is*, read from a Hugging Face ``config.json``.

Everything in offloadkit that reasons about a model without its weights (the partitioner, the cost
model, the simulator, ``offloadkit info``) works from a :class:`ModelSpec`. It knows the four
architectures the paper evaluates (Mixtral, LLaMA-2, Qwen-MoE, PhiMoE), every weight tensor by its
Hugging Face name and shape, and groups those tensors into **blocks**: the units that the engine
places on the CPU or the GPU and splits into CC / CG / GG row slices.

It refuses configs it does not fully understand: an unknown ``model_type``, a missing field, or a
feature (an activation other than SiLU, a rope scaling it does not implement) raise
:class:`~offloadkit.errors.ConfigError` with a message naming the field, instead of computing
something subtly different from what transformers computes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from offloadkit.errors import ConfigError, UnsupportedArchitectureError
from offloadkit.model.config import RopeSpec, spec_kwargs_from_config
from offloadkit.model.dtypes import DTYPE_BYTES, normalize_dtype

Arch = Literal["mixtral", "llama", "qwen2_moe", "phimoe"]
SUPPORTED_ARCHS: tuple[str, ...] = ("mixtral", "llama", "qwen2_moe", "phimoe")

#: Block kinds, in the order they appear in a layer.
BlockKind = Literal[
    "embed", "attn_norm", "attn_qkv", "attn_o", "ffn_norm", "router", "expert",
    "shared_expert", "shared_gate", "ffn", "final_norm", "lm_head",
]


@dataclass(frozen=True)
class TensorSpec:
    """One weight tensor of the checkpoint, by its Hugging Face name."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Block:
    """A group of tensors the engine places and splits as one unit.

    ``rows`` is the dimension a block is split along into CC / CG / GG slices (docs/DESIGN.md section 3):
    the intermediate dimension of an FFN or expert, output features of QKV, input features of O,
    the vocabulary of lm_head. ``rows == 0`` marks blocks that are never split (norms, routers).
    """

    kind: str
    layer: int | None
    tensors: tuple[TensorSpec, ...]
    rows: int = 0
    expert: int | None = None

    @cached_property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @cached_property
    def name(self) -> str:
        where = "" if self.layer is None else f"L{self.layer}."
        which = "" if self.expert is None else f"{self.expert}"
        return f"{where}{self.kind}{which}"


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer of one of the supported architectures."""

    arch: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense FFN width (llama, qwen2_moe dense layers) or expert width
    norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    dtype: str = "bfloat16"
    name: str = ""
    tie_word_embeddings: bool = False
    norm_kind: str = "rms"  # "rms" or "layer" (LayerNorm with bias, PhiMoE)
    qkv_bias: bool = False
    o_bias: bool = False
    lm_head_bias: bool = False
    # Mixture of experts (n_experts == 0 for dense models).
    n_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router: str = "softmax_topk"  # or "sparsemixer" (PhiMoE)
    router_jitter_eps: float = 0.0
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    # ---- structure -------------------------------------------------------------------------

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen2-MoE keeps some layers dense (``mlp_only_layers``, ``decoder_sparse_step``)."""
        if not self.is_moe or layer in self.mlp_only_layers:
            return False
        return (layer + 1) % self.decoder_sparse_step == 0

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def bytes_per_param(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def _ffn_tensors(self, prefix: str, width: int, names: tuple[str, str, str]) -> tuple[TensorSpec, ...]:
        gate, up, down = names
        h = self.hidden_size
        return (TensorSpec(f"{prefix}.{gate}.weight", (width, h)),
                TensorSpec(f"{prefix}.{up}.weight", (width, h)),
                TensorSpec(f"{prefix}.{down}.weight", (h, width)))

    def _norm(self, name: str) -> tuple[TensorSpec, ...]:
        w = (TensorSpec(f"{name}.weight", (self.hidden_size,)),)
        return w + ((TensorSpec(f"{name}.bias", (self.hidden_size,)),) if self.norm_kind == "layer" else ())

    def moe_prefix(self, layer: int) -> str:
        """Mixtral and PhiMoE keep their experts under ``block_sparse_moe``, Qwen under ``mlp``."""
        sub = "mlp" if self.arch == "qwen2_moe" else "block_sparse_moe"
        return f"model.layers.{layer}.{sub}"

    def expert_names(self) -> tuple[str, str, str]:
        """(gate, up, down) projection names of an expert, as the Hub checkpoints spell them."""
        return ("w1", "w3", "w2") if self.arch in ("mixtral", "phimoe") else ("gate_proj", "up_proj", "down_proj")

    def layer_blocks(self, layer: int) -> Iterator[Block]:
        """The blocks of decoder layer ``layer`` in forward order (built once per spec, then reused)."""
        return iter(self._layer_block_lists[layer])

    @cached_property
    def _layer_block_lists(self) -> tuple[tuple[Block, ...], ...]:
        return tuple(tuple(self._make_layer_blocks(layer)) for layer in range(self.n_layers))

    def _make_layer_blocks(self, layer: int) -> Iterator[Block]:
        h, hd = self.hidden_size, self.head_dim
        q_out, kv_out = self.n_heads * hd, self.n_kv_heads * hd
        p = f"model.layers.{layer}"
        yield Block("attn_norm", layer, self._norm(f"{p}.input_layernorm"))
        qkv = []
        for proj, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            qkv.append(TensorSpec(f"{p}.self_attn.{proj}.weight", (out, h)))
            if self.qkv_bias:
                qkv.append(TensorSpec(f"{p}.self_attn.{proj}.bias", (out,)))
        yield Block("attn_qkv", layer, tuple(qkv), rows=q_out + 2 * kv_out)
        o = [TensorSpec(f"{p}.self_attn.o_proj.weight", (h, q_out))]
        if self.o_bias:
            o.append(TensorSpec(f"{p}.self_attn.o_proj.bias", (h,)))
        yield Block("attn_o", layer, tuple(o), rows=q_out)
        yield Block("ffn_norm", layer, self._norm(f"{p}.post_attention_layernorm"))
        if not self.is_moe_layer(layer):
            yield Block("ffn", layer, self._ffn_tensors(f"{p}.mlp", self.intermediate_size,
                                                       ("gate_proj", "up_proj", "down_proj")),
                        rows=self.intermediate_size)
            return
        m = self.moe_prefix(layer)
        yield Block("router", layer, (TensorSpec(f"{m}.gate.weight", (self.n_experts, h)),))
        width = self.expert_intermediate_size
        for e in range(self.n_experts):
            yield Block("expert", layer, self._ffn_tensors(f"{m}.experts.{e}", width, self.expert_names()),
                        rows=width, expert=e)
        if self.shared_expert_intermediate_size:
            s = self.shared_expert_intermediate_size
            yield Block("shared_expert", layer,
                        self._ffn_tensors(f"{m}.shared_expert", s, ("gate_proj", "up_proj", "down_proj")),
                        rows=s)
            yield Block("shared_gate", layer, (TensorSpec(f"{m}.shared_expert_gate.weight", (1, h)),))

    def blocks(self) -> Iterator[Block]:
        """Every block of the model in forward order."""
        v, h = self.vocab_size, self.hidden_size
        yield Block("embed", None, (TensorSpec("model.embed_tokens.weight", (v, h)),))
        for layer in range(self.n_layers):
            yield from self.layer_blocks(layer)
        yield Block("final_norm", None, self._norm("model.norm"))
        if not self.tie_word_embeddings:
            head = [TensorSpec("lm_head.weight", (v, h))]
            if self.lm_head_bias:
                head.append(TensorSpec("lm_head.bias", (v,)))
            yield Block("lm_head", None, tuple(head), rows=v)
        elif self.lm_head_bias:
            yield Block("lm_head", None, (TensorSpec("lm_head.bias", (v,)),), rows=v)

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor a checkpoint of this model must hold."""
        return {t.name: t.shape for b in self.blocks() for t in b.tensors}

    # ---- counting ----------------------------------------------------------------------------

    def params_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.blocks():
            out[b.kind] = out.get(b.kind, 0) + b.params
        return out

    @property
    def total_params(self) -> int:
        return sum(b.params for b in self.blocks())

    def active_params_by_kind(self) -> dict[str, int]:
        """Parameters a token uses: all blocks, but only ``top_k`` of each layer's experts.

        Follows the convention of the published "active parameter" figures (Mixtral-8x7B:
        12.9 B), which count the embedding table and lm_head in full.
        """
        out = self.params_by_kind()
        if self.is_moe:
            n_moe = sum(self.is_moe_layer(layer) for layer in range(self.n_layers))
            per_expert = 3 * self.hidden_size * self.expert_intermediate_size
            out["expert"] = n_moe * self.top_k * per_expert
        return out

    @property
    def active_params(self) -> int:
        return sum(self.active_params_by_kind().values())

    def bytes_of(self, params: int, dtype: str | None = None) -> int:
        return params * DTYPE_BYTES[normalize_dtype(dtype) if dtype else self.dtype]

    @property
    def total_bytes(self) -> int:
        return self.bytes_of(self.total_params)

    def kv_bytes_per_token(self, dtype: str | None = None) -> int:
        """KV-cache bytes one token adds (all layers, K and V)."""
        return self.bytes_of(2 * self.n_layers * self.n_kv_heads * self.head_dim, dtype)

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: str = "") -> ModelSpec:
        """Build a spec from a parsed ``config.json``."""
        return cls(**spec_kwargs_from_config(config, name))

    @classmethod
    def from_file(cls, path: str | Path) -> ModelSpec:
        """Build a spec from a ``config.json`` file or a folder holding one."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            where = p.parent if p.name == "config.json" else p
            if not where.exists():
                raise ConfigError(f"{where} does not exist")
            raise ConfigError(f"no config.json in {where}: a model folder needs the config.json of a "
                              f"Hugging Face checkpoint")
        try:
            config = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {p}: {e}") from e
        if not isinstance(config, dict):
            raise ConfigError(f"{p} does not hold a JSON object")
        return cls.from_config(config, name=p.parent.name)


__all__ = [
    "SUPPORTED_ARCHS", "Block", "ModelSpec", "RopeSpec", "TensorSpec", "UnsupportedArchitectureError",
    "normalize_dtype",
]
