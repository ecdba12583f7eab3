"""The CPU engine's weights in kernel storage: views made once per layer, pages mapped, fixed costs counted.

:class:`~offloadkit.runtime.cpu_engine.CpuEngine` runs every forward over numpy views of the checkpoint's
tensors in the storage the kernels read (uint16 bits for bf16, f32 as it is), never converting a weight
on the hot path. This module prepares them, once, the first time a layer is used:

- :class:`HostWeights` hands out views (``stored``), f32 copies of the small tensors (norms, biases),
  :class:`~offloadkit.kernels.cpu.experts.ExpertWeights`, and a whole :class:`LayerWeights`;
- :func:`map_pages` maps a layer's pages into the process when it is prepared (``MADV_POPULATE_READ``),
  as llama.cpp's ``MAP_POPULATE`` does for its whole file, so the first decode steps do not fault;
- a :class:`LayerWeights` also carries its tasks' bytes and parameters (for the measured timeline's
  records) and, where the layer can run as one compiled call, the call's fixed arguments
  (:meth:`HostWeights.fused_args`) and its parallel chunk counts (:meth:`HostWeights.fused_chunks`).

It refuses nothing itself: the checkpoint was checked when it was opened, and the kernels' storage
rules are :func:`~offloadkit.kernels.cpu.primitives.storage_view`'s.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from numba.typed import List as NumbaList

from offloadkit.kernels.cpu.decode import _chunks
from offloadkit.kernels.cpu.experts import ExpertWeights
from offloadkit.kernels.cpu.primitives import storage_view
from offloadkit.model.spec import ModelSpec

_EMPTY = np.zeros(0, dtype=np.float32)
_FFN_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class NormWeights:
    weight: np.ndarray
    bias: np.ndarray | None  # LayerNorm's; None for RMSNorm


@dataclass
class LayerWeights:
    """One decoder layer's weights in kernel storage (views, made once) and its tasks' fixed costs."""

    attn_norm: NormWeights
    ffn_norm: NormWeights
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    qkv_bias: np.ndarray | None
    o_bias: np.ndarray | None
    qkv_bytes: int
    qkv_params: int
    o_bytes: int
    o_params: int
    router: np.ndarray | None = None
    experts: list[ExpertWeights] | None = None
    shared: ExpertWeights | None = None
    shared_gate: np.ndarray | None = None
    dense: ExpertWeights | None = None
    fused: tuple | None = None  # the per-layer arguments of decode_layer, when the layer can take it
    chunks: dict[tuple[int, int], tuple[int, int, int, int]] | None = None  # (threads, n) -> chunk counts

    def ffns(self) -> list[ExpertWeights]:
        """Every SwiGLU block of the layer: routed experts, the dense FFN, the shared expert."""
        return (self.experts or []) + [f for f in (self.dense, self.shared) if f is not None]


# ---- mapping pages ---------------------------------------------------------------------------------

_MADV_POPULATE_READ = 22  # Linux >= 5.14: map the pages of a range now, reading them in if needed
_PAGE = 4096


@functools.cache
def _madvise() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def map_pages(arrays: Iterable[np.ndarray]) -> None:
    """Map every page of ``arrays`` into the process now (``madvise(MADV_POPULATE_READ)``, else a read of
    one byte per page), so that the first forwards do not take page faults on a memory-mapped checkpoint.

    A page of a memory-mapped file is mapped into the process at its first touch: a decode step that
    meets an expert (or an embedding row) for the first time faulted on its pages, 35-250 µs per token
    measured here for the embedding alone. llama.cpp maps its whole file with ``MAP_POPULATE`` for the
    same reason (src/llama-mmap.cpp); the engine does it per layer when it first prepares the layer.
    """
    madvise = _madvise()
    for a in arrays:
        if a.size == 0:
            continue
        if madvise is not None:
            start = a.ctypes.data // _PAGE * _PAGE
            if madvise(start, a.ctypes.data + a.nbytes - start, _MADV_POPULATE_READ) == 0:
                continue
        flat = a.reshape(-1).view(np.uint8)
        int(flat[::_PAGE].sum())


# ---- the store ---------------------------------------------------------------------------------------


class HostWeights:
    """Kernel-storage views of ``weights`` (any mapping of torch tensors), made on first use and kept."""

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], names: Mapping[str, object]) -> None:
        self.spec, self.weights, self.names = spec, weights, names
        self._store: dict[str, np.ndarray] = {}
        self._experts: dict[str, ExpertWeights] = {}
        self._f32s: dict[str, np.ndarray] = {}
        self.layers: dict[int, LayerWeights] = {}

    def stored(self, name: str) -> np.ndarray:
        """The tensor ``name`` in kernel storage (a view)."""
        if name not in self._store:
            self._store[name] = storage_view(self.weights[name], name)[0]
        return self._store[name]

    def is_stored(self, name: str) -> bool:
        return name in self._store

    def expert_weights(self, prefix: str, names: tuple[str, str, str]) -> ExpertWeights:
        if prefix not in self._experts:
            self._experts[prefix] = ExpertWeights.from_torch(*(self.weights[f"{prefix}.{n}.weight"] for n in names))
        return self._experts[prefix]

    def f32(self, name: str) -> np.ndarray:
        """A small tensor (a norm's weight, a bias) widened to f32 once."""
        if name not in self._f32s:
            self._f32s[name] = self.weights[name].float().contiguous().numpy()
        return self._f32s[name]

    def f32_opt(self, name: str) -> np.ndarray | None:
        return self.f32(name) if name in self.names else None

    def norm_weights(self, prefix: str) -> NormWeights:
        return NormWeights(self.f32(f"{prefix}.weight"),
                           self.f32(f"{prefix}.bias") if self.spec.norm_kind == "layer" else None)

    def nbytes(self, *names: str) -> int:
        return sum(self.weights[n].numel() * self.weights[n].element_size() for n in names if n in self.names)

    def numel(self, *names: str) -> int:
        return sum(self.weights[n].numel() for n in names if n in self.names)

    def layer(self, layer: int, fusable: bool) -> LayerWeights:
        """Layer ``layer``'s :class:`LayerWeights` (made, and its pages mapped, on first use). ``fusable``: the
        engine can time a one-call layer (it has a steady cycle counter)."""
        if layer in self.layers:
            return self.layers[layer]
        s, p = self.spec, f"model.layers.{layer}"
        a = f"{p}.self_attn"
        biases = [self.f32_opt(f"{a}.{x}_proj.bias") for x in "qkv"]
        if any(b is not None for b in biases):
            sizes = (s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_kv_heads * s.head_dim)
            qkv_bias = np.concatenate([b if b is not None else np.zeros(n, np.float32)
                                       for b, n in zip(biases, sizes, strict=True)])
        else:
            qkv_bias = None
        qkv_names = [f"{a}.{x}_proj.{k}" for x in "qkv" for k in ("weight", "bias")]
        o_names = [f"{a}.o_proj.{k}" for k in ("weight", "bias")]
        wq, wk, wv, wo = (self.stored(f"{a}.{x}_proj.weight") for x in "qkvo")
        lw = LayerWeights(self.norm_weights(f"{p}.input_layernorm"), self.norm_weights(f"{p}.post_attention_layernorm"),
                          wq, wk, wv, wo, qkv_bias, self.f32_opt(f"{a}.o_proj.bias"), self.nbytes(*qkv_names),
                          self.numel(*qkv_names), self.nbytes(*o_names), self.numel(*o_names))
        if s.is_moe_layer(layer):
            m = s.moe_prefix(layer)
            lw.router = self.stored(f"{m}.gate.weight")
            lw.experts = [self.expert_weights(f"{m}.experts.{e}", s.expert_names()) for e in range(s.n_experts)]
            if s.shared_expert_intermediate_size:
                lw.shared = self.expert_weights(f"{m}.shared_expert", _FFN_NAMES)
                lw.shared_gate = self.stored(f"{m}.shared_expert_gate.weight")
        else:
            lw.dense = self.expert_weights(f"{p}.mlp", _FFN_NAMES)
        lw.fused = self.fused_args(lw) if fusable else None
        lw.chunks = {}
        map_pages([lw.wq, lw.wk, lw.wv, lw.wo, *(m for f in lw.ffns() for m in (f.w_gate, f.w_up, f.w_down))])
        self.layers[layer] = lw
        return lw

    def fused_args(self, lw: LayerWeights) -> tuple | None:
        """The arguments of :func:`~offloadkit.kernels.cpu.decode_layer.decode_layer` that do not change
        between steps, or None where the layer needs the separate path (sparsemixer routing, mixed dtypes)."""
        s = self.spec
        ffns = lw.experts if lw.dense is None else [lw.dense]
        mats = [lw.wq, lw.wk, lw.wv, lw.wo] + [m for ew in ffns for m in (ew.w_gate, ew.w_up, ew.w_down)]
        if lw.dense is None:
            mats.append(lw.router)
        if lw.shared is not None:
            mats += [lw.shared.w_gate, lw.shared.w_up, lw.shared.w_down, lw.shared_gate]
        if s.router == "sparsemixer" or len({m.dtype for m in mats}) != 1:
            return None
        dtype, hidden = lw.wq.dtype, s.hidden_size
        empty = np.zeros((0, hidden), dtype=dtype)
        norm_b = (lw.attn_norm.bias, lw.ffn_norm.bias) if lw.attn_norm.bias is not None else (_EMPTY, _EMPTY)
        shared = ((lw.shared.w_gate, lw.shared.w_up, lw.shared.w_down, lw.shared_gate) if lw.shared is not None
                  else (empty, empty, empty, empty))
        lists = [NumbaList([getattr(ew, a) for ew in ffns]) for a in ("w_gate", "w_up", "w_down")]
        return (norm_b, lw.qkv_bias if lw.qkv_bias is not None else _EMPTY,
                lw.o_bias if lw.o_bias is not None else _EMPTY, lw.router if lw.dense is None else empty,
                *lists, *shared)

    @staticmethod
    def fused_chunks(lw: LayerWeights, n: int, threads: int) -> tuple[int, int, int, int]:
        """Parallel chunks (0: serial) of the QKV, O, gate/up and down passes for ``n`` tokens."""
        key = (threads, n)
        if key not in lw.chunks:
            ffn = lw.dense if lw.dense is not None else lw.experts[0]
            rows = lw.wq.shape[0] + lw.wk.shape[0] + lw.wv.shape[0]
            size = lw.wq.itemsize
            lw.chunks[key] = (_chunks(rows * lw.wq.shape[1] * size, rows, n, threads),
                              _chunks(lw.wo.size * size, lw.wo.shape[0], n, threads),
                              _chunks(2 * ffn.w_gate.size * size, ffn.intermediate, n, threads),
                              _chunks(ffn.w_down.size * size, ffn.hidden, n, threads))
        return lw.chunks[key]


__all__ = ["HostWeights", "LayerWeights", "NormWeights", "map_pages"]
