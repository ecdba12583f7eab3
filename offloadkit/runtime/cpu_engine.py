"""The real CPU engine: a whole model on the CPU through offloadkit's kernels, with a measured Timeline.

This is the ``cpu-only`` end of the design (docs/DESIGN.md sections 8 and 9): every weight stays in host
memory in its stored dtype (a memory-mapped checkpoint stays mapped) and every task runs on the
``cpu`` lane: the experts, dense FFNs, attention projections, routers and lm_head through
:mod:`offloadkit.kernels.cpu.experts` (decode kernel for a few tokens, prefill kernel for many); the
norms and the attention core through the Numba kernels of :mod:`offloadkit.kernels.cpu.norms_attention`
(each measured faster than torch there); softmax / top-k over the router's few logits, RoPE and the
residual adds stay in torch.

The math around the kernels (RoPE, the KV cache, routing rules, expert dispatch) is the reference
forward's own: :class:`CpuEngine` *is* a
:class:`~offloadkit.model.reference.ReferenceModel` whose weight-reading parts are replaced, so the
two can only differ by the kernels' summation order, and greedy tokens match (docs/DESIGN.md section 10).

Every forward appends measured :class:`~offloadkit.runtime.timeline.TaskRecord` s to
``engine.timeline`` (``source="measured"``, machine = this CPU and its threads): per layer the
``attn_norm``, ``attn_qkv``, ``attention`` (the core), ``attn_o``, ``ffn_norm``, ``router``, one
``expert e`` per expert used (or ``ffn``), then ``final_norm`` and ``lm_head``; ``step`` 0 is the
prefill, 1, 2, ... the decode steps. A forward on a fresh cache (or without one) starts a new
timeline.

What it refuses: batches whose sequences are not all at the same position (as the reference),
devices other than the CPU, and training (no autograd through the kernels).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from offloadkit.errors import OffloadkitError
from offloadkit.hardware.machine import machine_label
from offloadkit.kernels.cpu.experts import ExpertWeights, expert_rows, linear
from offloadkit.kernels.cpu.norms_attention import causal_attention, layer_norm, rms_norm, use_torch_attention
from offloadkit.kernels.cpu.primitives import storage_view
from offloadkit.model.reference import KVCache, ReferenceModel
from offloadkit.model.rope import rotary_tables
from offloadkit.model.spec import ModelSpec
from offloadkit.runtime.timeline import TaskRecord, Timeline


class CpuEngine(ReferenceModel):
    """Run ``spec`` over ``weights`` (bf16 / f16 / f32, any mix) on the CPU, recording a measured Timeline."""

    engine_name = "cpu"

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__(spec, weights, torch.float32)
        if self.device.type != "cpu":
            raise OffloadkitError(f"the CPU engine runs on host memory; the weights are on {self.device}")
        self._store: dict[str, np.ndarray] = {}
        self._experts: dict[str, ExpertWeights] = {}
        self._norms: dict[str, np.ndarray] = {}
        self._nbytes: dict[str, int] = {}
        self._attn_weights: dict[tuple[int, str], tuple[int, int]] = {}
        self.machine = machine_label()
        self.timeline = self._new_timeline()
        self._step = 0
        self._t0 = time.perf_counter()

    # ---- weights in kernel storage (views, made once) ------------------------------------------------

    def _stored(self, name: str) -> np.ndarray:
        if name not in self._store:
            self._store[name] = storage_view(self.weights[name], name)[0]
        return self._store[name]

    def _expert_weights(self, prefix: str, names: tuple[str, str, str]) -> ExpertWeights:
        if prefix not in self._experts:
            self._experts[prefix] = ExpertWeights.from_torch(*(self.weights[f"{prefix}.{n}.weight"] for n in names))
        return self._experts[prefix]

    # ---- the timeline --------------------------------------------------------------------------------

    def _new_timeline(self) -> Timeline:
        return Timeline("measured", self.machine, meta={"engine": self.engine_name, "model": self.spec.name or
                                                          self.spec.arch, "dtype": self.spec.dtype})

    @contextmanager
    def _task(self, name: str, kind: str, layer: int | None = None, bytes_: int = 0,
              flops: int = 0) -> Iterator[None]:
        start = time.perf_counter() - self._t0
        yield
        self.timeline.add(TaskRecord("cpu", name, start, time.perf_counter() - self._t0, layer, kind,
                                     int(bytes_), int(flops), self._step))

    def _bytes(self, *names: str) -> int:
        """Stored bytes of the named weights (absent names count 0); computed once per name."""
        total = 0
        for n in names:
            if n not in self._nbytes:
                self._nbytes[n] = self.weights[n].numel() * self.weights[n].element_size() if n in self.weights else 0
            total += self._nbytes[n]
        return total

    # ---- the parts, on the kernels ---------------------------------------------------------------------

    def linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        w = self._stored(f"{prefix}.weight")
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.from_numpy(linear(flat.numpy(), w)).view(*x.shape[:-1], w.shape[0])
        bias = self.bias(f"{prefix}.bias")
        return y if bias is None else y + bias

    def _f32(self, name: str) -> np.ndarray:
        if name not in self._norms:
            self._norms[name] = self.weights[name].float().contiguous().numpy()
        return self._norms[name]

    def norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous().numpy()
        if self.spec.norm_kind == "layer":
            y = layer_norm(flat, self._f32(f"{prefix}.weight"), self._f32(f"{prefix}.bias"), self.spec.norm_eps)
        else:
            y = rms_norm(flat, self._f32(f"{prefix}.weight"), self.spec.norm_eps)
        return torch.from_numpy(y).view(x.shape)

    def attention_core(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                       cache: KVCache | None) -> torch.Tensor:
        """The reference's attention core on the Numba kernel, reading the cache in place."""
        s = self.spec
        b, _, t, _ = q.shape
        if use_torch_attention(t, start):
            return super().attention_core(layer, q, k, v, start, cache)
        q, k = q.contiguous(), k.contiguous()
        if cache is not None:
            cache.update(layer, k, v)
            k, v = cache.k[layer], cache.v[layer]  # the whole buffers: the kernel reads [0, start + t)
        o = causal_attention(q.numpy(), k.numpy(), v.contiguous().numpy(), start + t, start, s.sliding_window)
        return torch.from_numpy(o).transpose(1, 2).reshape(b, t, s.n_heads * s.head_dim)

    def _swiglu(self, prefix: str, names: tuple[str, str, str], x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(expert_rows(x.contiguous(), self._expert_weights(prefix, names)))

    def expert(self, layer: int, e: int, x: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        ew = self._expert_weights(f"{self.spec.moe_prefix(layer)}.experts.{e}", self.spec.expert_names())
        return torch.from_numpy(expert_rows(x.contiguous(), ew, rows))

    def dense_ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return self._swiglu(f"model.layers.{layer}.mlp", ("gate_proj", "up_proj", "down_proj"), flat).view(x.shape)

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from offloadkit.model.moe import route_softmax_topk, route_sparsemixer

        logits = self.linear(x, f"{self.spec.moe_prefix(layer)}.gate")
        if self.spec.router == "sparsemixer":
            return route_sparsemixer(logits, self.spec.router_jitter_eps)
        return route_softmax_topk(logits, self.spec.top_k, self.spec.norm_topk_prob)

    def moe_ffn(self, layer: int, x: torch.Tensor, routing: dict | None = None) -> torch.Tensor:
        s, m, n = self.spec, self.spec.moe_prefix(layer), x.shape[0]
        router_flops = 2 * n * s.hidden_size * s.n_experts
        with self._task("router", "router", layer, self._bytes(f"{m}.gate.weight"), router_flops):
            weights, experts = self.route(layer, x)
        if routing is not None:
            routing[layer] = experts
        out = torch.zeros_like(x)
        for e in torch.unique(experts).tolist():
            token, slot = torch.where(experts == e)
            ew = self._expert_weights(f"{m}.experts.{e}", s.expert_names())
            with self._task(f"expert {e}", "expert", layer, ew.nbytes,
                            6 * len(token) * ew.hidden * ew.intermediate):
                y = self.expert(layer, int(e), x[token])
                out.index_add_(0, token, y * weights[token, slot, None])
        if s.shared_expert_intermediate_size:
            names = ("gate_proj", "up_proj", "down_proj")
            shared = self._expert_weights(f"{m}.shared_expert", names)
            with self._task("shared_expert", "shared_expert", layer, shared.nbytes + self._bytes(
                    f"{m}.shared_expert_gate.weight"), 6 * n * shared.hidden * shared.intermediate):
                y = self._swiglu(f"{m}.shared_expert", names, x)
                out = out + torch.sigmoid(self.linear(x, f"{m}.shared_expert_gate")) * y
        return out

    def _projection_cost(self, layer: int, projections: str, tokens: int) -> tuple[int, int]:
        """(bytes, flops) of the ``projections`` (e.g. ``"qkv"``, ``"o"``) of a layer for ``tokens`` tokens."""
        key = (layer, projections)
        if key not in self._attn_weights:
            p = f"model.layers.{layer}.self_attn"
            names = [n for n in (f"{p}.{x}_proj.{k}" for x in projections for k in ("weight", "bias"))
                     if n in self.weights]
            self._attn_weights[key] = (self._bytes(*names), sum(self.weights[n].numel() for n in names))
        weight_bytes, params = self._attn_weights[key]
        return weight_bytes, 2 * tokens * params

    def _core_cost(self, batch: int, tokens: int, start: int) -> tuple[int, int]:
        """(bytes, flops) of the attention core: the f32 KV cache read, QK^T and PV for every head."""
        s, keys = self.spec, start + tokens
        kv_bytes = batch * 2 * keys * s.n_kv_heads * s.head_dim * 4
        return kv_bytes, batch * 4 * tokens * keys * s.n_heads * s.head_dim

    def decoder_layer(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                      cache: KVCache | None, routing: dict | None) -> torch.Tensor:
        p, (b, t, d) = f"model.layers.{layer}", h.shape
        with self._task("attn_norm", "attn_norm", layer, 4 * d):
            x = self.norm(h, f"{p}.input_layernorm")
        # the three parts of attention, as the simulator's task graph names them
        with self._task("attn_qkv", "attn_qkv", layer, *self._projection_cost(layer, "qkv", b * t)):
            q, k, v = self.attn_qkv(layer, x, cos, sin)
        with self._task("attention", "attention", layer, *self._core_cost(b, t, start)):
            o = self.attention_core(layer, q, k, v, start, cache)
        with self._task("attn_o", "attn_o", layer, *self._projection_cost(layer, "o", b * t)):
            h = h + self.attn_o(layer, o)
        with self._task("ffn_norm", "ffn_norm", layer, 4 * d):
            x = self.norm(h, f"{p}.post_attention_layernorm")
        if self.spec.is_moe_layer(layer):
            return h + self.moe_ffn(layer, x.reshape(b * t, d), routing).view(b, t, d)
        names = [f"{p}.mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
        with self._task("ffn", "ffn", layer, self._bytes(*names), 6 * b * t * d * self.spec.intermediate_size):
            return h + self.dense_ffn(layer, x)

    # ---- the model -------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *,
                routing: dict | None = None) -> torch.Tensor:
        """Logits f32 [B, T, V], as :meth:`ReferenceModel.forward`, recording each task in ``self.timeline``."""
        if input_ids.dim() != 2:
            raise OffloadkitError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if cache is None or cache.length == 0:
            self.timeline, self._step, self._t0 = self._new_timeline(), 0, time.perf_counter()
        else:
            self._step += 1
        b, t = input_ids.shape
        start = cache.length if cache is not None else 0
        with self._task("embed", "embed", None, b * t * self.spec.hidden_size * self.spec.bytes_per_param):
            cos, sin = rotary_tables(self.spec, torch.arange(start, start + t), torch.float32)
            h = F.embedding(input_ids, self.weights["model.embed_tokens.weight"]).float()
        for layer in range(self.spec.n_layers):
            h = self.decoder_layer(layer, h, cos, sin, start, cache, routing)
        if cache is not None:
            cache.advance(t)
        with self._task("final_norm", "final_norm", None, 4 * self.spec.hidden_size):
            h = self.norm(h, "model.norm")
        head = "model.embed_tokens" if self.spec.tie_word_embeddings else "lm_head"
        with self._task("lm_head", "lm_head", None, self._bytes(f"{head}.weight", "lm_head.bias"),
                        2 * b * t * self.spec.hidden_size * self.spec.vocab_size):
            logits = self.linear(h, head)  # adds lm_head.bias when the head is lm_head
            if head != "lm_head" and self.spec.lm_head_bias:
                logits = logits + self.bias("lm_head.bias")
        return logits.float()

    __call__ = forward


__all__ = ["CpuEngine"]
