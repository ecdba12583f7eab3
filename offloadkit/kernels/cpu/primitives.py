"""The building blocks of the CPU kernels: widening 16-bit weights in registers, and fused dot products.

Weights stay in the dtype they are stored in (docs/DESIGN.md section 10) and are widened to f32 one
element at a time, in registers, inside the loop that multiplies them. Numba has no bf16 or f16
arrays on the CPU, so 16-bit weights travel as their bit patterns, with the *integer type telling
the format apart*:

    stored dtype   kernel array     widening (one AVX2 instruction per 8 weights, after the load)
    float32        float32          none
    bfloat16       uint16           zero-extend to 32 bits, shift left by 16 (``vpmovzxwd`` + ``vpslld``)
    float16        int16            ``fpext half -> float`` (``vcvtph2ps``, the F16C instruction)

:func:`widen` is a Numba intrinsic that emits exactly that LLVM IR, so the loop vectorizer sees
plain integer and float ops and turns the dot products below into 8-wide FMAs with several
accumulators (``fastmath`` allows the reassociation). :func:`storage_view` makes those arrays from
torch tensors or numpy arrays without copying (a memory-mapped checkpoint stays memory-mapped).

The dot helpers read each weight once for up to four tokens (``_t4``), two (``_t2``) or one
(``_t1``): the weight row is widened once per group and multiplied into one accumulator per token.
``dot2_*`` handles the gate and up rows of SwiGLU in the same pass over ``x``.

What this module refuses: quantized formats (int8, fp8: the paper's point is no accuracy loss),
non-contiguous arrays (:func:`storage_view` raises; a silent copy of a 300 MB weight is a bug), and
any dtype other than the three above.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from offloadkit.errors import KernelInputError
from offloadkit.kernels.cpu.threading_layer import require_threadsafe_layer

#: The threading layer every parallel kernel runs on, chosen and started here, before any of them runs:
#: never workqueue, which aborts when two threads enter it (see threading_layer.py).
THREADING_LAYER = require_threadsafe_layer()

#: Options shared by every CPU kernel: vectorize freely, release the GIL, cache the machine code.
FAST = dict(fastmath=True, nogil=True, cache=True)

#: Kernel storage dtype of each stored weight dtype (see the module docstring).
STORAGE = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.int16)}
_TORCH_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---- widening ------------------------------------------------------------------------------------


@intrinsic
def widen(typingctx, v):
    """``f32(v)`` for a weight element in kernel storage: f32 as is, uint16 as bf16, int16 as f16."""
    if isinstance(v, types.Float) and v.bitwidth == 32:
        def codegen(context, builder, sig, args):
            return args[0]
    elif isinstance(v, types.Integer) and v.bitwidth == 16 and not v.signed:  # bf16 bits
        def codegen(context, builder, sig, args):
            wide = builder.zext(args[0], ir.IntType(32))
            return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())
    elif isinstance(v, types.Integer) and v.bitwidth == 16 and v.signed:  # f16 bits
        def codegen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    else:
        return None
    return types.float32(v), codegen


def storage_view(w: torch.Tensor | np.ndarray, name: str = "weight") -> tuple[np.ndarray, str]:
    """``(array in kernel storage, stored dtype name)`` for a weight, without copying.

    torch bf16 / f16 / f32 tensors and numpy float32 / float16 arrays are accepted; a numpy uint16
    array is taken as bf16 bits and int16 as f16 bits (the kernels' own convention).
    """
    if isinstance(w, torch.Tensor):
        if w.dtype not in _TORCH_NAMES:
            raise KernelInputError(f"{name} is {w.dtype}; the CPU kernels take bfloat16, float16 or float32 "
                                   f"weights (quantized formats are out of scope)")
        if w.device.type != "cpu":
            raise KernelInputError(f"{name} lives on {w.device}; the CPU kernels read host memory")
        if not w.is_contiguous():
            raise KernelInputError(f"{name} is not contiguous (strides {tuple(w.stride())}): pass "
                                   f"w.contiguous(), a copy of {w.numel() * w.element_size() / 1e6:.1f} MB")
        dtype = _TORCH_NAMES[w.dtype]
        w = w.detach()
        arr = w.numpy() if dtype == "float32" else w.view(torch.int16).numpy()
        return arr.view(STORAGE[dtype]), dtype
    if not isinstance(w, np.ndarray):
        raise KernelInputError(f"{name} must be a torch tensor or a numpy array, not {type(w).__name__}")
    by_numpy = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                np.dtype(np.uint16): "bfloat16", np.dtype(np.int16): "float16"}
    if w.dtype not in by_numpy:
        raise KernelInputError(f"{name} is a numpy {w.dtype} array; expected float32, float16 or uint16 "
                               f"(bf16 bits)")
    if not w.flags.c_contiguous:
        raise KernelInputError(f"{name} is not C-contiguous: pass np.ascontiguousarray(w), a copy of "
                               f"{w.nbytes / 1e6:.1f} MB")
    dtype = by_numpy[w.dtype]
    return w.view(STORAGE[dtype]), dtype


def to_float32(w: np.ndarray) -> np.ndarray:
    """A widened f32 copy of an array in kernel storage (for tests and references; small arrays)."""
    if w.dtype == np.uint16:
        return (w.astype(np.uint32) << 16).view(np.float32)
    if w.dtype == np.int16:
        return w.view(np.float16).astype(np.float32)
    return np.array(w, dtype=np.float32)


# ---- fused dot products --------------------------------------------------------------------------


@njit(**FAST)
def silu_mul(g: float, u: float) -> float:
    """``silu(g) * u``."""
    return g / (np.float32(1.0) + np.exp(-g)) * u


@njit(**FAST)
def dot_t1(w, x0):
    s0 = np.float32(0.0)
    for k in range(w.size):
        s0 += widen(w[k]) * x0[k]
    return s0


@njit(**FAST)
def dot_t2(w, x0, x1):
    s0 = np.float32(0.0)
    s1 = np.float32(0.0)
    for k in range(w.size):
        a = widen(w[k])
        s0 += a * x0[k]
        s1 += a * x1[k]
    return s0, s1


@njit(**FAST)
def dot_t4(w, x0, x1, x2, x3):
    s0 = np.float32(0.0)
    s1 = np.float32(0.0)
    s2 = np.float32(0.0)
    s3 = np.float32(0.0)
    for k in range(w.size):
        a = widen(w[k])
        s0 += a * x0[k]
        s1 += a * x1[k]
        s2 += a * x2[k]
        s3 += a * x3[k]
    return s0, s1, s2, s3


@njit(**FAST)
def dot2_t1(wa, wb, x0):
    a0 = np.float32(0.0)
    b0 = np.float32(0.0)
    for k in range(x0.size):
        xv = x0[k]
        a0 += widen(wa[k]) * xv
        b0 += widen(wb[k]) * xv
    return a0, b0


@njit(**FAST)
def dot2_t2(wa, wb, x0, x1):
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    b0 = np.float32(0.0)
    b1 = np.float32(0.0)
    for k in range(x0.size):
        a = widen(wa[k])
        b = widen(wb[k])
        a0 += a * x0[k]
        a1 += a * x1[k]
        b0 += b * x0[k]
        b1 += b * x1[k]
    return a0, a1, b0, b1


@njit(**FAST)
def dot2_t4(wa, wb, x0, x1, x2, x3):
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    b0 = np.float32(0.0)
    b1 = np.float32(0.0)
    b2 = np.float32(0.0)
    b3 = np.float32(0.0)
    for k in range(x0.size):
        a = widen(wa[k])
        b = widen(wb[k])
        a0 += a * x0[k]
        a1 += a * x1[k]
        a2 += a * x2[k]
        a3 += a * x3[k]
        b0 += b * x0[k]
        b1 += b * x1[k]
        b2 += b * x2[k]
        b3 += b * x3[k]
    return a0, a1, a2, a3, b0, b1, b2, b3


# ---- widening whole blocks (the prefill path feeds BLAS with these) -----------------------------


@njit(**FAST)
def widen_rows_range(w, r0, r1, out, i0, i1):
    """``out[i - r0, :] = f32(w[i, :])`` for rows ``[i0, i1)`` of a block ``[r0, r1)`` (one thread)."""
    for i in range(i0, i1):
        src = w[i]
        dst = out[i - r0]
        for k in range(src.size):
            dst[k] = widen(src[k])


@njit(**FAST)
def widen_cols_range(w, c0, c1, out, j0, j1):
    """``out[j, :] = f32(w[j, c0:c1])`` for rows ``[j0, j1)`` (one thread)."""
    for j in range(j0, j1):
        src = w[j, c0:c1]
        dst = out[j]
        for k in range(src.size):
            dst[k] = widen(src[k])


@njit(parallel=True, **FAST)
def _widen_rows_parallel(w, r0, r1, out, n_chunks):
    for c in prange(n_chunks):
        widen_rows_range(w, r0, r1, out, r0 + c * (r1 - r0) // n_chunks, r0 + (c + 1) * (r1 - r0) // n_chunks)


@njit(parallel=True, **FAST)
def _widen_cols_parallel(w, c0, c1, out, n_chunks):
    rows = w.shape[0]
    for c in prange(n_chunks):
        widen_cols_range(w, c0, c1, out, c * rows // n_chunks, (c + 1) * rows // n_chunks)


#: Blocks smaller than this are widened on the calling thread (a parallel launch would cost more).
WIDEN_PARALLEL_MIN_BYTES = 256 * 1024


def widen_rows(w: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
    """``out[i - r0, :] = f32(w[i, :])`` for rows ``[r0, r1)``; ``out`` [r1 - r0, w.shape[1]] f32."""
    if out.nbytes < WIDEN_PARALLEL_MIN_BYTES:
        widen_rows_range(w, r0, r1, out, r0, r1)
    else:
        _widen_rows_parallel(w, r0, r1, out, numba.get_num_threads())


def widen_cols(w: np.ndarray, c0: int, c1: int, out: np.ndarray) -> None:
    """``out[j, :] = f32(w[j, c0:c1])`` for every row ``j``; ``out`` [w.shape[0], c1 - c0] f32."""
    if out.nbytes < WIDEN_PARALLEL_MIN_BYTES:
        widen_cols_range(w, c0, c1, out, 0, w.shape[0])
    else:
        _widen_cols_parallel(w, c0, c1, out, numba.get_num_threads())


__all__ = ["FAST", "STORAGE", "dot2_t1", "dot2_t2", "dot2_t4", "dot_t1", "dot_t2", "dot_t4",
           "silu_mul", "storage_view", "to_float32", "widen", "widen_cols", "widen_rows"]
