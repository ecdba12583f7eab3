"""The prefill path: a SwiGLU row slice for many tokens, at the speed of the CPU's f32 GEMM.

With hundreds of tokens an expert does ``2 n`` flops per weight, so it is bound by arithmetic,
not memory, and the best arithmetic on this CPU is the BLAS that torch links (MKL / oneDNN, f32
on AVX2: there is no native bf16 dot product without AVX-512 BF16 or AMX). So the slice is cut
into blocks of :data:`BLOCK_ROWS` intermediate rows; each block's W1 and W3 rows and W2 columns
are widened to f32 *once* into small reusable buffers (a few MB, they stay in L3) and then
multiplied by all tokens with three GEMMs:

    G = X · W1bᵀ,   U = X · W3bᵀ,   Y += (silu(G) ⊙ U) · W2bᵀ      (X [n, H], W1b [rows, H], W2b [H, rows])

f32 weights need no widening: the GEMMs read them in place (``W2[:, r0:r1]`` is a strided view
that BLAS takes as it is), so the f32 prefill *is* torch's GEMM. bf16 / f16 weights pay for the
widening once per block — a small fraction of the GEMM time at n ≥ 64.

Widening runs in Numba (:func:`~offloadkit.kernels.cpu.primitives.widen_rows`, ``widen_cols``: one
vectorized, parallel pass per block), which measured ~30% faster than torch's ``Tensor.copy_``
from bf16 here and made the whole prefill 3-5% faster at 32-64 tokens.

``scale`` multiplies each token's row of ``silu(G) ⊙ U`` (the router's weight, so a routed expert adds
into the residual stream); :func:`linear_prefill` can add into ``out`` (``accumulate``) and
:func:`linear_prefill_into` writes a column block of a wider output (the QKV projections side by side).

On bench-moe's shapes (2048 x 2048 experts, issue 10, AVX2, measured): an expert at 128 tokens (512
tokens over 8 experts, top-2) runs at ~111 GFLOP/s with 2 threads against ~123 for torch's GEMM on the
same weights already in f32, and ~124 at 512 tokens; one GEMM over a widened [gate; up] block measured
slower (77-124 GFLOP/s), and 512-row blocks no faster at 128 tokens, so the blocks stay as they are.

Below a few dozen tokens torch's GEMM is far from its peak (MKL reaches ~75 GFLOP/s at 32 tokens
on this machine against ~160 at 512) and the decode kernel, which never widens a matrix, is
faster: :data:`offloadkit.kernels.cpu.experts.DECODE_MAX_TOKENS` holds the measured crossover.

What it refuses: validation (done in :mod:`offloadkit.kernels.cpu.experts`) and few tokens (the decode
path, which never materializes widened weights, is faster there).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from offloadkit.kernels.cpu.primitives import widen_cols, widen_rows

#: Intermediate rows per widened block, by token count: 3 blocks of 256 x 4096 f32 are 12 MB, inside a
#: 32 MB L3. From 256 tokens on, 512-row blocks (24 MB) measured ~5% faster (fewer, larger GEMMs);
#: below, 256-row blocks were up to 15% faster.
BLOCK_ROWS = 256
BLOCK_ROWS_MANY_TOKENS = 512


def block_rows_for(tokens: int) -> int:
    """The widened block height for ``tokens`` tokens (see :data:`BLOCK_ROWS`)."""
    return BLOCK_ROWS_MANY_TOKENS if tokens >= 256 else BLOCK_ROWS

_TORCH_OF_STORAGE = {np.dtype(np.uint16): torch.bfloat16, np.dtype(np.int16): torch.float16}


def as_torch_weight(w: np.ndarray) -> torch.Tensor:
    """The torch tensor (bf16 / f16 / f32) that an array in kernel storage holds, without copying."""
    t = torch.from_numpy(w)
    if w.dtype in _TORCH_OF_STORAGE:
        return t.view(_TORCH_OF_STORAGE[w.dtype])
    return t


def expert_prefill(x: np.ndarray, w1: np.ndarray, w3: np.ndarray, w2: np.ndarray, r0: int, r1: int,
                   out: np.ndarray, block_rows: int | None = None, scale: np.ndarray | None = None) -> None:
    """``out += scale ⊙ W2[:, r0:r1] · (silu(W1[r0:r1] x) ⊙ W3[r0:r1] x)`` for ``x`` [n, H] f32, ``out`` [n, H]
    f32, ``scale`` [n] f32 per token (1 if None: the router's weight of this expert for each token)."""
    block_rows = block_rows or block_rows_for(x.shape[0])  # block_rows only matters for 16-bit weights
    xt, yt = torch.from_numpy(x), torch.from_numpy(out)
    st = None if scale is None else torch.from_numpy(scale)[:, None]
    t1, t3, t2 = as_torch_weight(w1), as_torch_weight(w3), as_torch_weight(w2)
    with torch.no_grad():
        if t1.dtype == torch.float32:
            h = F.silu(xt @ t1[r0:r1].T).mul_(xt @ t3[r0:r1].T)
            yt.addmm_(h if st is None else h.mul_(st), t2[:, r0:r1].T)
            return
        hidden = x.shape[1]
        a = np.empty((block_rows, hidden), dtype=np.float32)
        b = np.empty((block_rows, hidden), dtype=np.float32)
        c = np.empty(hidden * block_rows, dtype=np.float32)
        for b0 in range(r0, r1, block_rows):
            rows = min(block_rows, r1 - b0)
            c2 = c[:hidden * rows].reshape(hidden, rows)
            widen_rows(w1, b0, b0 + rows, a[:rows])
            widen_rows(w3, b0, b0 + rows, b[:rows])
            widen_cols(w2, b0, b0 + rows, c2)
            h = F.silu(xt @ torch.from_numpy(a[:rows]).T).mul_(xt @ torch.from_numpy(b[:rows]).T)
            yt.addmm_(h if st is None else h.mul_(st), torch.from_numpy(c2).T)


def linear_prefill(x: np.ndarray, w: np.ndarray, out: np.ndarray, block_rows: int = 1024,
                   accumulate: bool = False) -> None:
    """``out (+)= x · Wᵀ`` for ``x`` [n, in] f32, ``w`` [out, in] in kernel storage, ``out`` [n, out] f32."""
    linear_prefill_into(torch.from_numpy(x), w, torch.from_numpy(out), block_rows, accumulate)


def linear_prefill_into(xt: torch.Tensor, w: np.ndarray, yt: torch.Tensor, block_rows: int = 1024,
                        accumulate: bool = False) -> None:
    """:func:`linear_prefill` for torch ``xt`` and ``yt``; ``yt`` may be a column block of a wider output."""
    tw = as_torch_weight(w)
    with torch.no_grad():
        if tw.dtype == torch.float32:
            if accumulate:
                yt.addmm_(xt, tw.T)
            else:
                torch.mm(xt, tw.T, out=yt)
            return
        buf = np.empty((min(block_rows, w.shape[0]), w.shape[1]), dtype=np.float32)
        for j0 in range(0, w.shape[0], block_rows):
            rows = min(block_rows, w.shape[0] - j0)
            widen_rows(w, j0, j0 + rows, buf[:rows])
            if accumulate:
                yt[:, j0:j0 + rows].addmm_(xt, torch.from_numpy(buf[:rows]).T)
            else:
                yt[:, j0:j0 + rows] = xt @ torch.from_numpy(buf[:rows]).T


__all__ = ["BLOCK_ROWS", "BLOCK_ROWS_MANY_TOKENS", "as_torch_weight", "block_rows_for", "expert_prefill",
           "linear_prefill", "linear_prefill_into"]
