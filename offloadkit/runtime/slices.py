"""A weight slice as the GPU receives it: every splittable block's rows ``[r0, r1)`` as row-major pieces.

A CG slice travels over PCIe and a GG slice is uploaded once (docs/DESIGN.md section 3); both arrive on
the device as the same **pieces**, each with the slice's rows as its first dimension, so that any
sub-range of a block's host rows is one contiguous run of every piece (a pinned copy of a block's host
rows can then serve any CG split without a gather):

==================  =========================================================================
block kind          pieces (``s = r1 - r0`` rows, ``H`` the hidden size)
==================  =========================================================================
``attn_qkv``        ``w`` [s, H]: rows of the fused Q;K;V weight; ``b`` [s] with Qwen's bias
``attn_o``          ``wT`` [s, H]: columns ``r0:r1`` of O, transposed (O is split along its input)
``ffn``, experts    ``w1``, ``w3`` [s, H] (gate, up); ``w2T`` [s, H]: columns of the down projection,
                    transposed
``lm_head``         ``w`` [s, H] (the embedding table with tied embeddings); ``b`` [s] if it has a bias
==================  =========================================================================

The one tensor of a split block that is not split (O's bias) is not a piece: :func:`unsplit_tensors`
names it, and the executor keeps it whole on each side. :func:`host_pieces` gives the pieces as views
of the (memory-mapped) checkpoint where the layout allows and as copies where it does not (QKV rows that
cross from Q into K); :class:`PieceLayout` places them in one flat buffer, which is how staging buffers
hold them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from offloadkit.model.spec import Block, ModelSpec

SWIGLU_KINDS = ("ffn", "expert", "shared_expert")


def piece_names(spec: ModelSpec, block: Block) -> tuple[str, ...]:
    """The pieces of a slice of ``block`` (see the module docstring)."""
    if block.kind == "attn_qkv":
        return ("w", "b") if spec.qkv_bias else ("w",)
    if block.kind == "attn_o":
        return ("wT",)
    if block.kind in SWIGLU_KINDS:
        return ("w1", "w3", "w2T")
    if block.kind == "lm_head":
        return ("w", "b") if any(t.name == "lm_head.bias" for t in block.tensors) else ("w",)
    raise ValueError(f"block {block.name} ({block.kind}) is not split into rows")


def unsplit_tensors(block: Block) -> tuple[str, ...]:
    """Tensors of a split block that every slice needs whole (O's bias: added once, by the slice at row 0)."""
    return tuple(t.name for t in block.tensors if block.kind == "attn_o" and t.name.endswith(".bias"))


def qkv_runs(spec: ModelSpec, layer: int, r0: int, r1: int) -> list[tuple[str, int, int, int]]:
    """Rows ``[r0, r1)`` of layer ``layer``'s fused Q;K;V as runs ``(projection prefix, a, b, offset)``: rows
    ``a:b`` of that projection, landing at output column ``offset + a`` of the fused QKV."""
    s, out, off = spec, [], 0
    p = f"model.layers.{layer}.self_attn"
    for proj, size in (("q_proj", s.n_heads * s.head_dim), ("k_proj", s.n_kv_heads * s.head_dim),
                       ("v_proj", s.n_kv_heads * s.head_dim)):
        a, b = max(r0, off), min(r1, off + size)
        if a < b:
            out.append((f"{p}.{proj}", a - off, b - off, off))
        off += size
    return out


def host_pieces(spec: ModelSpec, weights: Mapping[str, torch.Tensor], block: Block, r0: int, r1: int
                ) -> dict[str, torch.Tensor]:
    """The pieces of rows ``[r0, r1)`` of ``block`` from host ``weights`` (views where possible)."""
    k = block.kind
    if k == "attn_qkv":
        runs = qkv_runs(spec, block.layer, r0, r1)  # type: ignore[arg-type]
        w = [weights[f"{p}.weight"][a:b] for p, a, b, _ in runs]
        out = {"w": w[0] if len(w) == 1 else torch.cat(w)}
        if spec.qkv_bias:
            bias = [weights[f"{p}.bias"][a:b] for p, a, b, _ in runs]
            out["b"] = bias[0] if len(bias) == 1 else torch.cat(bias)
        return out
    if k == "attn_o":
        return {"wT": weights[f"model.layers.{block.layer}.self_attn.o_proj.weight"][:, r0:r1].T}
    if k in SWIGLU_KINDS:
        w1, w3, w2 = (weights[t.name] for t in block.tensors)
        return {"w1": w1[r0:r1], "w3": w3[r0:r1], "w2T": w2[:, r0:r1].T}
    if k == "lm_head":
        names = [t.name for t in block.tensors]
        w = weights[next(n for n in names if n.endswith(".weight"))][r0:r1]
        out = {"w": w}
        if "lm_head.bias" in names:
            out["b"] = weights["lm_head.bias"][r0:r1]
        return out
    raise ValueError(f"block {block.name} ({k}) is not split into rows")


@dataclass(frozen=True)
class PieceLayout:
    """Where each piece of an ``rows``-row slice sits in a flat byte buffer (pieces in ``piece_names`` order)."""

    names: tuple[str, ...]
    widths: tuple[int, ...]  # 0 for a vector piece ([rows])
    dtype: torch.dtype
    rows: int

    @classmethod
    def of(cls, spec: ModelSpec, block: Block, rows: int, dtype: torch.dtype) -> PieceLayout:
        names = piece_names(spec, block)
        return cls(names, tuple(0 if n == "b" else spec.hidden_size for n in names), dtype, rows)

    def shape(self, i: int) -> tuple[int, ...]:
        return (self.rows,) if self.widths[i] == 0 else (self.rows, self.widths[i])

    @property
    def nbytes(self) -> int:
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum(self.rows * max(w, 1) for w in self.widths) * item

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pieces as views of ``flat`` (a uint8 buffer of at least ``nbytes``)."""
        out, off = {}, 0
        item = torch.empty((), dtype=self.dtype).element_size()
        for i, name in enumerate(self.names):
            n = self.rows * max(self.widths[i], 1) * item
            out[name] = flat[off:off + n].view(self.dtype).view(self.shape(i))
            off += n
        return out


def slice_nbytes(spec: ModelSpec, block: Block, rows: int) -> int:
    """Bytes of a slice of ``rows`` rows of ``block`` in the checkpoint's dtype."""
    return spec.bytes_of(block.params) * rows // block.rows


__all__ = ["SWIGLU_KINDS", "PieceLayout", "host_pieces", "piece_names", "qkv_runs", "slice_nbytes",
           "unsplit_tensors"]
