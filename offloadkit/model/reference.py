"""The reference forward: plain PyTorch, the oracle every offloadkit executor is checked against.

docs/DESIGN.md section 10: every plan the engine runs must give the logits of this module, and this
module must give the logits of Hugging Face transformers (5.23) for each supported architecture:
Mixtral, LLaMA, Qwen2-MoE and PhiMoE. It is written functionally over a mapping of weights by their
Hub names (``spec.tensors()``), one readable function per part of a decoder layer, so that the engine
can reuse the same math (:mod:`offloadkit.model.moe`, :mod:`offloadkit.model.rope`) on its slices.

Weights may be stored bf16 / f16 / f32, possibly as zero-copy views of a memory map. They are widened
to ``compute_dtype`` (f32 by default) *at use*, one tensor at a time; the model is never converted up
front. With f32 weights that require grad the forward is differentiable (no in-place ops, no
``no_grad``), which is how the demo model is trained.

What it refuses to be: fast (it loops over experts and widens weights on every call), a training
framework (no dropout, no router jitter, no aux loss), or a server (no padding masks: a batch holds
sequences of equal length, all at the same position).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from offloadkit.errors import CheckpointError, OffloadkitError
from offloadkit.model.moe import dispatch_experts, route_softmax_topk, route_sparsemixer, swiglu
from offloadkit.model.rope import apply_rope, rotary_tables
from offloadkit.model.spec import ModelSpec


class KVCache:
    """Keys and values of every layer, ``[B, n_kv_heads, positions, head_dim]`` each, after RoPE.

    Preallocated to ``max_len`` positions (none if not given) and doubled whenever a call goes past
    the end. ``length`` counts the positions every layer holds; the model advances it once per forward,
    after all layers have written. Writes are in place, so gradients do not flow across cached calls
    (training runs without a cache).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.batch, self.n_kv_heads, self.head_dim = batch, n_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.length = 0
        self.k = [self._zeros(max_len or 0) for _ in range(n_layers)]
        self.v = [self._zeros(max_len or 0) for _ in range(n_layers)]

    def _zeros(self, n: int) -> torch.Tensor:
        return torch.zeros(self.batch, self.n_kv_heads, n, self.head_dim, dtype=self.dtype, device=self.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` [B, kv, T, D] at positions ``[length, length + T)`` of ``layer``; return the
        keys and values of positions ``[0, length + T)``."""
        if k.shape[0] != self.batch:
            raise OffloadkitError(f"the cache holds a batch of {self.batch}, the input has {k.shape[0]}")
        start, end = self.length, self.length + k.shape[2]
        capacity = self.k[layer].shape[2]
        if end > capacity:
            pad = self._zeros(max(end, 2 * capacity) - capacity)
            self.k[layer] = torch.cat((self.k[layer], pad), dim=2)
            self.v[layer] = torch.cat((self.v[layer], pad), dim=2)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


# ---- the parts of a layer, as functions ------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                     sliding_window: int | None = None) -> torch.Tensor:
    """Softmax attention of queries at positions ``[q_start, q_start + T)`` over keys ``[0, S)``.

    ``q`` [B, H, T, D]; ``k``, ``v`` [B, KV, S, D] with H a multiple of KV (grouped-query attention:
    query head h reads KV head h // (H / KV)). A query at position p sees keys at positions s with
    ``s <= p`` and, given a window W, ``s > p - W`` (transformers' sliding-window mask).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    q_pos = torch.arange(q_start, q_start + q.shape[2], device=q.device)[:, None]
    k_pos = torch.arange(k.shape[2], device=q.device)[None, :]
    visible = k_pos <= q_pos
    if sliding_window is not None:
        visible = visible & (k_pos > q_pos - sliding_window)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def apply_norm(spec: ModelSpec, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The model's norm (RMSNorm, or PhiMoE's LayerNorm with ``bias``) over the last dimension, in ``x.dtype``."""
    if spec.norm_kind == "layer":
        return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), spec.norm_eps)
    return rms_norm(x, weight, spec.norm_eps)


def route_logits(spec: ModelSpec, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's routing rule on router ``logits`` [N, E] -> (weights f32 [N, k], experts [N, k])."""
    if spec.router == "sparsemixer":
        return route_sparsemixer(logits, spec.router_jitter_eps)
    return route_softmax_topk(logits, spec.top_k, spec.norm_topk_prob)


class ReferenceModel:
    """A decoder-only transformer of any supported architecture, run over a mapping of weights."""

    engine_name = "reference"

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor],
                 compute_dtype: torch.dtype = torch.float32) -> None:
        self.spec, self.weights, self.compute_dtype = spec, weights, compute_dtype
        self._names = spec.tensors()
        missing = [n for n in self._names if n not in weights]
        if missing:
            raise CheckpointError(f"the weights lack {len(missing)} tensor(s) the config calls for, e.g. "
                                  f"{', '.join(missing[:3])}: is this the checkpoint of that config?")
        for name, shape in self._names.items():  # shapes only: views of a memory map stay unread
            if tuple(weights[name].shape) != tuple(shape):
                raise CheckpointError(f"tensor {name} has shape {tuple(weights[name].shape)}, "
                                      f"the config says {tuple(shape)}")
        self.device = weights["model.embed_tokens.weight"].device

    # ---- weights -----------------------------------------------------------------------------------

    def w(self, name: str) -> torch.Tensor:
        """Weight ``name`` widened to the compute dtype (a no-op for f32 weights, so grads flow)."""
        return self.weights[name].to(dtype=self.compute_dtype)

    def bias(self, name: str) -> torch.Tensor | None:
        return self.w(name) if name in self._names else None

    def linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.linear(x, self.w(f"{prefix}.weight"), self.bias(f"{prefix}.bias"))

    def norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        bias = self.w(f"{prefix}.bias") if self.spec.norm_kind == "layer" else None
        return apply_norm(self.spec, x, self.w(f"{prefix}.weight"), bias)

    # ---- layers ------------------------------------------------------------------------------------

    def attn_qkv(self, layer: int, x: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The QKV projections of layer ``layer`` with RoPE applied: q [B, heads, T, D], k and v [B, kv, T, D]."""
        s, p = self.spec, f"model.layers.{layer}.self_attn"
        b, t, _ = x.shape
        q = self.linear(x, f"{p}.q_proj").view(b, t, s.n_heads, s.head_dim).transpose(1, 2)
        k = self.linear(x, f"{p}.k_proj").view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = self.linear(x, f"{p}.v_proj").view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attention_core(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                       cache: KVCache | None) -> torch.Tensor:
        """Append k, v to the cache and attend: the heads' outputs concatenated, [B, T, heads * D]."""
        if cache is not None:
            k, v = cache.update(layer, k, v)
        b, _, t, _ = q.shape
        o = causal_attention(q, k, v, start, self.spec.sliding_window)
        return o.transpose(1, 2).reshape(b, t, self.spec.n_heads * self.spec.head_dim)

    def attn_o(self, layer: int, o: torch.Tensor) -> torch.Tensor:
        """The output projection of layer ``layer``."""
        return self.linear(o, f"model.layers.{layer}.self_attn.o_proj")

    def attention(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                  cache: KVCache | None) -> torch.Tensor:
        """Self-attention of layer ``layer`` for ``x`` [B, T, H] at positions ``[start, start + T)``.

        Three parts, as the engine places them (docs/DESIGN.md section 3): the QKV projections, the
        attention core over the KV cache, and the O projection.
        """
        q, k, v = self.attn_qkv(layer, x, cos, sin)
        return self.attn_o(layer, self.attention_core(layer, q, k, v, start, cache))

    def dense_ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{layer}.mlp"
        return swiglu(x, *(self.weights[f"{p}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")))

    def expert(self, layer: int, e: int, x: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Expert ``e`` of MoE layer ``layer`` on rows ``x`` [n, H], optionally over intermediate rows only."""
        p = f"{self.spec.moe_prefix(layer)}.experts.{e}"
        return swiglu(x, *(self.weights[f"{p}.{n}.weight"] for n in self.spec.expert_names()), rows=rows)

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router of MoE layer ``layer``: ``x`` [N, H] -> (weights [N, k], experts [N, k])."""
        return route_logits(self.spec, F.linear(x, self.w(f"{self.spec.moe_prefix(layer)}.gate.weight")))

    def moe_ffn(self, layer: int, x: torch.Tensor, routing: dict | None = None) -> torch.Tensor:
        """The MoE block of layer ``layer`` on ``x`` [N, H]: routed experts plus Qwen's gated shared expert."""
        weights, experts = self.route(layer, x)
        if routing is not None:
            routing[layer] = experts.detach()
        out = dispatch_experts(x, experts, weights, lambda e, xe: self.expert(layer, e, xe))
        if self.spec.shared_expert_intermediate_size:
            m = self.spec.moe_prefix(layer)
            shared = swiglu(x, *(self.weights[f"{m}.shared_expert.{n}.weight"]
                                 for n in ("gate_proj", "up_proj", "down_proj")))
            out = out + torch.sigmoid(F.linear(x, self.w(f"{m}.shared_expert_gate.weight"))) * shared
        return out

    def decoder_layer(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                      cache: KVCache | None, routing: dict | None) -> torch.Tensor:
        p = f"model.layers.{layer}"
        h = h + self.attention(layer, self.norm(h, f"{p}.input_layernorm"), cos, sin, start, cache)
        x = self.norm(h, f"{p}.post_attention_layernorm")
        if self.spec.is_moe_layer(layer):
            b, t, d = x.shape
            return h + self.moe_ffn(layer, x.reshape(b * t, d), routing).view(b, t, d)
        return h + self.dense_ffn(layer, x)

    # ---- the model ---------------------------------------------------------------------------------

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        s = self.spec
        return KVCache(s.n_layers, batch, s.n_kv_heads, s.head_dim, max_len, self.compute_dtype, self.device)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *,
                routing: dict | None = None) -> torch.Tensor:
        """Logits f32 [B, T, V] for ``input_ids`` [B, T].

        With a ``cache`` the tokens sit at positions ``[cache.length, cache.length + T)`` and their keys
        and values are appended (prefill, then one token per decode step); without one this is a
        plain causal forward from position 0. ``routing``, if a dict, receives
        ``{layer: experts [B*T, top_k]}`` for every MoE layer.
        """
        if input_ids.dim() != 2:
            raise OffloadkitError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + t, device=self.device)
        cos, sin = rotary_tables(self.spec, positions, self.compute_dtype)
        h = F.embedding(input_ids.to(self.device), self.weights["model.embed_tokens.weight"])
        h = h.to(self.compute_dtype)  # only the rows of these tokens are widened
        for layer in range(self.spec.n_layers):
            h = self.decoder_layer(layer, h, cos, sin, start, cache, routing)
        if cache is not None:
            cache.advance(t)
        h = self.norm(h, "model.norm")
        head = "model.embed_tokens" if self.spec.tie_word_embeddings else "lm_head"
        logits = F.linear(h, self.w(f"{head}.weight"), self.bias("lm_head.bias"))
        return logits.float()

    __call__ = forward

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, max_len: int | None = None) -> tuple[torch.Tensor, KVCache]:
        """A fresh cache filled with ``input_ids`` [B, T]; returns (logits of the last token [B, V], cache)."""
        cache = self.new_cache(input_ids.shape[0], max_len)
        return self.forward(input_ids, cache)[:, -1], cache

    @torch.no_grad()
    def decode(self, token_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step: ``token_ids`` [B] -> logits of the next token [B, V]."""
        return self.forward(token_ids.reshape(-1, 1), cache)[:, -1]

    @torch.no_grad()
    def greedy(self, input_ids: torch.Tensor, n_new: int) -> torch.Tensor:
        """Greedy continuation of ``input_ids`` [B, T]: the ``n_new`` chosen tokens [B, n_new]."""
        logits, cache = self.prefill(input_ids, input_ids.shape[1] + n_new)
        out = []
        for _ in range(n_new):
            out.append(logits.argmax(-1))
            if len(out) < n_new:
                logits = self.decode(out[-1], cache)
        return torch.stack(out, dim=1) if out else input_ids.new_zeros(input_ids.shape[0], 0)


__all__ = ["KVCache", "ReferenceModel", "apply_norm", "causal_attention", "rms_norm", "route_logits"]
