"""The input contract of the GPU kernels, checked before a launch (and by their CPU twins alike).

A CUDA kernel trusts its pointers: a tensor of the wrong dtype is read as garbage, a non-contiguous
one is read in the wrong order, a slice past the end of a block reads someone else's memory. None of
that raises on the GPU. So every wrapper in :mod:`offloadkit.kernels.cuda.ops` checks its tensors
here first, and the twins in :mod:`offloadkit.kernels.cuda.twins` run the same checks, so that the
``LoopbackDevice`` (which runs twins in place of kernels) rejects exactly what a GPU run would.

Every failure is an :class:`~offloadkit.errors.OffloadkitError` naming the argument, what it was and
what was expected. This module refuses to fix anything up (no silent ``.contiguous()`` or ``.to()``:
a hidden copy on the decode path is a performance bug that should be seen).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from offloadkit.errors import KernelInputError, OffloadkitError

#: Dtypes a weight (or a KV cache) may be stored in; activations are always f32.
WEIGHT_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)


def check_tensor(name: str, t: object, *, dtypes: Sequence[torch.dtype], ndim: int | None = None,
                 device_type: str | None = None, contiguous: bool = True) -> torch.Tensor:
    """``t`` must be a tensor of one of ``dtypes``, with ``ndim`` dimensions, on a ``device_type``
    device (``"cuda"`` for kernels, ``None`` for twins: any), and contiguous."""
    if not isinstance(t, torch.Tensor):
        raise OffloadkitError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise OffloadkitError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise OffloadkitError(f"{name} has dtype {str(t.dtype).removeprefix('torch.')}; this kernel takes {allowed}")
    if device_type is not None and t.device.type != device_type:
        raise OffloadkitError(f"{name} is on {t.device}, the kernel runs on {device_type}: move it there first "
                              f"(tensor.to('{device_type}'))")
    if contiguous and not t.is_contiguous():
        raise OffloadkitError(f"{name} (shape {tuple(t.shape)}, strides {t.stride()}) is not contiguous: the kernel "
                              "reads raw memory in row-major order; pass tensor.contiguous()")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None]) -> None:
    """``t.shape`` must match ``expected`` (``None``: any size)."""
    if len(t.shape) != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected, strict=True)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise OffloadkitError(f"{name} has shape {tuple(t.shape)}, expected {want}")


def same_device(**tensors: torch.Tensor) -> None:
    """All tensors on one device (a kernel launches on one GPU)."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise OffloadkitError(f"tensors must be on one device, got {listing}")


def check_rows(rows: tuple[int, int] | None, n_rows: int, block: str = "the block") -> tuple[int, int]:
    """A row slice ``[r0, r1)`` of a block of ``n_rows`` rows (``None``: all of them)."""
    if rows is None:
        return 0, n_rows
    try:
        r0, r1 = (int(r) for r in rows)
    except (TypeError, ValueError):
        raise KernelInputError(f"rows must be a pair (r0, r1), got {rows!r}") from None
    if r0 > r1:
        raise KernelInputError(f"the slice rows [{r0}, {r1}) has r0 > r1; a slice is [r0, r1) with r0 <= r1")
    if r0 < 0 or r1 > n_rows:
        raise KernelInputError(f"the slice rows [{r0}, {r1}) lies outside {block} [0, {n_rows})")
    return r0, r1


def check_expert_inputs(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                        out: torch.Tensor, rows: tuple[int, int] | None, device_type: str | None) -> tuple[int, int]:
    """The SwiGLU expert contract: x, out [n, H] f32; w_gate, w_up [I, H], w_down [H, I] in one weight dtype."""
    check_tensor("x", x, dtypes=(torch.float32,), ndim=2, device_type=device_type)
    check_tensor("out", out, dtypes=(torch.float32,), ndim=2, device_type=device_type)
    n, hidden = x.shape
    check_shape("out", out, (n, hidden))
    check_tensor("w_gate", w_gate, dtypes=WEIGHT_DTYPES, ndim=2, device_type=device_type)
    inter = w_gate.shape[0]
    for name, w, shape in (("w_gate", w_gate, (inter, hidden)), ("w_up", w_up, (inter, hidden)),
                           ("w_down", w_down, (hidden, inter))):
        check_tensor(name, w, dtypes=(w_gate.dtype,), ndim=2, device_type=device_type)
        check_shape(name, w, shape)
    same_device(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down, out=out)
    return check_rows(rows, inter, f"the expert's intermediate dimension (I = {inter})")


__all__ = ["WEIGHT_DTYPES", "check_expert_inputs", "check_rows", "check_shape", "check_tensor", "same_device"]
