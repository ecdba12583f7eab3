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

Widening runs through torch (``Tensor.to(float32)``, vectorized, on torch's thread pool), which
measured as fast as the Numba widener here and keeps a single thread pool busy, instead of
alternating torch's OpenMP pool with Numba's (each spins for a while after its work and steals
the core the other one needs).

What it refuses: validation (done in :mod:`offloadkit.kernels.cpu`) and few tokens (the decode
path, which never materializes widened weights, is faster there).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Intermediate rows per widened block: 3 blocks of 256 x 4096 f32 are 12 MB, inside a 32 MB L3.
BLOCK_ROWS = 256

_TORCH_OF_STORAGE = {np.dtype(np.uint16): torch.bfloat16, np.dtype(np.int16): torch.float16}


def as_torch_weight(w: np.ndarray) -> torch.Tensor:
    """The torch tensor (bf16 / f16 / f32) that an array in kernel storage holds, without copying."""
    t = torch.from_numpy(w)
    if w.dtype in _TORCH_OF_STORAGE:
        return t.view(_TORCH_OF_STORAGE[w.dtype])
    return t


def expert_prefill(x: np.ndarray, w1: np.ndarray, w3: np.ndarray, w2: np.ndarray, r0: int, r1: int,
                   out: np.ndarray, block_rows: int = BLOCK_ROWS) -> None:
    """``out += W2[:, r0:r1] · (silu(W1[r0:r1] x) ⊙ W3[r0:r1] x)`` for ``x`` [n, H] f32, ``out`` [n, H] f32."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(out)
    t1, t3, t2 = as_torch_weight(w1), as_torch_weight(w3), as_torch_weight(w2)
    with torch.no_grad():
        if t1.dtype == torch.float32:
            h = F.silu(xt @ t1[r0:r1].T) * (xt @ t3[r0:r1].T)
            yt.addmm_(h, t2[:, r0:r1].T)
            return
        hidden = x.shape[1]
        a = torch.empty(block_rows, hidden)
        b = torch.empty(block_rows, hidden)
        c = torch.empty(hidden * block_rows)
        for b0 in range(r0, r1, block_rows):
            rows = min(block_rows, r1 - b0)
            a1, b3, c2 = a[:rows], b[:rows], c[:hidden * rows].view(hidden, rows)
            a1.copy_(t1[b0:b0 + rows])
            b3.copy_(t3[b0:b0 + rows])
            c2.copy_(t2[:, b0:b0 + rows])
            h = F.silu(xt @ a1.T) * (xt @ b3.T)
            yt.addmm_(h, c2.T)


def linear_prefill(x: np.ndarray, w: np.ndarray, out: np.ndarray, block_rows: int = 1024) -> None:
    """``out = x · Wᵀ`` for ``x`` [n, in] f32, ``w`` [out, in] in kernel storage, ``out`` [n, out] f32."""
    xt, yt, tw = torch.from_numpy(x), torch.from_numpy(out), as_torch_weight(w)
    with torch.no_grad():
        if tw.dtype == torch.float32:
            torch.mm(xt, tw.T, out=yt)
            return
        buf = torch.empty(min(block_rows, tw.shape[0]), tw.shape[1])
        for j0 in range(0, tw.shape[0], block_rows):
            rows = min(block_rows, tw.shape[0] - j0)
            wb = buf[:rows]
            wb.copy_(tw[j0:j0 + rows])
            yt[:, j0:j0 + rows] = xt @ wb.T


__all__ = ["BLOCK_ROWS", "as_torch_weight", "expert_prefill", "linear_prefill"]
