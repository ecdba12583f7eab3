"""Build the task graph of one inference step from a model spec, a plan and the step's routing.

A step (a prefill chunk, or one decode step) runs the model's layers in order. For each block the
plan says how many rows are GG (GPU, resident); the :class:`~offloadkit.plan.assign.TokenAssigner`
splits the rest into CG (GPU, weights copied on ``h2d`` first) and CC (CPU): a layer's dense blocks
when the layer starts, its routed experts after its router (their copies depend on the router task).
The builder emits one compute task per non-empty slice, priced by the
:class:`~offloadkit.plan.costmodel.CostModel`, streamed experts first, most tokens first:

    embed -> per layer: attn_norm, attn_qkv, attention (where the KV cache is), attn_o, ffn_norm,
             router, one task per expert with tokens (or the dense ffn), shared expert + gate (Qwen)
          -> final_norm, lm_head (last position of each sequence) -> logits back on the CPU

Where the cost model prices offloadkit's CPU engine from a measured profile (``cost.cpu_lane``), the
``cpu`` lane also gets the engine's work outside any task as tasks of their own (``host_step`` first,
``host_layer`` / ``host_moe_layer`` after each layer), and a plan whose ``meta["logits"]`` is ``"all"``
computes the final norm and lm_head for every position (as an engine asked for all logits does).

Norms fuse the previous residual add (``h + attn_out``, ``h + ffn_out``), as fast engines do.
Data movement is derived, not declared: every value (``"L3.xf"``, ``"L3.y"``...) remembers on which
device its parts were written, and a task that needs it on the other device gets an ``activation``
copy on ``h2d``/``d2h`` first (one per part and device, reused by later readers). Partial results of
slices (``ao``, ``y``: summed; ``qkv``, ``logits``: concatenated) keep one part per device.

Weight copies of CG slices wait for a free staging buffer: with ``plan.staging_buffers = k`` the
``i``-th copy waits until the compute that used copy ``i - k`` has finished (k = 1: no overlap of a
copy with the compute of the previous streamed slice, as llama.cpp's op offload). A ``serial`` plan
(llama.cpp) makes every task wait for the one issued before it: no two lanes ever work at once.

It refuses nothing on its own: plans are checked by ``check_fits``; the graph is valid by construction
(tasks only depend on earlier tasks). ``on_task`` lets an executor run each task as it is issued,
and ``counts(layer)`` is asked for the routing *after* the layer's router task was issued, so a
numerics executor can answer with the router's real choices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from offloadkit.model.spec import Block, ModelSpec
from offloadkit.plan.assign import SLICE_LAUNCHES, TokenAssigner
from offloadkit.plan.costmodel import ACT_BYTES, CostModel
from offloadkit.plan.plans import Plan
from offloadkit.runtime.tasks import WRITES_ON, Task, TaskGraph

#: Kernel launches (GPU) or calls (CPU) per task kind: each pays the lane's overhead.
LAUNCHES = {"embed": 1, "attn_norm": 1, "attention": 3, "ffn_norm": 1, "router": 2, "shared_gate": 2,
            "final_norm": 1, **SLICE_LAUNCHES}
DEVICE_LANE = {"cpu": "cpu", "gpu": "gpu"}
COPY_LANE = {"gpu": "h2d", "cpu": "d2h"}  # lane of a copy *to* this device


@dataclass(frozen=True)
class StepShape:
    """One step: ``tokens`` new tokens per sequence after ``past`` cached positions, ``batch`` sequences."""

    step: int
    tokens: int
    past: int
    batch: int = 1

    @property
    def n(self) -> int:
        return self.tokens * self.batch


class _Part:
    """The slice of a value written on one device (several writers accumulate into it)."""

    __slots__ = ("name", "device", "nbytes", "producers", "copies")

    def __init__(self, name: str, device: str) -> None:
        self.name, self.device, self.nbytes = name, device, 0
        self.producers: list[int] = []
        self.copies: dict[str, int] = {}


@dataclass(frozen=True)
class LayerBlocks:
    """The blocks of one layer by role; a role the layer lacks is ``None`` (or no experts).

    Dense layers (LLaMA, Qwen's ``mlp_only_layers``) have ``ffn``; MoE layers have ``router`` and
    ``experts`` (indexed by expert id), and Qwen-MoE adds ``shared_expert`` and ``shared_gate``.
    """

    attn_norm: Block
    attn_qkv: Block
    attn_o: Block
    ffn_norm: Block
    ffn: Block | None = None
    router: Block | None = None
    experts: tuple[Block, ...] = ()
    shared_expert: Block | None = None
    shared_gate: Block | None = None

    @classmethod
    def of(cls, spec: ModelSpec, layer: int) -> LayerBlocks:
        """Group ``spec.layer_blocks(layer)`` by kind."""
        by_kind: dict[str, Block] = {}
        experts: list[Block] = []
        for b in spec.layer_blocks(layer):
            if b.kind == "expert":
                experts.append(b)
            else:
                by_kind[b.kind] = b
        return cls(experts=tuple(experts), **by_kind)


def layer_blocks(spec: ModelSpec) -> list[LayerBlocks]:
    """:class:`LayerBlocks` of every layer, in order."""
    return [LayerBlocks.of(spec, layer) for layer in range(spec.n_layers)]


class StepBuilder:
    """Emits one step's tasks into ``graph``; see the module docstring."""

    def __init__(self, spec: ModelSpec, plan: Plan, cost: CostModel, shape: StepShape,
                 on_task: Callable[[Task], None] | None = None,
                 blocks: list[LayerBlocks] | None = None, assigner: TokenAssigner | None = None) -> None:
        self.spec, self.plan, self.cost, self.shape, self.on_task = spec, plan, cost, shape, on_task
        self.blocks = blocks if blocks is not None else layer_blocks(spec)
        self.assigner = assigner if assigner is not None else TokenAssigner(spec, plan, cost)
        self.graph = TaskGraph()
        self.values: dict[str, dict[str, _Part]] = {}
        self.weight_users: list[int] = []
        self._head = self.assigner.head_blocks

    # ---- primitives ---------------------------------------------------------------------------------

    def emit(self, lane: str, kind: str, name: str, dur: float, *, layer: int | None = None, bytes_: float = 0,
             flops: float = 0, deps: Sequence[int] = (), reads: Sequence[str] = (), expert: int | None = None,
             rows: tuple[int, int] | None = None, out: Sequence[tuple[str, float, bool]] = ()) -> int:
        """Append a task; ``out`` = (value, bytes, concatenated?) it writes on its lane's device."""
        tid = len(self.graph.tasks)
        if self.plan.serial and tid:
            deps = (*deps, tid - 1)
        device = WRITES_ON[lane]
        writes = []
        for value, nbytes, cat in out:
            parts = self.values.setdefault(value, {})
            part = parts.get(device)
            if part is None:
                part = parts[device] = _Part(f"{value}@{device}", device)
            part.producers.append(tid)
            part.nbytes = part.nbytes + int(nbytes) if cat else max(part.nbytes, int(nbytes))
            writes.append(part.name)
        task = Task(tid, lane, kind, name, layer, int(bytes_), int(flops), tuple(dict.fromkeys(deps)), dur, expert,
                    rows, tuple(reads), tuple(writes))
        self.graph.append(task)
        if self.on_task is not None:
            self.on_task(task)
        return tid

    def need(self, values: Sequence[str], device: str, layer: int | None) -> tuple[list[int], list[str]]:
        """Dependencies and part names that make ``values`` present on ``device`` (emitting copies)."""
        deps: list[int] = []
        reads: list[str] = []
        for value in values:
            for part in self.values.get(value, {}).values():
                if part.device == device:
                    deps.extend(part.producers)
                else:
                    cid = part.copies.get(device)
                    if cid is None:
                        lane = COPY_LANE[device]
                        cid = self.emit(lane, "activation", f"{part.name}>{device}",
                                        self.cost.copy_s(lane, part.nbytes), layer=layer, bytes_=part.nbytes,
                                        deps=part.producers, reads=(part.name,))
                        self.graph.tasks[cid].writes = (part.name,)
                        part.copies[device] = cid
                    deps.append(cid)
                reads.append(part.name)
        return deps, reads

    def device_of(self, block: Block) -> str:
        return "gpu" if self.plan.resident(block) else "cpu"

    # ---- blocks -------------------------------------------------------------------------------------

    def small(self, block: Block, kind: str, name: str, ins: Sequence[str], outs: Sequence[tuple[str, float]],
              bytes_: float, flops: float, norm: bool = False, rows: int | None = None) -> int:
        """An unsplit block (norm, router, gate, embedding) on the device that holds it (``rows``: of a norm,
        default the step's tokens)."""
        dev = self.device_of(block)
        deps, reads = self.need(ins, dev, block.layer)
        n = self.shape.n if rows is None else rows
        engine = self.cost.cpu_task_s(kind, n, block.params) if dev == "cpu" else None
        if engine is not None:
            dur = engine
        elif norm:
            dur = self.cost.norm_s(dev, n, self.spec.hidden_size, LAUNCHES[kind])
        else:
            dur = self.cost.roofline_s(dev, bytes_, flops, LAUNCHES[kind])
        return self.emit(dev, kind, name, dur, layer=block.layer, bytes_=bytes_, flops=flops, deps=deps,
                         reads=reads, out=[(v, b, False) for v, b in outs])

    def split_block(self, block: Block, kind: str, name: str, tokens: int, ins: Sequence[str], out: str,
                    out_bytes_per_row: float, cat: bool, act_bytes: float, expert: int | None = None,
                    cg: int = 0, after: int | None = None, only: tuple[str, ...] = ("gg", "cg", "cc")) -> None:
        """A row-splittable block (QKV, O, expert, FFN, lm_head) as its GG / CG / CC slices; ``cg`` streamed
        rows (from the assigner); ``after``: the task the CG copy must wait for (the router that chose it);
        ``only``: the slices to emit now (a layer issues its experts' resident slices before the streamed ones,
        so that resident work never queues behind a copy on the gpu lane)."""
        gg = min(self.plan.gg_rows.get(block.name, 0), block.rows)
        cg = min(cg, block.rows - gg)
        cc = block.rows - gg - cg
        per_row = block.params / block.rows
        pieces = [(p, r0, r0 + size) for p, r0, size in (("gg", 0, gg), ("cg", gg, cg), ("cc", gg + cg, cc)) if size]
        for piece, r0, r1 in pieces:
            if piece not in only:
                continue
            dev = "cpu" if piece == "cc" else "gpu"
            pname = name if len(pieces) == 1 else f"{name}.{piece}"
            deps, reads = self.need(ins, dev, block.layer)
            if piece == "cg":
                deps.append(self.stream_weights(block, pname, (r0, r1), after))
                reads.append(f"W:{pname}")
            params = int(per_row * (r1 - r0))
            bytes_ = params * self.cost.weight_bytes + act_bytes
            engine = self.cost.cpu_task_s(kind, tokens, params) if dev == "cpu" else None
            dur = engine if engine is not None else self.cost.matmul_s(dev, params, tokens, act_bytes, LAUNCHES[kind])
            out_bytes = out_bytes_per_row * (r1 - r0) if cat else out_bytes_per_row
            tid = self.emit(dev, kind, pname, dur, layer=block.layer, bytes_=bytes_, flops=2 * params * tokens,
                            deps=deps, reads=reads, expert=expert, rows=(r0, r1), out=[(out, out_bytes, cat)])
            if piece == "cg":
                self.weight_users.append(tid)

    def stream_weights(self, block: Block, pname: str, rows: tuple[int, int], after: int | None = None) -> int:
        """The h2d copy of rows ``rows`` of a CG slice's weights, waiting for a free staging buffer (and ``after``)."""
        nbytes = self.spec.bytes_of(block.params) * (rows[1] - rows[0]) // block.rows
        k = self.plan.staging_buffers
        deps = [self.weight_users[-k]] if len(self.weight_users) >= k else []
        if after is not None:
            deps.append(after)
        tid = self.emit("h2d", "weights", f"{pname}.w", self.cost.copy_s("h2d", nbytes, self.plan.pinned),
                        layer=block.layer, bytes_=nbytes, deps=deps, expert=block.expert, rows=rows)
        self.graph.tasks[tid].writes = (f"W:{pname}",)
        return tid

    # ---- the step -------------------------------------------------------------------------------------

    def build(self, counts: Callable[[int], Sequence[int]]) -> TaskGraph:
        resid, delta = self.prologue(), None
        for layer in range(self.spec.n_layers):
            resid, delta = self.layer(layer, resid, delta, counts)
        self.epilogue(resid, delta)
        return self.graph

    def host(self, kind: str, name: str, layer: int | None) -> None:
        """The CPU engine's work outside any task (``host_step``, ``host_layer``, ``host_moe_layer``), where
        the cost model prices the engine (else nothing)."""
        dur = self.cost.cpu_task_s(kind, self.shape.n)
        if dur is not None:
            self.emit("cpu", kind, name, dur, layer=layer)

    def head_rows(self) -> int:
        """Positions the final norm and lm_head compute: the last of each sequence, or all (``meta["logits"]``)."""
        return self.shape.n if self.plan.meta.get("logits") == "all" else self.shape.batch

    def prologue(self) -> str:
        """The step's token ids on the host and their embedding lookup; returns the residual's name."""
        s, n, a = self.spec, self.shape.n, ACT_BYTES
        h = s.hidden_size
        self.host("host_step", "host_step", None)
        self.values.setdefault("ids", {"cpu": _Part("ids@cpu", "cpu")})["cpu"].nbytes = 8 * n
        embed = self._head["embed"]
        self.small(embed, "embed", "embed", ["ids"], [("h", n * h * a)], n * h * (self.cost.weight_bytes + a), 0)
        return "h"

    def epilogue(self, resid: str, delta: str | None) -> None:
        """The final norm, the lm_head (last position of each sequence) and the logits' copy to the host."""
        s, a, b = self.spec, ACT_BYTES, self.head_rows()
        h = s.hidden_size
        self.small(self._head["final_norm"], "final_norm", "final_norm", [resid, delta],
                   [("xo", b * h * a)], 0, 0, norm=True, rows=b)
        self.split_block(self.assigner.head_block, "lm_head", "lm_head", b, ["xo"], "logits", b * a, True,
                         b * (h + s.vocab_size) * a, cg=self.assigner.head(b))
        self.need(["logits"], "cpu", None)  # sampling happens on the host

    def layer(self, layer: int, resid: str, delta: str | None,
              counts: Callable[[int], Sequence[int]]) -> tuple[str, str]:
        s, sh, a = self.spec, self.shape, ACT_BYTES
        n, h, L = sh.n, s.hidden_size, f"L{layer}"
        b = self.blocks[layer]
        dense = self.assigner.dense(layer, n)
        ins = [resid] if delta is None else [resid, delta]
        self.small(b.attn_norm, "attn_norm", f"{L}.attn_norm", ins, [(f"{L}.h", n * h * a), (f"{L}.xa", n * h * a)],
                   0, 0, norm=True)
        qkv = b.attn_qkv
        self.split_block(qkv, "attn_qkv", f"{L}.attn_qkv", n, [f"{L}.xa"], f"{L}.qkv", n * a, True,
                         n * (h + qkv.rows) * a, cg=dense.get(qkv.name, 0))
        dev = "gpu" if self.plan.kv_on_gpu[layer] else "cpu"
        deps, reads = self.need([f"{L}.qkv"], dev, layer)
        bytes_, flops = self.cost.attention_cost(sh.tokens, sh.past, sh.batch)
        q_out = s.n_heads * s.head_dim
        self.emit(dev, "attention", f"{L}.attention", self.cost.attention_s(dev, sh.tokens, sh.past, sh.batch,
                                                                           LAUNCHES["attention"]),
                  layer=layer, bytes_=bytes_, flops=flops, deps=deps, reads=reads,
                  out=[(f"{L}.o", n * q_out * a, False)])
        self.split_block(b.attn_o, "attn_o", f"{L}.attn_o", n, [f"{L}.o"], f"{L}.ao", n * h * a, False,
                         n * (q_out + h) * a, cg=dense.get(b.attn_o.name, 0))
        self.small(b.ffn_norm, "ffn_norm", f"{L}.ffn_norm", [f"{L}.h", f"{L}.ao"],
                   [(f"{L}.hm", n * h * a), (f"{L}.xf", n * h * a)], 0, 0, norm=True)
        y = f"{L}.y"
        if b.router is None:
            assert b.ffn is not None, f"layer {layer} has neither a router nor a dense FFN"
            self.split_block(b.ffn, "ffn", f"{L}.ffn", n, [f"{L}.xf"], y, n * h * a, False, 2 * n * h * a,
                             cg=dense.get(b.ffn.name, 0))
            self.host("host_layer", f"{L}.host", layer)
            return f"{L}.hm", y
        router = b.router
        rid = self.small(router, "router", f"{L}.router", [f"{L}.xf"], [(f"{L}.route", n * s.top_k * 12)],
                         router.params * self.cost.weight_bytes + n * h * a, 2 * n * router.params)
        c_list = [int(c) for c in counts(layer)]
        s_shared, cg = self.assigner.moe(layer, n, c_list)
        active = sorted((e for e, c in enumerate(c_list) if c), key=lambda e: (not cg[e], -c_list[e], e))
        shared = b.shared_expert if b.shared_gate is not None else None
        for only in (("gg",), ("cg", "cc")):  # resident slices first: they never queue behind a copy
            if shared is not None:  # needs no routing: first of each kind
                self.split_block(shared, "shared_expert", f"{L}.shared_expert", n, [f"{L}.xf"], f"{L}.s",
                                 n * h * a, False, 2 * n * h * a, cg=s_shared, after=rid, only=only)
            for e in active:
                self.split_block(b.experts[e], "expert", f"{L}.expert{e}", c_list[e], [f"{L}.xf", f"{L}.route"], y,
                                 n * h * a, False, 2 * c_list[e] * h * a, expert=e, cg=cg[e], after=rid, only=only)
        if b.shared_expert is not None and b.shared_gate is not None:
            gate = b.shared_gate
            self.small(gate, "shared_gate", f"{L}.shared_gate", [f"{L}.xf", f"{L}.s"], [(y, n * h * a)],
                       gate.params * self.cost.weight_bytes + 2 * n * h * a, 2 * n * gate.params + 2 * n * h)
        self.host("host_moe_layer", f"{L}.host", layer)
        return f"{L}.hm", y


def build_step(spec: ModelSpec, plan: Plan, cost: CostModel, shape: StepShape,
               counts: Callable[[int], Sequence[int]] | Sequence[Sequence[int]],
               on_task: Callable[[Task], None] | None = None, assigner: TokenAssigner | None = None) -> TaskGraph:
    """The task graph of one step; ``counts`` is ``layer -> tokens per expert`` or a [layers][experts] table."""
    table = counts
    fn = table if callable(table) else (lambda layer: table[layer])
    return StepBuilder(spec, plan, cost, shape, on_task, assigner=assigner).build(fn)


__all__ = ["LAUNCHES", "LayerBlocks", "StepBuilder", "StepShape", "build_step", "layer_blocks"]
