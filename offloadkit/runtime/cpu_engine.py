"""The real CPU engine: a whole model on the CPU through offloadkit's kernels, with a measured Timeline.

This is the ``cpu-only`` end of the design (docs/DESIGN.md sections 8 and 9): every weight stays in host
memory in its stored dtype (a memory-mapped checkpoint stays mapped; its pages are mapped into the
process when a layer is first prepared, as llama.cpp's ``MAP_POPULATE`` does) and every task runs on
the ``cpu`` lane, through the kernels of :mod:`offloadkit.kernels.cpu`: the experts,
dense FFNs, attention projections, routers and lm_head on the decode kernels (up to a few dozen tokens)
or the prefill kernels (widened blocks fed to torch's GEMM), the norms, RoPE, the KV-cache write, the
attention core and the router's softmax top-k on small kernels. Between them the activations stay one
f32 numpy array per forward, the *residual stream* ``h`` [tokens, hidden], which the O projection, the
experts and the FFNs add into in place.

**A decode step makes one call from Python** (:func:`~offloadkit.kernels.cpu.decode_layer.decode_step`,
where every layer's weights share a dtype and routing is softmax top-k): all layers run inside one
compiled call, which stamps each task boundary with the CPU's cycle counter, so no Python runs between
tasks; otherwise one call per layer (:func:`~offloadkit.kernels.cpu.decode_layer.decode_layer`), or the
separate per-task path (prefill, PhiMoE's sparsemixer, mixed dtypes, no cycle counter). Issue 10
measured the fixed cost per token of an 8-layer model at ~4.8 ms before (torch ops, conversions and
dispatch per layer; llama.cpp: ~0.5 ms) and ~0.36 ms with the one-call step; on ``bench-moe`` a decode
step takes the time of its kernels alone (engine / kernels-only loop 1.00, measured alternated).

This module is the forward and its timeline; the weights' preparation (kernel-storage views, page
mapping, per-layer fixed costs) is :mod:`offloadkit.runtime.cpu_weights`, and the one-call decode's
arguments and task records are :mod:`offloadkit.runtime.cpu_decode_step`.

The math is the reference forward's (:class:`~offloadkit.model.reference.ReferenceModel`, which this
class *is*, for its weights, cache and generation helpers): the same RoPE, routing rules, expert
dispatch and KV cache, so the two differ only by summation order and greedy tokens match
(docs/DESIGN.md section 10). The KV cache is the reference's :class:`~offloadkit.model.reference.KVCache`
in f32 (its compute dtype), written in place.

``forward(ids, cache, logits="last")`` computes the final norm and the lm_head for the last position
of each sequence only, which is all generation needs (:mod:`offloadkit.model.generate` asks for it) and
what llama-bench asks of llama.cpp; ``logits="all"`` (the default, as the reference) computes them for
every position.

Every forward appends measured :class:`~offloadkit.runtime.timeline.TaskRecord` s to
``engine.timeline`` (``source="measured"``, machine = this CPU, its extensions and its threads; times
from the cycle counter where it ticks steadily, else ``time.perf_counter``); ``step`` 0 is the prefill,
1, 2, ... the decode steps, and a forward on a fresh cache (or without one) starts a new timeline. Per
layer, in order, the tasks and what each covers (the same on every path):

- ``attn_norm``: the input norm;
- ``attn_qkv``: the Q, K and V projections (one parallel pass over the three weights at decode), their
  biases, RoPE on Q and K, and K and V written into the KV cache (before issue 10 the cache write was
  part of ``attention``);
- ``attention``: the attention core over the cache, in place;
- ``attn_o``: the O projection, added into the residual stream (with its bias);
- ``ffn_norm``: the post-attention norm;
- ``router`` (MoE layers): the router's logits and its softmax top-k (or sparsemixer);
- ``expert e``, one per expert used (kind ``expert``): that expert on the tokens that chose it,
  weighted by the router and added into the residual stream (the weighting and the add were outside
  any task before issue 10);
- ``shared_expert`` (Qwen2-MoE): the shared expert times its sigmoid gate, added in;
- ``ffn`` (dense layers): the SwiGLU FFN, added in;

then ``embed`` (first: the embedding rows widened to f32, and the rotary rows, from a table cached per
engine where the rope type does not depend on the sequence length), ``final_norm`` and ``lm_head``
(last, both over the positions whose logits are asked for: one per sequence with ``logits="last"``,
before issue 10 always every position). Python's own work between tasks (a few µs per layer on the
separate path, none inside the one-call step) is in no record.

What it refuses: batches whose sequences are not all at the same position (as the reference), devices
other than the CPU, KV caches in another dtype than f32, and training (no autograd through the kernels).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numba
import numpy as np
import torch
from numba.typed import List as NumbaList

from offloadkit.errors import OffloadkitError
from offloadkit.hardware.machine import machine_label
from offloadkit.kernels.cpu.decode import expert_decode, rows_dot
from offloadkit.kernels.cpu.decode_layer import CycleClock, cycle_clock, read_cycles
from offloadkit.kernels.cpu.experts import DECODE_MAX_TOKENS, ExpertWeights, expert_rows, linear
from offloadkit.kernels.cpu.layer_ops import gather_rows, qkv_rope, rope_store, router_topk, softmax_topk
from offloadkit.kernels.cpu.norms_attention import (
    attention_bthd,
    layer_norm,
    rms_norm,
    use_torch_attention,
)
from offloadkit.kernels.cpu.prefill import expert_prefill, linear_prefill, linear_prefill_into
from offloadkit.kernels.cpu.primitives import STORAGE
from offloadkit.model.reference import KVCache, ReferenceModel
from offloadkit.model.reference import causal_attention as torch_attention
from offloadkit.model.rope import rotary_tables
from offloadkit.model.spec import ModelSpec
from offloadkit.runtime.cpu_decode_step import layer_records, run_layer, run_step, step_lists
from offloadkit.runtime.cpu_weights import HostWeights, LayerWeights, NormWeights, map_pages
from offloadkit.runtime.timeline import TaskRecord, Timeline

#: ``forward(..., logits=...)``: every position's logits, or only each sequence's last.
LOGITS_MODES = ("all", "last")
#: Rope types whose tables do not depend on the sequence length: one table per engine serves every call.
_STATIC_ROPE = ("default", "linear", "llama3")
#: The decode kernels' token limit by kernel storage dtype (see offloadkit.kernels.cpu.experts).
_DECODE_MAX = {STORAGE[name]: n for name, n in DECODE_MAX_TOKENS.items()}


class CpuEngine(ReferenceModel):
    """Run ``spec`` over ``weights`` (bf16 / f16 / f32, any mix) on the CPU, recording a measured Timeline."""

    engine_name = "cpu"
    logits_modes = LOGITS_MODES
    #: Run a decode step's layers in one compiled call (:func:`decode_step`) where every layer can; False
    #: makes one call per layer (:func:`decode_layer`), as when some layer cannot.
    whole_step = True

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__(spec, weights, torch.float32)
        if self.device.type != "cpu":
            raise OffloadkitError(f"the CPU engine runs on host memory; the weights are on {self.device}")
        self._w = HostWeights(spec, self.weights, self._names)
        self._kv: dict[int, tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]] = {}
        self._rope_table: tuple[np.ndarray, np.ndarray] | None = None
        self._lm_head_bytes: int | None = None
        self._step_lists: tuple | None = None  # decode_step's per-layer lists (False: some layer cannot)
        self._step_chunks: dict[tuple[int, int], np.ndarray] = {}
        self._kv_lists: tuple[list[torch.Tensor], list[torch.Tensor], NumbaList, NumbaList] | None = None
        self._eps = np.float32(spec.norm_eps)
        self._reserved: tuple[torch.Tensor | None, int] = (None, 0)  # (layer 0's K buffer, capacity) last checked
        self._threads = numba.get_num_threads()
        self._clock: CycleClock | None = cycle_clock()
        self._c0 = 0  # the cycle counter when the timeline started
        self.machine = machine_label()
        self._timeline = self._new_timeline()
        self._pending: list[tuple] = []  # TaskRecord fields, or (None, ...) for a fused layer's stamps
        self._step = 0
        self._t0 = 0.0
        self._start_clock()

    # ---- weights (kernel storage, made once per layer: offloadkit.runtime.cpu_weights) -----------------

    @property
    def _layers(self) -> dict[int, LayerWeights]:
        return self._w.layers

    def _layer(self, layer: int) -> LayerWeights:
        return self._w.layer(layer, fusable=self._clock is not None)

    # ---- the timeline --------------------------------------------------------------------------------

    def _new_timeline(self) -> Timeline:
        threads = numba.get_num_threads()
        if f", {threads} threads" not in self.machine:  # the threads were changed since (numba.set_num_threads)
            self.machine = machine_label(threads)
        return Timeline("measured", self.machine, meta={"engine": self.engine_name, "model": self.spec.name or
                                                          self.spec.arch, "dtype": self.spec.dtype})

    @property
    def timeline(self) -> Timeline:
        """The measured timeline of the forwards since the last fresh cache (records are kept as tuples
        while the engine runs, and made :class:`TaskRecord` s here: ~2 µs saved per task)."""
        if self._pending:
            records = []
            for r in self._pending:
                if r[0] is None:
                    records.extend(self._fused_records(*r[1:]))
                else:
                    records.append(TaskRecord("cpu", *r))
            self._timeline.extend(records)
            self._pending.clear()
        return self._timeline

    def _fused_records(self, layer: int, *args: object) -> list[TaskRecord]:
        """The task records of one one-call layer (:func:`~offloadkit.runtime.cpu_decode_step.layer_records`)."""
        step, b, t, start, c0, stamps, used, counts, n_used = args
        return layer_records(self.spec, self._layers[layer], layer, step, b, t, start, c0, self._clock.hz, stamps,
                             used, counts, n_used)

    @timeline.setter
    def timeline(self, value: Timeline) -> None:
        self._pending.clear()
        self._timeline = value

    def _start_clock(self) -> None:
        """Start the timeline's clock: the cycle counter where it ticks (one clock for every record, the
        Python-timed ones and those stamped inside :func:`decode_layer`), else ``time.perf_counter``."""
        self._t0 = time.perf_counter()
        self._c0 = int(read_cycles()) if self._clock is not None else 0

    def _now(self) -> float:
        """Seconds since the timeline started."""
        if self._clock is not None:
            return (read_cycles() - self._c0) / self._clock.hz
        return time.perf_counter() - self._t0

    def _rec(self, name: str, kind: str, layer: int | None, t0: float, t1: float, bytes_: int = 0,
             flops: int = 0) -> None:
        self._pending.append((name, t0, t1, layer, kind, bytes_, flops, self._step))

    # ---- the parts as the reference names them (torch in, torch out), on the kernels ---------------------

    def linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        w = self._w.stored(f"{prefix}.weight")
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.from_numpy(linear(flat.numpy(), w)).view(*x.shape[:-1], w.shape[0])
        bias = self.bias(f"{prefix}.bias")
        return y if bias is None else y + bias

    def norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous().numpy()
        return torch.from_numpy(self._norm(flat, self._w.norm_weights(prefix))).view(x.shape)

    def expert(self, layer: int, e: int, x: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        ew = self._w.expert_weights(f"{self.spec.moe_prefix(layer)}.experts.{e}", self.spec.expert_names())
        return torch.from_numpy(expert_rows(x.contiguous(), ew, rows))

    def dense_ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        ew = self._w.expert_weights(f"model.layers.{layer}.mlp", ("gate_proj", "up_proj", "down_proj"))
        return torch.from_numpy(expert_rows(flat, ew)).view(x.shape)

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, experts = self._route(self._layer(layer), x.contiguous().numpy())
        return torch.from_numpy(weights), torch.from_numpy(experts)

    # ---- the numpy path the forward runs ---------------------------------------------------------------

    def _norm(self, x: np.ndarray, n: NormWeights) -> np.ndarray:
        if n.bias is not None:
            return layer_norm(x, n.weight, n.bias, self.spec.norm_eps, self._threads)
        return rms_norm(x, n.weight, self.spec.norm_eps, self._threads)

    def _lin(self, x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
        """``out (+)= x · Wᵀ`` on the kernel the token count calls for (arrays the engine made: no checks)."""
        if out is None:
            out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
        if x.shape[0] <= _DECODE_MAX[w.dtype]:
            rows_dot(x, w, 0, out, accumulate, self._threads)
        else:
            linear_prefill(x, w, out, accumulate=accumulate)
        return out

    def _swiglu(self, x: np.ndarray, ew: ExpertWeights, out: np.ndarray, scale: np.ndarray | None = None) -> None:
        """``out += scale ⊙ expert(x)`` on the kernel the token count calls for."""
        if x.shape[0] <= _DECODE_MAX[ew.w_gate.dtype]:
            expert_decode(x, ew.w_gate, ew.w_up, ew.w_down, 0, ew.intermediate, out, scale, self._threads)
        else:
            expert_prefill(x, ew.w_gate, ew.w_up, ew.w_down, 0, ew.intermediate, out, scale=scale)

    def _qkv(self, x: np.ndarray, lw: LayerWeights) -> np.ndarray:
        """[n, (H + 2 KV) D]: the three projections, each on the kernel its token count and dtype call for."""
        wq, wk, wv = lw.wq, lw.wk, lw.wv
        out = np.empty((x.shape[0], wq.shape[0] + wk.shape[0] + wv.shape[0]), dtype=np.float32)
        xt, yt, c0 = torch.from_numpy(x), torch.from_numpy(out), 0
        for w in (wq, wk, wv):
            if x.shape[0] <= _DECODE_MAX[w.dtype]:
                rows_dot(x, w, 0, out[:, c0:c0 + w.shape[0]], False, self._threads)
            else:
                linear_prefill_into(xt, w, yt[:, c0:c0 + w.shape[0]])
            c0 += w.shape[0]
        return out

    def _route(self, lw: LayerWeights, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weights [N, k] f32, experts [N, k] int64) of the router on ``x`` [N, H]."""
        from offloadkit.model.moe import route_sparsemixer

        if self.spec.router != "sparsemixer" and x.shape[0] <= _DECODE_MAX[lw.router.dtype]:
            return router_topk(x, lw.router, self.spec.top_k, self.spec.norm_topk_prob)
        logits = self._lin(x, lw.router)
        if self.spec.router == "sparsemixer":
            w, e = route_sparsemixer(torch.from_numpy(logits), self.spec.router_jitter_eps)
            return w.float().contiguous().numpy(), e.contiguous().numpy()
        return softmax_topk(logits, self.spec.top_k, self.spec.norm_topk_prob)

    def _rope(self, start: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [t, D] f32 of positions ``[start, start + t)`` (rows of a cached table when static)."""
        s = self.spec
        if s.rope.rope_type not in _STATIC_ROPE or (s.arch == "phimoe" and s.rope.rope_type != "default"):
            cos, sin = rotary_tables(s, torch.arange(start, start + t), torch.float32)
            return cos.contiguous().numpy(), sin.contiguous().numpy()
        end = start + t
        if self._rope_table is None or self._rope_table[0].shape[0] < end:
            size = max(end, 256, 2 * (0 if self._rope_table is None else self._rope_table[0].shape[0]))
            cos, sin = rotary_tables(s, torch.arange(size), torch.float32)
            self._rope_table = (cos.contiguous().numpy(), sin.contiguous().numpy())
        return self._rope_table[0][start:end], self._rope_table[1][start:end]

    def _kv_arrays(self, cache: KVCache, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Numpy views of the cache's K and V of ``layer`` (remade when the cache or its buffers change)."""
        tk, tv = cache.k[layer], cache.v[layer]
        held = self._kv.get(layer)
        if held is None or held[0] is not tk or held[2] is not tv:
            held = (tk, tk.numpy(), tv, tv.numpy())
            self._kv[layer] = held
        return held[1], held[3]

    def _reserve(self, cache: KVCache, batch: int, end: int) -> None:
        """Check the cache and grow every layer's buffers to hold ``end`` positions (as ``KVCache.update``)."""
        k0 = cache.k[0] if cache.k else None
        if self._reserved[0] is k0 and end <= self._reserved[1] and cache.batch == batch:
            return  # the cache this engine checked and grew last time, still large enough
        if cache.batch != batch:
            raise OffloadkitError(f"the cache holds a batch of {cache.batch}, the input has {batch}")
        if cache.dtype != torch.float32 or cache.device.type != "cpu":
            raise OffloadkitError(f"the CPU engine keeps its KV cache in f32 on the CPU; this one is {cache.dtype} on "
                                  f"{cache.device}: make it with engine.new_cache()")
        for layer in range(self.spec.n_layers):
            capacity = cache.k[layer].shape[2]
            if end > capacity:
                pad = torch.zeros(cache.batch, cache.n_kv_heads, max(end, 2 * capacity) - capacity, cache.head_dim,
                                  dtype=cache.dtype)
                cache.k[layer] = torch.cat((cache.k[layer], pad), dim=2)
                cache.v[layer] = torch.cat((cache.v[layer], pad), dim=2)
        self._reserved = (cache.k[0] if cache.k else None, min((k.shape[2] for k in cache.k), default=0))

    def _attention(self, layer: int, lw: LayerWeights, x: np.ndarray, h: np.ndarray, b: int, t: int, start: int,
                   cache: KVCache | None, cos: np.ndarray, sin: np.ndarray) -> None:
        s, n = self.spec, b * t
        t0 = self._now()
        q = np.empty((b, t, s.n_heads, s.head_dim), dtype=np.float32)
        if cache is not None:
            k_all, v_all = self._kv_arrays(cache, layer)
        else:
            k_all = np.empty((b, s.n_kv_heads, t, s.head_dim), dtype=np.float32)
            v_all = np.empty_like(k_all)
        if n <= _DECODE_MAX[lw.wq.dtype] and lw.wq.dtype == lw.wk.dtype == lw.wv.dtype:
            qkv_rope(x, lw.wq, lw.wk, lw.wv, lw.qkv_bias, cos, sin, start, q, k_all, v_all, self._threads)
        else:
            qkv = self._qkv(x, lw)
            if lw.qkv_bias is not None:
                qkv += lw.qkv_bias
            rope_store(qkv, cos, sin, start, q, k_all, v_all, self._threads)
        t1 = self._now()
        self._rec("attn_qkv", "attn_qkv", layer, t0, t1, lw.qkv_bytes, 2 * n * lw.qkv_params)
        keys = start + t
        if use_torch_attention(t, start):
            qt = torch.from_numpy(q).transpose(1, 2)
            kt, vt = (torch.from_numpy(a)[:, :, :keys] for a in (k_all, v_all))
            o = torch_attention(qt, kt, vt, start, s.sliding_window).transpose(1, 2).contiguous().numpy()
        else:
            o = attention_bthd(q, k_all, v_all, keys, start, s.sliding_window, threads=self._threads)
        t2 = self._now()
        self._rec("attention", "attention", layer, t1, t2, b * 2 * keys * s.n_kv_heads * s.head_dim * 4,
                  b * 4 * t * keys * s.n_heads * s.head_dim)
        self._lin(o.reshape(n, s.n_heads * s.head_dim), lw.wo, out=h, accumulate=True)
        if lw.o_bias is not None:
            h += lw.o_bias
        self._rec("attn_o", "attn_o", layer, t2, self._now(), lw.o_bytes, 2 * n * lw.o_params)

    def _moe(self, layer: int, lw: LayerWeights, x: np.ndarray, h: np.ndarray, routing: dict | None) -> None:
        s, n = self.spec, x.shape[0]
        t0 = self._now()
        weights, experts = self._route(lw, x)
        if routing is not None:
            routing[layer] = torch.from_numpy(experts)
        t1 = self._now()
        self._rec("router", "router", layer, t0, t1, lw.router.nbytes, 2 * n * s.hidden_size * s.n_experts)
        k = experts.shape[1]
        if n == 1:  # a decode step: no gathering, the weighted outputs go straight into the residual stream
            for j in sorted(range(k), key=lambda j: experts[0, j]):
                e = int(experts[0, j])
                ew = lw.experts[e]
                self._swiglu(x, ew, h, weights[0, j:j + 1])
                t2 = self._now()
                self._rec(f"expert {e}", "expert", layer, t1, t2, ew.nbytes, 6 * ew.hidden * ew.intermediate)
                t1 = t2
        else:
            flat = experts.reshape(-1)
            order = np.argsort(flat, kind="stable")
            bounds = np.concatenate(([0], np.cumsum(np.bincount(flat, minlength=s.n_experts))))
            for e in range(s.n_experts):
                if bounds[e] == bounds[e + 1]:
                    continue
                sel = order[bounds[e]:bounds[e + 1]]
                token, slot = sel // k, sel % k
                ew = lw.experts[e]
                y = np.zeros((len(token), ew.hidden), dtype=np.float32)
                self._swiglu(x[token], ew, y, np.ascontiguousarray(weights[token, slot]))
                h[token] += y  # each token chose e once: the rows are distinct
                t2 = self._now()
                self._rec(f"expert {e}", "expert", layer, t1, t2, ew.nbytes,
                          6 * len(token) * ew.hidden * ew.intermediate)
                t1 = t2
        if lw.shared is not None:
            gate = self._lin(x, lw.shared_gate).reshape(-1)
            sig = (1.0 / (1.0 + np.exp(-gate))).astype(np.float32)
            self._swiglu(x, lw.shared, h, sig)
            self._rec("shared_expert", "shared_expert", layer, t1, self._now(),
                      lw.shared.nbytes + lw.shared_gate.nbytes, 6 * n * lw.shared.hidden * lw.shared.intermediate)

    def _decoder_layer(self, layer: int, h: np.ndarray, b: int, t: int, start: int, cache: KVCache | None,
                       routing: dict | None, cos: np.ndarray, sin: np.ndarray) -> None:
        """One layer on the residual stream ``h`` [b * t, hidden], in place."""
        lw, d = self._layer(layer), self.spec.hidden_size
        if lw.fused is not None and h.shape[0] <= _DECODE_MAX[lw.wq.dtype] and not use_torch_attention(t, start):
            self._fused_layer(layer, lw, h, b, t, start, cache, routing, cos, sin)
            return
        t0 = self._now()
        x = self._norm(h, lw.attn_norm)
        self._rec("attn_norm", "attn_norm", layer, t0, self._now(), 4 * d)
        self._attention(layer, lw, x, h, b, t, start, cache, cos, sin)
        t0 = self._now()
        x = self._norm(h, lw.ffn_norm)
        t1 = self._now()
        self._rec("ffn_norm", "ffn_norm", layer, t0, t1, 4 * d)
        if lw.dense is None:
            self._moe(layer, lw, x, h, routing)
            return
        self._swiglu(x, lw.dense, h)
        self._rec("ffn", "ffn", layer, t1, self._now(), lw.dense.nbytes,
                  6 * x.shape[0] * d * lw.dense.intermediate)

    def _kv_or_scratch(self, cache: KVCache | None, layer: int, b: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """The cache's K and V arrays of ``layer``, or scratch ones for a forward without a cache."""
        if cache is not None:
            return self._kv_arrays(cache, layer)
        k_all = np.empty((b, self.spec.n_kv_heads, t, self.spec.head_dim), dtype=np.float32)
        return k_all, np.empty_like(k_all)

    def _fused_layer(self, layer: int, lw: LayerWeights, h: np.ndarray, b: int, t: int, start: int,
                     cache: KVCache | None, routing: dict | None, cos: np.ndarray, sin: np.ndarray) -> None:
        """The layer as one :func:`decode_layer` call; its tasks' records come from the call's stamps."""
        k_all, v_all = self._kv_or_scratch(cache, layer, b, t)
        experts, stamps, used, counts, n_used = run_layer(self.spec, lw, self._eps, h, b, t, start, k_all, v_all,
                                                          cos, sin, self._threads)
        if routing is not None and lw.dense is None:
            routing[layer] = torch.from_numpy(experts)
        self._pending.append((None, layer, self._step, b, t, start, self._c0, stamps, used, counts, n_used))

    def _whole_step_lists(self) -> tuple | None:
        """:func:`decode_step`'s per-layer weight lists (made once), or None where the step cannot be one call."""
        if self._step_lists is None:
            self._step_lists = step_lists([self._layer(layer) for layer in range(self.spec.n_layers)])
        return self._step_lists or None

    def _kv_lists_of(self, cache: KVCache | None, b: int, t: int) -> tuple[NumbaList, NumbaList]:
        """Every layer's K and V arrays as typed lists (kept while the cache's buffers stay the same)."""
        n_layers = self.spec.n_layers
        if cache is None:
            arrays = [self._kv_or_scratch(None, layer, b, t) for layer in range(n_layers)]
            return NumbaList([a[0] for a in arrays]), NumbaList([a[1] for a in arrays])
        held = self._kv_lists
        if held is None or any(a is not b_ for a, b_ in zip(held[0], cache.k, strict=True)) or \
                any(a is not b_ for a, b_ in zip(held[1], cache.v, strict=True)):
            arrays = [self._kv_arrays(cache, layer) for layer in range(n_layers)]
            held = (list(cache.k), list(cache.v), NumbaList([a[0] for a in arrays]), NumbaList([a[1] for a in arrays]))
            self._kv_lists = held
        return held[2], held[3]

    def _fused_step(self, lists: tuple, h: np.ndarray, b: int, t: int, start: int, cache: KVCache | None,
                    routing: dict | None, cos: np.ndarray, sin: np.ndarray) -> None:
        """Every layer in one :func:`decode_step` call; the records come from its stamps, layer by layer."""
        n, n_layers = h.shape[0], self.spec.n_layers
        k_list, v_list = self._kv_lists_of(cache, b, t)
        key = (self._threads, n)
        if key not in self._step_chunks:
            self._step_chunks[key] = np.array([HostWeights.fused_chunks(self._layers[layer], n, self._threads)
                                               for layer in range(n_layers)], dtype=np.int64)
        experts, stamps, used, counts, n_used = run_step(self.spec, lists, self._step_chunks[key], self._eps, h, b, t,
                                                         start, k_list, v_list, cos, sin, self._threads)
        moe = lists[-1]
        for layer in range(n_layers):
            if routing is not None and moe[layer]:
                routing[layer] = torch.from_numpy(experts[layer])
            self._pending.append((None, layer, self._step, b, t, start, self._c0, stamps[layer], used[layer],
                                  counts[layer], int(n_used[layer])))

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        name = "model.embed_tokens.weight"
        if not self._w.is_stored(name):
            map_pages([self._w.stored(name)])
        table = self._w.stored(name)
        if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
            raise OffloadkitError(f"token ids must be in [0, {table.shape[0]}), got {ids.min()}..{ids.max()}")
        return gather_rows(table, ids)

    # ---- the model -------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *,
                routing: dict | None = None, logits: str = "all") -> torch.Tensor:
        """Logits f32 [B, T, V] (``logits="all"``, as :meth:`ReferenceModel.forward`) or [B, 1, V] for each
        sequence's last position (``logits="last"``), recording each task in ``self.timeline``."""
        if input_ids.dim() != 2:
            raise OffloadkitError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if logits not in LOGITS_MODES:
            raise OffloadkitError(f"logits must be one of {', '.join(LOGITS_MODES)}, got {logits!r}")
        if cache is None or cache.length == 0:
            self.timeline, self._step = self._new_timeline(), 0
            self._start_clock()
        else:
            self._step += 1
        self._threads = numba.get_num_threads()  # once per forward: asking Numba takes a lock
        s = self.spec
        b, t = input_ids.shape
        start = cache.length if cache is not None else 0
        t0 = self._now()
        h = self._embed(input_ids.reshape(-1).numpy())
        cos, sin = self._rope(start, t)
        self._rec("embed", "embed", None, t0, self._now(), b * t * s.hidden_size * s.bytes_per_param)
        if cache is not None:
            self._reserve(cache, b, start + t)
        lists = self._whole_step_lists() if self.whole_step and not use_torch_attention(t, start) else None
        if lists is not None and b * t <= _DECODE_MAX[lists[4][0].dtype]:
            self._fused_step(lists, h, b, t, start, cache, routing, cos, sin)
        else:
            for layer in range(s.n_layers):
                self._decoder_layer(layer, h, b, t, start, cache, routing, cos, sin)
        if cache is not None:
            cache.advance(t)
        t0 = self._now()
        if logits == "last" and t > 1:
            h = np.ascontiguousarray(h.reshape(b, t, s.hidden_size)[:, -1])
        rows = h.shape[0]
        x = self._norm(h, self._w.norm_weights("model.norm"))
        t1 = self._now()
        self._rec("final_norm", "final_norm", None, t0, t1, 4 * s.hidden_size)
        head = "model.embed_tokens" if s.tie_word_embeddings else "lm_head"
        y = self._lin(x, self._w.stored(f"{head}.weight"))
        bias = self._w.f32_opt("lm_head.bias")
        if bias is not None:
            y += bias
        if self._lm_head_bytes is None:
            self._lm_head_bytes = self._w.nbytes(f"{head}.weight", "lm_head.bias")
        self._rec("lm_head", "lm_head", None, t1, self._now(), self._lm_head_bytes,
                  2 * rows * s.hidden_size * s.vocab_size)
        return torch.from_numpy(y).view(b, rows // b, s.vocab_size)

    __call__ = forward

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, max_len: int | None = None) -> tuple[torch.Tensor, KVCache]:
        """A fresh cache filled with ``input_ids`` [B, T]; returns (logits of the last token [B, V], cache)."""
        cache = self.new_cache(input_ids.shape[0], max_len)
        return self.forward(input_ids, cache, logits="last")[:, -1], cache

    @torch.no_grad()
    def decode(self, token_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step: ``token_ids`` [B] -> logits of the next token [B, V]."""
        return self.forward(token_ids.reshape(-1, 1), cache, logits="last")[:, -1]


__all__ = ["LOGITS_MODES", "CpuEngine"]
