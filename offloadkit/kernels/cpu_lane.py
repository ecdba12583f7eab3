"""The small CPU-lane operations around the experts: norms, and the measurement that chose them.

A layer the plan keeps on the CPU needs more than its experts: RMSNorm / LayerNorm, the router,
the attention core. Each is cheap in bytes but called many times per step, so at decode its cost is
mostly *call overhead*. For each piece the CPU engine uses whichever of Numba or torch measured
faster on this machine (:func:`compare_lane_ops` measures them again; ``offloadkit bench kernels``
prints the result):

- **RMSNorm**: a Numba kernel (one pass for the sum of squares, one to scale; serial for a few
  tokens, parallel over tokens for many). At one token torch runs five ops (pow, mean, rsqrt, mul,
  mul) at several µs each; the kernel takes about a µs.
- **LayerNorm** (PhiMoE): torch's fused ``F.layer_norm`` (one op; a Numba version would not win).
- **router logits**: the decode / prefill ``linear`` of :mod:`offloadkit.kernels.cpu` (weights read
  in their stored dtype); softmax and top-k stay in torch (:mod:`offloadkit.model.moe`), on a few
  dozen numbers.
- **attention core**: torch (:func:`offloadkit.model.reference.causal_attention`): a handful of
  batched matmuls over the KV cache, already at BLAS speed.

What it refuses: anything but f32 activations (the engine's compute dtype), and claiming a winner
it did not measure: :func:`compare_lane_ops` returns the measured times, labelled by the caller.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from numba import njit, prange

from offloadkit.kernels.cpu_core import FAST
from offloadkit.model.reference import rms_norm as torch_rms_norm

#: Above this many activations the norm runs parallel over tokens.
_PARALLEL_NORM_ELEMS = 1 << 16


@njit(**FAST)
def _rms_rows(x, w, eps, out, t0, t1):
    hidden = x.shape[1]
    for t in range(t0, t1):
        row = x[t]
        s = np.float32(0.0)
        for k in range(hidden):
            s += row[k] * row[k]
        r = np.float32(1.0) / np.sqrt(s / np.float32(hidden) + np.float32(eps))
        dst = out[t]
        for k in range(hidden):
            dst[k] = row[k] * r * w[k]


@njit(parallel=True, **FAST)
def _rms_parallel(x, w, eps, out):
    for t in prange(x.shape[0]):
        _rms_rows(x, w, eps, out, t, t + 1)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x²) + eps) * weight`` over the rows of ``x`` [n, H] f32 (``weight`` [H] f32)."""
    out = np.empty_like(x)
    if x.size >= _PARALLEL_NORM_ELEMS:
        _rms_parallel(x, weight, np.float32(eps), out)
    else:
        _rms_rows(x, weight, np.float32(eps), out, 0, x.shape[0])
    return out


# ---- measuring the choice ----------------------------------------------------------------------------


def _best_s(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def compare_lane_ops(hidden: int = 4096, tokens: tuple[int, ...] = (1, 512), repeats: int = 20
                     ) -> list[dict[str, object]]:
    """Measured best times (s) of the Numba and torch versions of the CPU-lane ops, per token count."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(hidden).astype(np.float32)
    rows = []
    wt = torch.from_numpy(w)
    for n in tokens:
        x = rng.standard_normal((n, hidden)).astype(np.float32)
        xt = torch.from_numpy(x)
        rows.append({"op": "rms_norm", "tokens": n, "hidden": hidden,
                     "numba_s": _best_s(lambda x=x: rms_norm(x, w, 1e-5), repeats),
                     "torch_s": _best_s(lambda xt=xt: torch_rms_norm(xt, wt, 1e-5), repeats)})
        rows.append({"op": "layer_norm (torch only)", "tokens": n, "hidden": hidden, "numba_s": None,
                     "torch_s": _best_s(lambda xt=xt: torch.nn.functional.layer_norm(xt, (hidden,), wt, wt), repeats)})
    return rows


__all__ = ["compare_lane_ops", "rms_norm"]
