"""What each task of a step computes, on the CPU or on a device, with the tensors where the plan put them.

The step graph (:mod:`offloadkit.runtime.stepgraph`) names every task's inputs and outputs as *parts*:
``"L3.y@gpu"`` is the part of layer 3's FFN output written on the GPU. A value is the sum of its parts
(``ao``, ``y``, ``s``: partial sums of slices) or their concatenation (``qkv``, ``logits``: column
blocks). :class:`Values` holds the parts of one step, each on a side (``"cpu"`` or ``"gpu"``), and
combines the parts a task reads. :class:`LaneMath` does one task's share of the model on one side:

- on the **cpu** side from the memory-mapped checkpoint: the SwiGLU slices (experts, dense FFN, the
  shared expert) through the Numba kernels (:func:`offloadkit.kernels.cpu.expert_rows`, which release
  the GIL so the CPU lane runs beside the device's threads), the rest through torch;
- on the **gpu** side from the device's resident pieces or the staging buffer a weight copy filled
  (:mod:`offloadkit.runtime.slices` layout), through the device's kernels (``device.ops``: the CuPy
  kernels of ``kernels/*.cu``, or their CPU twins on the loopback device) and torch on device tensors
  (cuBLAS for the projections and prefill GEMMs).

The math is the reference forward's (:mod:`offloadkit.model.reference`: its norm, routing rule, RoPE
and attention functions), sliced; the executor's logits must give the reference's greedy tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from offloadkit.kernels.cpu import ExpertWeights, expert_rows
from offloadkit.model.reference import apply_norm, causal_attention, route_logits
from offloadkit.model.rope import apply_rope
from offloadkit.model.spec import ModelSpec
from offloadkit.runtime.slices import qkv_runs
from offloadkit.runtime.tasks import Task


def base_of(part: str) -> str:
    """``"L3.y@gpu"`` -> ``"L3.y"``."""
    return part.rsplit("@", 1)[0]


def is_concatenated(value: str) -> bool:
    """Values whose parts are column blocks (the others' parts are partial sums)."""
    return value.endswith(".qkv") or value == "logits"


@dataclass
class Part:
    """One part of a value on one side: a tensor (or a tuple: the router's weights and experts) and, for a
    concatenated value, the columns ``[c0, c1)`` it holds (the rest of its width is zero)."""

    data: Any
    c0: int = 0
    c1: int = 0


class Values:
    """The parts of one step's values, by (part name, side); see the module docstring.

    Each part is written by one lane only, and read only after the tasks writing it have ended (the
    executor's events), so no lock is needed.
    """

    def __init__(self) -> None:
        self.parts: dict[tuple[str, str], Part] = {}

    def combined(self, task: Task, value: str, side: str) -> Any:
        """The value ``value`` on ``side`` from the parts ``task`` reads (summed, or columns placed)."""
        parts = [self.parts[(p, side)] for p in sorted(task.reads) if base_of(p) == value]
        if not parts:
            raise KeyError(f"task {task.name!r} reads no part of {value} on the {side}")
        if len(parts) == 1 and not is_concatenated(value):
            return parts[0].data
        if is_concatenated(value):
            first = parts[0].data
            out = first.new_zeros(first.shape)
            for p in parts:
                out[:, p.c0:p.c1] = p.data[:, p.c0:p.c1]
            return out
        total = parts[0].data
        for p in parts[1:]:
            total = total + p.data
        return total

    def out_name(self, task: Task, value: str) -> str:
        return next(p for p in task.writes if base_of(p) == value)

    def put(self, task: Task, value: str, side: str, data: Any) -> None:
        """Set the part (filling the placeholder a device lane made when it queued the task, if any)."""
        key = (self.out_name(task, value), side)
        part = self.parts.get(key)
        if part is None:
            self.parts[key] = Part(data)
        else:
            part.data = data

    def accumulate(self, task: Task, value: str, side: str, like: torch.Tensor) -> torch.Tensor:
        """The part of ``value`` this task adds into (created as zeros shaped ``like`` on its first writer)."""
        key = (self.out_name(task, value), side)
        part = self.parts.get(key)
        if part is None:
            part = self.parts[key] = Part(None)
        if part.data is None:
            part.data = torch.zeros_like(like)
        return part.data

    def columns(self, task: Task, value: str, side: str, shape: tuple[int, int], device: torch.device,
                c0: int, c1: int) -> torch.Tensor:
        """The part of concatenated ``value`` (``shape``) this task fills columns ``[c0, c1)`` of."""
        key = (self.out_name(task, value), side)
        part = self.parts.get(key)
        if part is None:
            part = self.parts[key] = Part(None)
        if part.data is None:
            part.data, part.c0, part.c1 = torch.zeros(shape, device=device), c0, c1
        part.c0, part.c1 = min(part.c0, c0), max(part.c1, c1)
        return part.data


@dataclass
class StepInputs:
    """What every task of a step may need: its token ids (host), shape and position tables."""

    ids: torch.Tensor  # [B * T] int64, host
    batch: int
    tokens: int
    start: int
    cos: dict[str, torch.Tensor]  # side -> [T, D]
    sin: dict[str, torch.Tensor]
    head_rows: str = "last"


class LaneMath:
    """One side's implementation of every task kind; see the module docstring.

    ``weights``: host tensors (cpu side). ``resident``/``small``: the device's GG pieces and whole tensors
    (gpu side, from :class:`~offloadkit.runtime.streaming.WeightStreamer`). ``kv``: layer -> (k, v) caches
    [B, KV, S, D] f32 of the layers whose attention runs on this side.
    """

    def __init__(self, spec: ModelSpec, side: str, device: torch.device, ops: Any,
                 weights: Mapping[str, torch.Tensor], resident: Mapping[str, dict[str, torch.Tensor]] | None = None,
                 small: Mapping[str, torch.Tensor] | None = None) -> None:
        self.spec, self.side, self.device, self.ops = spec, side, device, ops
        self.weights, self.resident, self.small = weights, resident or {}, small or {}
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        #: layer -> tokens per expert of this step (set by the executor once it has read the routing)
        self.counts: dict[int, list[int]] = {}
        self._experts: dict[str, ExpertWeights] = {}
        self.v: Values = Values()
        self.step: StepInputs | None = None

    # ---- plumbing -----------------------------------------------------------------------------------

    def w(self, name: str) -> torch.Tensor:
        """A whole tensor on this side (stored dtype)."""
        return self.weights[name] if self.side == "cpu" else self.small[name]

    def get(self, task: Task, value: str) -> Any:
        return self.v.combined(task, value, self.side)

    def pieces(self, task: Task, block: str) -> dict[str, torch.Tensor]:
        """The device pieces of a gpu slice: staged by its weight copy, or the block's resident rows."""
        staged = [r for r in task.reads if r.startswith("W:")]
        if staged:
            return self.v.parts[(staged[0], "gpu")].data
        return self.resident[block]

    def run(self, task: Task) -> None:
        getattr(self, f"_{task.kind}")(task)

    def _rows_out(self, task: Task, value: str, width: int) -> torch.Tensor:
        n = self.step.batch * self.step.tokens if value != "logits" else self._head_n()
        r0, r1 = task.rows
        return self.v.columns(task, value, self.side, (n, width), self.device, r0, r1)

    def _head_n(self) -> int:
        st = self.step
        return st.batch * st.tokens if st.head_rows == "all" else st.batch

    # ---- tasks ----------------------------------------------------------------------------------------

    def _host_step(self, task: Task) -> None:
        """The CPU engine's work outside any task, which a measured profile prices (``host_*`` tasks): here it is
        the executor's own bookkeeping, already done; the task stays so the timeline matches the simulator's."""

    _host_layer = _host_moe_layer = _host_step

    def _embed(self, task: Task) -> None:
        ids = self.step.ids if self.side == "cpu" else self.get(task, "ids")
        self.v.put(task, "h", self.side, F.embedding(ids, self.w("model.embed_tokens.weight")).float())

    def _norm(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        bias = self.w(f"{prefix}.bias") if self.spec.norm_kind == "layer" else None
        return apply_norm(self.spec, x, self.w(f"{prefix}.weight"), bias)

    def _residual(self, task: Task, resid: str, delta: str | None) -> torch.Tensor:
        h = self.get(task, resid)
        return h if delta is None else h + self.get(task, delta)

    def _attn_norm(self, task: Task) -> None:
        layer = task.layer
        if layer == 0:
            h = self._residual(task, "h", None)
        else:
            h = self._residual(task, f"L{layer - 1}.hm", f"L{layer - 1}.y")
        self.v.put(task, f"L{layer}.h", self.side, h)
        self.v.put(task, f"L{layer}.xa", self.side, self._norm(f"model.layers.{layer}.input_layernorm", h))

    def _ffn_norm(self, task: Task) -> None:
        layer = task.layer
        h = self._residual(task, f"L{layer}.h", f"L{layer}.ao")
        self.v.put(task, f"L{layer}.hm", self.side, h)
        self.v.put(task, f"L{layer}.xf", self.side, self._norm(f"model.layers.{layer}.post_attention_layernorm", h))

    def _final_norm(self, task: Task) -> None:
        last, st = self.spec.n_layers - 1, self.step
        h = self._residual(task, f"L{last}.hm", f"L{last}.y")
        if st.head_rows != "all":
            h = h.view(st.batch, st.tokens, -1)[:, -1]
        self.v.put(task, "xo", self.side, self._norm("model.norm", h))

    def _attn_qkv(self, task: Task) -> None:
        s, layer = self.spec, task.layer
        x = self.get(task, f"L{layer}.xa")
        width = (s.n_heads + 2 * s.n_kv_heads) * s.head_dim
        out = self._rows_out(task, f"L{layer}.qkv", width)
        r0, r1 = task.rows
        if self.side == "cpu":
            for p, a, b, off in qkv_runs(s, layer, r0, r1):
                bias = self.weights[f"{p}.bias"][a:b].float() if s.qkv_bias else None
                out[:, off + a:off + b] = F.linear(x, self.weights[f"{p}.weight"][a:b].float(), bias)
            return
        pc = self.pieces(task, f"L{layer}.attn_qkv")
        out[:, r0:r1] = F.linear(x, pc["w"].float(), pc["b"].float() if "b" in pc else None)

    def _attention(self, task: Task) -> None:
        s, layer, st = self.spec, task.layer, self.step
        b, t = st.batch, st.tokens
        qkv = self.get(task, f"L{layer}.qkv").view(b, t, -1)
        q_out, kv_out = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        q = qkv[..., :q_out].reshape(b, t, s.n_heads, s.head_dim).transpose(1, 2)
        k = qkv[..., q_out:q_out + kv_out].reshape(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = qkv[..., q_out + kv_out:].reshape(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        cos, sin = st.cos[self.side], st.sin[self.side]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kc, vc = self.kv[layer]
        end = st.start + t
        kc[:, :, st.start:end] = k
        vc[:, :, st.start:end] = v
        if t == 1 and self.side == "gpu":  # one query per sequence: attention_decode.cu (or its twin)
            o = self.ops.attention_decode(q[:, :, 0].contiguous(), kc, vc, end, s.sliding_window)[:, :, None]
        else:
            o = causal_attention(q, kc[:, :, :end], vc[:, :, :end], st.start, s.sliding_window)
        self.v.put(task, f"L{layer}.o", self.side, o.transpose(1, 2).reshape(b * t, q_out))

    def _attn_o(self, task: Task) -> None:
        layer, (r0, r1) = task.layer, task.rows
        o = self.get(task, f"L{layer}.o")[:, r0:r1]
        name = f"model.layers.{layer}.self_attn.o_proj"
        if self.side == "cpu":
            y = F.linear(o, self.weights[f"{name}.weight"][:, r0:r1].float())
        else:
            y = o @ self.pieces(task, f"L{layer}.attn_o")["wT"].float()
        if r0 == 0 and self.spec.o_bias:
            y = y + self.w(f"{name}.bias").float()
        acc = self.v.accumulate(task, f"L{layer}.ao", self.side, y)
        acc += y

    def _router(self, task: Task) -> None:
        layer = task.layer
        x = self.get(task, f"L{layer}.xf")
        logits = F.linear(x, self.w(f"{self.spec.moe_prefix(layer)}.gate.weight").float())
        self.v.put(task, f"L{layer}.route", self.side, route_logits(self.spec, logits))

    def _swiglu(self, task: Task, block: str, tensors: tuple[str, str, str], x: torch.Tensor) -> torch.Tensor:
        """The slice ``task.rows`` of a SwiGLU block on ``x`` [n, H] -> [n, H] f32."""
        if self.side == "cpu":
            ew = self._experts.get(block)
            if ew is None:
                ew = self._experts[block] = ExpertWeights.from_torch(*(self.weights[t] for t in tensors))
            return torch.from_numpy(expert_rows(x.contiguous(), ew, rows=task.rows))
        pc = self.pieces(task, block)
        out = torch.zeros_like(x)
        return self.ops.expert_swiglu(x.contiguous(), pc["w1"], pc["w3"], pc["w2T"].t().contiguous(), out)

    def _ffn_tensors(self, prefix: str, names: tuple[str, str, str]) -> tuple[str, str, str]:
        return tuple(f"{prefix}.{n}.weight" for n in names)  # type: ignore[return-value]

    def _expert(self, task: Task) -> None:
        layer, e, s = task.layer, task.expert, self.spec
        x = self.get(task, f"L{layer}.xf")
        weights, experts = self.get(task, f"L{layer}.route")
        if self.side == "cpu":
            token, slot = torch.where(experts == e)
        else:  # the count is known on the host (the executor read the routing): no device-to-host sync here
            k = experts.shape[1]
            flat = torch.nonzero_static((experts == e).flatten(), size=self.counts[layer][e])[:, 0]
            token, slot = flat // k, flat % k
        tensors = self._ffn_tensors(f"{s.moe_prefix(layer)}.experts.{e}", s.expert_names())
        y = self._swiglu(task, f"L{layer}.expert{e}", tensors, x[token])
        y = y * weights[token, slot, None].to(x.dtype)
        acc = self.v.accumulate(task, f"L{layer}.y", self.side, x)
        acc.index_add_(0, token, y)

    def _dense_swiglu(self, task: Task, prefix: str, block: str, value: str) -> None:
        """A slice of an unrouted SwiGLU block (a dense FFN, Qwen's shared expert) added into ``value``."""
        x = self.get(task, f"L{task.layer}.xf")
        y = self._swiglu(task, block, self._ffn_tensors(prefix, ("gate_proj", "up_proj", "down_proj")), x)
        acc = self.v.accumulate(task, value, self.side, y)
        acc += y

    def _ffn(self, task: Task) -> None:
        layer = task.layer
        self._dense_swiglu(task, f"model.layers.{layer}.mlp", f"L{layer}.ffn", f"L{layer}.y")

    def _shared_expert(self, task: Task) -> None:
        layer = task.layer
        self._dense_swiglu(task, f"{self.spec.moe_prefix(layer)}.shared_expert", f"L{layer}.shared_expert",
                           f"L{layer}.s")

    def _shared_gate(self, task: Task) -> None:
        layer = task.layer
        x = self.get(task, f"L{layer}.xf")
        gate = torch.sigmoid(F.linear(x, self.w(f"{self.spec.moe_prefix(layer)}.shared_expert_gate.weight").float()))
        y = gate * self.get(task, f"L{layer}.s")
        acc = self.v.accumulate(task, f"L{layer}.y", self.side, y)
        acc += y

    def _lm_head(self, task: Task) -> None:
        s = self.spec
        x = self.get(task, "xo")
        out = self._rows_out(task, "logits", s.vocab_size)
        r0, r1 = task.rows
        if self.side == "cpu":
            name = "model.embed_tokens" if s.tie_word_embeddings else "lm_head"
            bias = self.weights["lm_head.bias"][r0:r1].float() if "lm_head.bias" in self.weights else None
            out[:, r0:r1] = F.linear(x, self.weights[f"{name}.weight"][r0:r1].float(), bias)
            return
        pc = self.pieces(task, "lm_head")
        out[:, r0:r1] = F.linear(x, pc["w"].float(), pc["b"].float() if "b" in pc else None)


__all__ = ["LaneMath", "Part", "StepInputs", "Values", "base_of", "is_concatenated"]
