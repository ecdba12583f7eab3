"""Run a step's task graph on real tensors, to prove that a plan computes what the model computes.

The simulator with numerics (docs/DESIGN.md section 9) hands every task, as it is issued, to
:class:`NumericsExecutor`, which does that task's share of the math with the reference model's own
per-part functions (``norm``, ``route``, ``expert(..., rows=...)``, RoPE, ``causal_attention``) on the
CPU: a QKV slice fills its output columns, an O slice or an expert slice adds its partial sum, an
lm_head slice fills its vocabulary columns. Copies move nothing (every tensor is on the host); that
they are *in the graph* where a value crosses devices is checked separately, on the schedule, by
:func:`~offloadkit.runtime.tasks.check_dataflow`.

The result must equal :meth:`ReferenceModel.forward` (docs/DESIGN.md section 10). The router runs for
real, so the experts that get tasks are the ones the model picks (the builder asks
:meth:`expert_counts` after the router task). This is for tiny models: it refuses nothing, and it is
not fast (it is the reference's math, sliced).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offloadkit.model.moe import swiglu
from offloadkit.model.reference import KVCache, ReferenceModel
from offloadkit.model.rope import apply_rope, rotary_tables
from offloadkit.runtime.tasks import Task


class NumericsExecutor:
    """Holds one generation's state (KV cache, the step's values) and runs tasks in issue order."""

    def __init__(self, model: ReferenceModel, batch: int, max_len: int) -> None:
        self.model, self.spec = model, model.spec
        self.cache: KVCache = model.new_cache(batch, max_len)
        self.v: dict[str, torch.Tensor] = {}

    # ---- steps -------------------------------------------------------------------------------------

    def begin_step(self, ids: torch.Tensor) -> None:
        """``ids`` [B, T]: the tokens of this step, at positions ``[cache.length, cache.length + T)``."""
        self.ids = ids
        self.b, self.t = ids.shape
        self.start = self.cache.length
        pos = torch.arange(self.start, self.start + self.t)
        self.cos, self.sin = rotary_tables(self.spec, pos, self.model.compute_dtype)
        self.v = {}

    def end_step(self) -> torch.Tensor:
        """Advance the cache; the logits of each sequence's last position [B, V]."""
        self.cache.advance(self.t)
        return self.v["logits"].float()

    def expert_counts(self, layer: int) -> list[int]:
        """Tokens per expert that the router of ``layer`` chose in this step."""
        experts = self.v[f"L{layer}.experts"]
        return torch.bincount(experts.flatten(), minlength=self.spec.n_experts).tolist()

    # ---- tasks -------------------------------------------------------------------------------------

    def run(self, task: Task) -> None:
        if task.lane in ("h2d", "d2h"):
            return  # copies move bytes, not values: all tensors live on the host here
        getattr(self, f"_{task.kind}")(task)

    def _host_step(self, task: Task) -> None:
        """The CPU engine's work outside any task (``host_*`` tasks of a measured profile): no values."""

    _host_layer = _host_moe_layer = _host_step

    def _acc(self, key: str, value: torch.Tensor) -> None:
        self.v[key] = self.v[key] + value if key in self.v else value

    def _embed(self, task: Task) -> None:
        w = self.model.weights["model.embed_tokens.weight"]
        self.v["h"] = F.embedding(self.ids.reshape(-1), w).to(self.model.compute_dtype)

    def _add_norm(self, residual: str, delta: str | None, prefix: str) -> tuple[torch.Tensor, ...]:
        """The fused residual add and norm: ``h = residual + delta``; returns ``(h, norm(h))``."""
        h = self.v[residual] if delta is None else self.v[residual] + self.v[delta]
        return h, self.model.norm(h, prefix)

    def _attn_norm(self, task: Task) -> None:
        layer = task.layer
        prev = "h" if layer == 0 else f"L{layer - 1}.hm"
        h, x = self._add_norm(prev, None if layer == 0 else f"L{layer - 1}.y",
                              f"model.layers.{layer}.input_layernorm")
        self.v[f"L{layer}.h"], self.v[f"L{layer}.xa"] = h, x

    def _ffn_norm(self, task: Task) -> None:
        layer = task.layer
        h, x = self._add_norm(f"L{layer}.h", f"L{layer}.ao", f"model.layers.{layer}.post_attention_layernorm")
        self.v[f"L{layer}.hm"], self.v[f"L{layer}.xf"] = h, x

    def _attn_qkv(self, task: Task) -> None:
        s, layer = self.spec, task.layer
        r0, r1 = task.rows
        x = self.v[f"L{layer}.xa"]
        key = f"L{layer}.qkv"
        if key not in self.v:
            self.v[key] = x.new_zeros(x.shape[0], s.n_heads * s.head_dim + 2 * s.n_kv_heads * s.head_dim)
        off = 0
        for proj, size in (("q_proj", s.n_heads * s.head_dim), ("k_proj", s.n_kv_heads * s.head_dim),
                           ("v_proj", s.n_kv_heads * s.head_dim)):
            a, b = max(r0, off), min(r1, off + size)
            if a < b:
                p = f"model.layers.{layer}.self_attn.{proj}"
                bias = self.model.bias(f"{p}.bias")
                self.v[key][:, a:b] = F.linear(x, self.model.w(f"{p}.weight")[a - off:b - off],
                                               None if bias is None else bias[a - off:b - off])
            off += size

    def _attention(self, task: Task) -> None:
        s, layer, b, t = self.spec, task.layer, self.b, self.t
        qkv = self.v[f"L{layer}.qkv"].view(b, t, -1)
        q_out, kv_out = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        q = qkv[..., :q_out].reshape(b, t, s.n_heads, s.head_dim).transpose(1, 2)
        k = qkv[..., q_out:q_out + kv_out].reshape(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = qkv[..., q_out + kv_out:].reshape(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        o = self.model.attention_core(layer, q, k, v, self.start, self.cache)  # the reference's core
        self.v[f"L{layer}.o"] = o.reshape(b * t, q_out)

    def _attn_o(self, task: Task) -> None:
        layer, (r0, r1) = task.layer, task.rows
        p = f"model.layers.{layer}.self_attn.o_proj"
        bias = self.model.bias(f"{p}.bias") if r0 == 0 else None
        self._acc(f"L{layer}.ao", F.linear(self.v[f"L{layer}.o"][:, r0:r1], self.model.w(f"{p}.weight")[:, r0:r1],
                                           bias))

    def _router(self, task: Task) -> None:
        weights, experts = self.model.route(task.layer, self.v[f"L{task.layer}.xf"])
        self.v[f"L{task.layer}.weights"], self.v[f"L{task.layer}.experts"] = weights, experts

    def _expert(self, task: Task) -> None:
        layer, e = task.layer, task.expert
        x, experts = self.v[f"L{layer}.xf"], self.v[f"L{layer}.experts"]
        token, slot = torch.where(experts == e)
        y = self.model.expert(layer, e, x[token], rows=task.rows)
        y = y * self.v[f"L{layer}.weights"][token, slot, None].to(x.dtype)
        key = f"L{layer}.y"
        self.v[key] = (self.v[key] if key in self.v else torch.zeros_like(x)).index_add(0, token, y)

    def _ffn_weights(self, prefix: str) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.weights[f"{prefix}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))

    def _ffn(self, task: Task) -> None:
        x = self.v[f"L{task.layer}.xf"]
        self._acc(f"L{task.layer}.y", swiglu(x, *self._ffn_weights(f"model.layers.{task.layer}.mlp"), rows=task.rows))

    def _shared_expert(self, task: Task) -> None:
        m = self.spec.moe_prefix(task.layer)
        x = self.v[f"L{task.layer}.xf"]
        self._acc(f"L{task.layer}.s", swiglu(x, *self._ffn_weights(f"{m}.shared_expert"), rows=task.rows))

    def _shared_gate(self, task: Task) -> None:
        m = self.spec.moe_prefix(task.layer)
        x = self.v[f"L{task.layer}.xf"]
        gate = torch.sigmoid(F.linear(x, self.model.w(f"{m}.shared_expert_gate.weight")))
        self._acc(f"L{task.layer}.y", gate * self.v[f"L{task.layer}.s"])

    def _final_norm(self, task: Task) -> None:
        last = self.spec.n_layers - 1
        h = (self.v[f"L{last}.hm"] + self.v[f"L{last}.y"]).view(self.b, self.t, -1)[:, -1]
        self.v["xo"] = self.model.norm(h, "model.norm")

    def _lm_head(self, task: Task) -> None:
        r0, r1 = task.rows
        name = "model.embed_tokens" if self.spec.tie_word_embeddings else "lm_head"
        bias = self.model.bias("lm_head.bias")
        part = F.linear(self.v["xo"], self.model.w(f"{name}.weight")[r0:r1], None if bias is None else bias[r0:r1])
        if "logits" not in self.v:
            self.v["logits"] = part.new_zeros(self.b, self.spec.vocab_size)
        self.v["logits"][:, r0:r1] = part


__all__ = ["NumericsExecutor"]
