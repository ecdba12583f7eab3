"""Plans: where every block of a model lives and runs, and whether a plan fits the GPU's memory.

A :class:`Plan` says, for every block of a :class:`~offloadkit.model.spec.ModelSpec`, how many of its
rows are **GG** (resident in GPU memory, computed by the GPU), where each layer's attention core and KV
cache live, and by which rule the host rows of a block are run at a step: on the CPU (**CC**) or
copied over PCIe and run on the GPU (**CG**) (docs/DESIGN.md section 3). The rule (``assign``) is
carried out by :class:`~offloadkit.plan.assign.TokenAssigner`, the one place that decides a step's
split. Blocks that are never split (norms, routers, the embedding table) count as one row.

The builders here are the plans a user knows already: :func:`all_cpu`, :func:`all_gpu` and
:func:`first_n_layers_on_gpu` (llama.cpp's ``-ngl N``, including its "op offload": at a step of
``>= 32`` tokens, the weights of CPU layers are copied to the GPU and multiplied there). The adaptive
partition (:mod:`offloadkit.plan.partition`) and the policies (:mod:`offloadkit.plan.policies`)
build plans of the same type.

``gpu_bytes`` estimates what a plan holds in GPU memory (resident weights + KV cache + activations
+ staging buffers); ``check_fits`` refuses a plan that does not fit, saying by how many bytes. The
activation estimate is offloadkit's own (the largest step's working set), not a measurement.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from offloadkit.errors import PlanError
from offloadkit.model.spec import Block, ModelSpec
from offloadkit.plan.costmodel import ACT_BYTES

#: llama.cpp offloads the matmuls of CPU layers to the GPU at batches of at least this many tokens
#: (``GGML_OP_OFFLOAD_MIN_BATCH``, default 32, in ggml-cuda).
LLAMACPP_OP_OFFLOAD_MIN_TOKENS = 32
#: llama.cpp's default physical batch (``n_ubatch``, ``-ub``): a prompt is evaluated in chunks of this many tokens.
LLAMACPP_UBATCH = 512
PLAN_FORMS = ("all-cpu", "all-gpu", "ngl:N")
#: How host rows run at a step (:class:`~offloadkit.plan.assign.TokenAssigner` carries each out):
#: ``cpu`` never streams; ``threshold`` streams all host rows of an op of ``>= stream_min_tokens`` tokens
#: (llama.cpp's op offload); ``fiddler`` runs each non-resident expert whole on the CPU or copies it whole,
#: by Fiddler's latency rule; ``balance`` is ScheInfer's token assignment (CC/CG split balancing the lanes).
ASSIGN_RULES = ("cpu", "threshold", "fiddler", "balance")


@dataclass(frozen=True)
class Workload:
    """What is asked of the model: ``batch`` sequences of ``prompt_tokens``, then ``gen_tokens`` steps."""

    prompt_tokens: int = 512
    gen_tokens: int = 128
    batch: int = 1

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "gen_tokens", "batch"):
            v = getattr(self, name)
            gen = name == "gen_tokens"  # 0 is prefill only (llama-bench -n 0)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < (0 if gen else 1):
                raise PlanError(f"workload {name} must be a {'non-negative' if gen else 'positive'} integer, "
                                f"got {v!r}" + (" (0 is prefill only)" if gen else ""))

    @property
    def max_len(self) -> int:
        """Positions the KV cache must hold."""
        return self.prompt_tokens + self.gen_tokens

    @property
    def label(self) -> str:
        """llama-bench style: ``pp512+tg128``, ``pp512`` when prefill only (``x B4`` for batches)."""
        return (f"pp{self.prompt_tokens}" + (f"+tg{self.gen_tokens}" if self.gen_tokens else "")
                + (f" x B{self.batch}" if self.batch > 1 else ""))


def head_block(spec: ModelSpec) -> Block:
    """The lm_head as a block split along the vocabulary; with tied embeddings, the embedding table's
    weight (a second copy of it where a plan puts the head on the GPU, as llama.cpp does)."""
    blocks = {b.kind: b for b in spec.blocks() if b.layer is None}
    head = blocks.get("lm_head")
    if head is not None and any(t.name == "lm_head.weight" for t in head.tensors):
        return head
    extra = head.tensors if head is not None else ()
    return Block("lm_head", None, blocks["embed"].tensors + extra, rows=spec.vocab_size)


def plan_blocks(spec: ModelSpec) -> Iterator[Block]:
    """The blocks a plan places: ``spec.blocks()`` with the lm_head from :func:`head_block`."""
    for b in spec.blocks():
        if b.kind != "lm_head":
            yield b
        if b.kind == "final_norm":
            yield head_block(spec)


def splittable(spec: ModelSpec) -> list[Block]:
    """The blocks a partition sizes: every row-split block of the layers, and the lm_head."""
    return [b for b in plan_blocks(spec) if b.rows and b.kind != "embed"]


def units(block: Block) -> int:
    """Rows of a block for placement: its split dimension, or 1 for blocks that are never split."""
    return block.rows or 1


@dataclass(frozen=True)
class Plan:
    """Where each block lives and runs; see the module docstring.

    ``gg_rows``: block name (``Block.name``, e.g. ``"L3.expert5"``) -> rows resident on the GPU
    (missing: 0). ``kv_on_gpu[l]``: layer ``l``'s attention core and KV cache are on the GPU.
    ``assign``: the rule for host rows (:data:`ASSIGN_RULES`); ``stream_min_tokens``: the ``threshold``
    rule's op size (giving it alone selects ``threshold``). ``staging_buffers``: GPU buffers for streamed
    weights (a copy waits until the compute that used the buffer before has finished). ``ubatch``: the
    prompt is run in chunks of this many tokens per sequence (``None``: all at once). ``serial``: no two
    lanes ever work at once (llama.cpp's graph runs one split after the other). ``pinned``: host weights
    are in page-locked memory (else copies run at the link's pageable rate).
    """

    policy: str
    gg_rows: Mapping[str, int] = field(hash=False)
    kv_on_gpu: tuple[bool, ...]
    label: str = ""
    stream_min_tokens: int | None = None
    staging_buffers: int = 1
    pinned: bool = True
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)
    assign: str = "cpu"
    ubatch: int | None = None
    serial: bool = False

    def __post_init__(self) -> None:
        if self.stream_min_tokens is not None and self.assign == "cpu":
            object.__setattr__(self, "assign", "threshold")
        if self.assign not in ASSIGN_RULES:
            raise PlanError(f"plan {self.name}: unknown assignment rule {self.assign!r}; "
                            f"the rules are {', '.join(ASSIGN_RULES)}")
        if self.assign == "threshold" and self.stream_min_tokens is None:
            raise PlanError(f"plan {self.name}: the threshold rule needs stream_min_tokens")
        if not (isinstance(self.staging_buffers, int) and self.staging_buffers >= 1):
            raise PlanError(f"plan {self.name}: staging_buffers must be an integer >= 1, got {self.staging_buffers!r}")
        if self.ubatch is not None and not (isinstance(self.ubatch, int) and self.ubatch >= 1):
            raise PlanError(f"plan {self.name}: ubatch must be a positive integer or None, got {self.ubatch!r}")

    def resident(self, block: Block) -> int:
        return self.gg_rows.get(block.name, 0)

    @property
    def streams(self) -> bool:
        """Whether host rows may ever be streamed (CG) under this plan's rule."""
        return self.assign != "cpu"

    @property
    def uses_gpu(self) -> bool:
        return any(self.gg_rows.values()) or any(self.kv_on_gpu) or self.streams

    def prefill_chunks(self, prompt_tokens: int) -> list[int]:
        """Tokens per sequence of each prefill step: the prompt cut into ``ubatch`` chunks."""
        u = self.ubatch or prompt_tokens
        return [min(u, prompt_tokens - i) for i in range(0, prompt_tokens, u)]

    @property
    def name(self) -> str:
        return self.label or self.policy


# ---- the plans of this issue -----------------------------------------------------------------------


def all_cpu(spec: ModelSpec) -> Plan:
    """Everything in host memory, computed by the CPU (a CPU-only llama.cpp)."""
    return Plan("cpu-only", {}, (False,) * spec.n_layers, label="all-cpu")


def all_gpu(spec: ModelSpec) -> Plan:
    """Everything resident on the GPU (only possible when the model fits)."""
    return Plan("gpu-only", {b.name: units(b) for b in plan_blocks(spec)}, (True,) * spec.n_layers, label="all-gpu")


def first_n_layers_on_gpu(spec: ModelSpec, n: int, *, op_offload: bool = True) -> Plan:
    """llama.cpp's ``-ngl n``: whole decoder layers on the GPU (their weights, attention and KV cache).

    ``n`` counts decoder layers; ``n = n_layers + 1`` also moves the final norm and lm_head (llama.cpp
    counts the output layer as one more layer). The embedding table stays in host memory, as in
    llama.cpp. llama.cpp fills the *last* layers first; which end is offloaded does not change a
    step's cost. With ``op_offload`` the CPU layers' weights are copied to the GPU at steps of
    ``>= 32`` tokens (llama.cpp's default since its op-offload change).
    """
    if not 0 <= n <= spec.n_layers + 1:
        raise PlanError(f"ngl must be between 0 and {spec.n_layers + 1} for {spec.name or spec.arch} "
                        f"({spec.n_layers} layers, +1 for the output layer), got {n}")
    on = {b.name: units(b) for b in plan_blocks(spec)
          if (b.layer is not None and b.layer < n) or (b.layer is None and b.kind != "embed" and n > spec.n_layers)}
    return Plan("llamacpp", on, tuple(layer < n for layer in range(spec.n_layers)), label=f"ngl:{n}",
                stream_min_tokens=LLAMACPP_OP_OFFLOAD_MIN_TOKENS if op_offload else None)


def llamacpp_plan(spec: ModelSpec, n: int) -> Plan:
    """llama.cpp as it runs by default: ``-ngl n`` with op offload, the prompt in ``n_ubatch = 512``
    chunks, one split after another (no two lanes at once), host weights memory-mapped (pageable)."""
    return replace(first_n_layers_on_gpu(spec, n), ubatch=LLAMACPP_UBATCH, serial=True, pinned=False)


def parse_plan(text: str, spec: ModelSpec) -> Plan:
    """``"all-cpu"``, ``"all-gpu"`` or ``"ngl:N"`` -> a :class:`Plan` of ``spec``; anything else is refused.

    Only these exact forms are accepted (``"ngl8"``, ``"NGL:8"``, ``"cpu"`` are refused, not guessed at).
    ``ngl:N`` counts as llama.cpp's ``-ngl N`` does: ``N = n_layers + 1`` is every layer and the output
    layer, and any larger ``N`` (``ngl:99``, llama.cpp users' "everything") means the same; the plan is
    then labelled ``ngl:<n_layers + 1>`` and ``plan.meta["note"]`` says what ``N`` became.
    """
    if text in ("all-cpu", "all-gpu"):
        return all_cpu(spec) if text == "all-cpu" else all_gpu(spec)
    m = re.fullmatch(r"ngl:(-?[0-9]+)", text)
    if m is None:
        raise PlanError(f"unknown plan {text!r}: the plans are {', '.join(PLAN_FORMS)} "
                        f"(N decoder layers on the GPU, e.g. ngl:8)")
    n, everything = int(m.group(1)), spec.n_layers + 1
    if n < 0:
        raise PlanError(f"plan {text!r}: ngl:N takes N >= 0 layers on the GPU (ngl:0 puts none there)")
    if n <= everything:
        return first_n_layers_on_gpu(spec, n)
    plan = first_n_layers_on_gpu(spec, everything)
    note = (f"{text} → all {spec.n_layers} layers + the output layer of {spec.name or spec.arch} "
            f"(ngl:{everything}), as in llama.cpp")
    return replace(plan, meta={**plan.meta, "requested": text, "note": note})


# ---- memory --------------------------------------------------------------------------------------


def gpu_bytes_breakdown(plan: Plan, spec: ModelSpec, workload: Workload) -> dict[str, int]:
    """Bytes the plan holds in GPU memory, by use: ``weights``, ``kv_cache``, ``activations``, ``staging``."""
    weights = staging = 0
    for b in plan_blocks(spec):
        nbytes = spec.bytes_of(b.params)
        u = units(b)
        gg = min(plan.gg_rows.get(b.name, 0), u)
        weights += nbytes * gg // u
        if plan.streams and b.rows and gg < u:
            staging = max(staging, nbytes * (u - gg) // u)
    staging *= plan.staging_buffers
    kv_layers = sum(plan.kv_on_gpu)
    kv = kv_layers * workload.max_len * workload.batch * spec.kv_bytes_per_token() // max(spec.n_layers, 1)
    acts = 0
    if plan.uses_gpu:
        t = workload.batch * min(workload.prompt_tokens, plan.ubatch or workload.prompt_tokens)
        h = spec.hidden_size
        q_out = spec.n_heads * spec.head_dim
        widest = max(spec.intermediate_size, spec.expert_intermediate_size, spec.shared_expert_intermediate_size)
        per_token = 4 * h + q_out + (q_out + 2 * spec.n_kv_heads * spec.head_dim) + 2 * widest
        scores = spec.n_heads * t * workload.max_len if kv_layers else 0  # one layer's attention scores
        acts = ACT_BYTES * (t * per_token + scores + workload.batch * spec.vocab_size)
    return {"weights": weights, "kv_cache": kv, "activations": acts, "staging": staging}


def gpu_bytes(plan: Plan, spec: ModelSpec, workload: Workload) -> int:
    """Resident weights + KV cache + activations + staging buffers, in bytes."""
    return sum(gpu_bytes_breakdown(plan, spec, workload).values())


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_fits(plan: Plan, spec: ModelSpec, profile: Any, workload: Workload) -> int:
    """Raise :class:`PlanError` unless the plan fits the profile's usable GPU memory; return the bytes left."""
    if not plan.uses_gpu:
        return getattr(profile.gpu, "usable_memory_bytes", 0) if profile.gpu is not None else 0
    if profile.gpu is None or profile.link is None:
        raise PlanError(f"plan {plan.name} uses a GPU but profile {profile.name!r} has none; "
                        f"use --plan all-cpu or a profile with a GPU")
    parts = gpu_bytes_breakdown(plan, spec, workload)
    need, have = sum(parts.values()), int(profile.gpu.usable_memory_bytes)
    if need > have:
        detail = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items() if v)
        raise PlanError(f"plan {plan.name} does not fit {profile.name}: it needs {need:,} bytes ({_gib(need)}: "
                        f"{detail}) but the GPU has {have:,} usable ({_gib(have)}); over by {need - have:,} bytes "
                        f"({_gib(need - have)}). " + ("Put fewer layers on the GPU (ngl:N) or shorten the workload."
                                                    if plan.policy == "llamacpp" else
                                                    "Keep fewer rows resident or shorten the workload."))
    return have - need


def max_ngl(spec: ModelSpec, profile: Any, workload: Workload) -> int:
    """The largest ``n`` for which :func:`first_n_layers_on_gpu` fits (llama.cpp users search this by hand)."""
    best = 0
    for n in range(spec.n_layers + 2):
        try:
            check_fits(first_n_layers_on_gpu(spec, n), spec, profile, workload)
        except PlanError:
            break
        best = n
    return best


__all__ = ["ASSIGN_RULES", "LLAMACPP_OP_OFFLOAD_MIN_TOKENS", "LLAMACPP_UBATCH", "Plan", "Workload", "all_cpu",
           "all_gpu", "check_fits", "first_n_layers_on_gpu", "gpu_bytes", "gpu_bytes_breakdown", "head_block",
           "llamacpp_plan", "max_ngl", "parse_plan", "plan_blocks", "splittable", "units"]
