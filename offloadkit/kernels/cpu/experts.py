"""CPU expert kernels: the SwiGLU expert over a row slice, for any number of tokens (the CC slices).

In hybrid inference the CPU computes the CC rows ``[r0, r1)`` of every weight block (docs/DESIGN.md
section 3). This module is the one entry point for that work:

    >>> ew = ExpertWeights.from_torch(w_gate, w_up, w_down)        # zero-copy views, bf16/f16/f32
    >>> y = expert_rows(x, ew, rows=(0, 4096))                     # x [n, H] f32 -> y [n, H] f32
    >>> expert_rows(x, ew, rows=(4096, 14336), out=y)              # accumulate: y is now the full expert

Partials over any split of ``[0, I)`` sum to the whole expert (up to f32 summation order), which is
what lets CC, CG and GG slices be computed in different places and added. ``path="auto"`` takes the
decode kernel (:mod:`offloadkit.kernels.cpu.decode`, memory-bound, each weight byte read once for
all tokens) for up to :data:`DECODE_MAX_TOKENS` tokens (a few dozen: measured) and the prefill kernel
(:mod:`offloadkit.kernels.cpu.prefill`, weights widened once per block and fed to BLAS) above.
:func:`linear` does the same for a plain ``y = x Wᵀ`` (attention projections, routers, lm_head), and
:func:`linear3` for three weights applied to one ``x`` (Q, K and V: one decode pass). ``scale`` (a
weight per token, multiplied in before the down projection) and ``out`` let an expert add its routed
output straight into a residual stream; ``linear(..., accumulate=True)`` does the same for the O
projection. Every kernel releases the GIL (``nogil``), so a worker thread can run them while other
threads work.

It refuses, with :class:`KernelInputError` (an ``OffloadkitError``): a slice outside ``[0, I)`` or with
``r0 > r1``; activations that are not f32 ``[n, H]`` with the expert's H; weights of different dtypes
or of shapes that do not form one expert; non-contiguous weights; an ``out`` of the wrong shape or
dtype. An empty slice or zero tokens is not an error: the result is zeros (``out`` is left as it was).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from offloadkit.errors import KernelInputError
from offloadkit.kernels.checks import check_rows
from offloadkit.kernels.cpu.decode import expert_decode, rows_dot, rows_dot3
from offloadkit.kernels.cpu.prefill import expert_prefill, linear_prefill, linear_prefill_into
from offloadkit.kernels.cpu.primitives import STORAGE, storage_view

#: Token counts up to this take the decode kernel, more the prefill kernel, by stored dtype. Measured
#: crossover on a Mixtral expert (4096 x 14336, 2 threads): the decode kernel holds ~100 GFLOP/s
#: (bf16 / f16) or ~85 (f32) from 8 tokens up, while torch's GEMM only passes that at ~56 / ~40 tokens.
DECODE_MAX_TOKENS = {"bfloat16": 56, "float16": 56, "float32": 40}
PATHS = ("auto", "decode", "prefill")


@dataclass(frozen=True)
class ExpertWeights:
    """One SwiGLU expert's weights in kernel storage: ``w_gate``, ``w_up`` [I, H], ``w_down`` [H, I].

    The arrays are views on the caller's memory (a memory-mapped checkpoint stays mapped); ``dtype``
    is the stored dtype (``"bfloat16"``, ``"float16"`` or ``"float32"``).
    """

    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray
    dtype: str

    @classmethod
    def from_torch(cls, w_gate: torch.Tensor | np.ndarray, w_up: torch.Tensor | np.ndarray,
                   w_down: torch.Tensor | np.ndarray) -> ExpertWeights:
        """Check and wrap the three weights (torch tensors or numpy arrays) of one expert, without copying."""
        (g, dg), (u, du), (d, dd) = (storage_view(w, n) for w, n in
                                     ((w_gate, "w_gate"), (w_up, "w_up"), (w_down, "w_down")))
        if not dg == du == dd:
            raise KernelInputError(f"the expert's weights mix dtypes (w_gate {dg}, w_up {du}, w_down {dd}); "
                                   f"store them in one dtype")
        if g.ndim != 2 or u.shape != g.shape or d.shape != g.shape[::-1]:
            raise KernelInputError(f"w_gate {g.shape}, w_up {u.shape}, w_down {d.shape} do not form a SwiGLU "
                                   f"expert: expected [I, H], [I, H], [H, I] (the Hugging Face layout)")
        return cls(g, u, d, dg)

    @property
    def hidden(self) -> int:
        return self.w_gate.shape[1]

    @property
    def intermediate(self) -> int:
        return self.w_gate.shape[0]

    @property
    def nbytes(self) -> int:
        return self.w_gate.nbytes + self.w_up.nbytes + self.w_down.nbytes

    def slice_bytes(self, r0: int, r1: int) -> int:
        """Weight bytes a slice ``[r0, r1)`` reads: three runs of ``r1 - r0`` rows of H weights."""
        return 3 * (r1 - r0) * self.hidden * self.w_gate.itemsize


# ---- checking --------------------------------------------------------------------------------------


def check_activations(x: np.ndarray | torch.Tensor, hidden: int) -> np.ndarray:
    """``x`` as a C-contiguous f32 numpy array [n, hidden] (a view when it already is one)."""
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.float32:
            raise KernelInputError(f"activations are {x.dtype}; the CPU kernels take float32 activations "
                                   f"(x.float() widens them)")
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise KernelInputError(f"activations must be a torch tensor or a numpy array, not {type(x).__name__}")
    if x.dtype != np.float32:
        raise KernelInputError(f"activations are {x.dtype}; the CPU kernels take float32 activations")
    if x.ndim != 2 or x.shape[1] != hidden:
        raise KernelInputError(f"activations have shape {x.shape}; expected [tokens, {hidden}] (the hidden size "
                               f"of the weights)")
    return np.ascontiguousarray(x)


def _check_out(out: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if out is None:
        return np.zeros(shape, dtype=np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape \
            or not out.flags.c_contiguous or not out.flags.writeable:
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise KernelInputError(f"out must be a writeable C-contiguous float32 array of shape {shape}, got {got}")
    return out


def _choose(path: str, n: int, dtype: str) -> str:
    if path not in PATHS:
        raise KernelInputError(f"path must be one of {PATHS}, got {path!r}")
    if path == "auto":
        return "decode" if n <= DECODE_MAX_TOKENS[dtype] else "prefill"
    return path


# ---- the kernels -----------------------------------------------------------------------------------


def _check_scale(scale: np.ndarray | None, n: int) -> np.ndarray | None:
    if scale is None:
        return None
    if not isinstance(scale, np.ndarray) or scale.dtype != np.float32 or scale.shape != (n,):
        got = f"{scale.dtype} {scale.shape}" if isinstance(scale, np.ndarray) else type(scale).__name__
        raise KernelInputError(f"scale must be a float32 array of shape ({n},) (one weight per token), got {got}")
    return np.ascontiguousarray(scale)


def expert_rows(x: np.ndarray | torch.Tensor, weights: ExpertWeights, rows: tuple[int, int] | None = None,
                out: np.ndarray | None = None, *, path: str = "auto", scale: np.ndarray | None = None) -> np.ndarray:
    """The partial output ``W2[:, r0:r1] · (silu(W1[r0:r1] x) ⊙ W3[r0:r1] x)`` for ``x`` [n, H] f32.

    Returns a new [n, H] f32 array, or adds into ``out`` and returns it. ``path`` forces the
    ``"decode"`` or ``"prefill"`` kernel (both compute the same numbers up to summation order).
    ``scale`` [n] f32 multiplies each token's output (the router's weight of this expert), at no cost:
    with ``out`` the residual stream, an expert's weighted output is added where it belongs.
    """
    x = check_activations(x, weights.hidden)
    r0, r1 = check_rows(rows, weights.intermediate, "the intermediate dimension")
    out = _check_out(out, (x.shape[0], weights.hidden))
    scale = _check_scale(scale, x.shape[0])
    kernel = _choose(path, x.shape[0], weights.dtype)
    if x.shape[0] == 0 or r0 == r1:
        return out
    if kernel == "decode":
        expert_decode(x, weights.w_gate, weights.w_up, weights.w_down, r0, r1, out, scale)
    else:
        expert_prefill(x, weights.w_gate, weights.w_up, weights.w_down, r0, r1, out, scale=scale)
    return out


def _check_weight(w: np.ndarray) -> str:
    """The stored dtype name of a weight in kernel storage; KernelInputError if it is not one."""
    if not isinstance(w, np.ndarray) or w.ndim != 2 or not w.flags.c_contiguous or w.dtype not in STORAGE.values():
        raise KernelInputError("w must be a C-contiguous 2-D array in kernel storage (float32, or uint16 / int16 "
                               "bits of bf16 / f16: use storage_view)")
    return next(name for name, storage in STORAGE.items() if storage == w.dtype)


def linear(x: np.ndarray | torch.Tensor, w: np.ndarray, out: np.ndarray | None = None, *,
           path: str = "auto", accumulate: bool = False) -> np.ndarray:
    """``x · Wᵀ`` for ``x`` [n, in] f32 and ``w`` [out, in] in kernel storage (see :func:`storage_view`).

    With ``accumulate`` the product is added into ``out`` (e.g. the residual stream) instead of written.
    """
    dtype = _check_weight(w)
    x = check_activations(x, w.shape[1])
    out = _check_out(out, (x.shape[0], w.shape[0]))
    if x.shape[0] == 0 or w.shape[0] == 0:
        return out
    if _choose(path, x.shape[0], dtype) == "decode":
        rows_dot(x, w, 0, out, accumulate)
    else:
        linear_prefill(x, w, out, accumulate=accumulate)
    return out


def linear3(x: np.ndarray | torch.Tensor, wa: np.ndarray, wb: np.ndarray, wc: np.ndarray,
            out: np.ndarray | None = None, *, path: str = "auto") -> np.ndarray:
    """``x · [Wa; Wb; Wc]ᵀ`` [n, rows a + b + c]: three projections of the same ``x`` (Q, K and V) at once.

    The decode kernel runs them as one parallel pass over the three weights (one launch, the rows split
    evenly over the threads); the prefill path runs three GEMMs into the column blocks of ``out``.
    The weights must share the stored dtype and the input width.
    """
    dtypes = {_check_weight(w) for w in (wa, wb, wc)}
    if len(dtypes) != 1 or not wa.shape[1] == wb.shape[1] == wc.shape[1]:
        raise KernelInputError(f"linear3 takes three weights of one dtype and input width; got "
                               f"{[(w.dtype.name, w.shape) for w in (wa, wb, wc)]}")
    x = check_activations(x, wa.shape[1])
    ra, rb = wa.shape[0], wb.shape[0]
    out = _check_out(out, (x.shape[0], ra + rb + wc.shape[0]))
    if x.shape[0] == 0:
        return out
    if _choose(path, x.shape[0], dtypes.pop()) == "decode":
        rows_dot3(x, wa, wb, wc, out)
    else:
        xt, yt = torch.from_numpy(x), torch.from_numpy(out)
        for w, c0 in ((wa, 0), (wb, ra), (wc, ra + rb)):
            linear_prefill_into(xt, w, yt[:, c0:c0 + w.shape[0]])
    return out


def expert_rows_torch(x: torch.Tensor, weights: ExpertWeights, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """:func:`expert_rows` for torch callers: ``x`` [n, H] f32 tensor -> [n, H] f32 tensor (no copies)."""
    return torch.from_numpy(expert_rows(x, weights, rows))


__all__ = ["DECODE_MAX_TOKENS", "ExpertWeights", "KernelInputError", "check_activations", "check_rows",
           "expert_rows", "expert_rows_torch", "linear", "linear3"]
