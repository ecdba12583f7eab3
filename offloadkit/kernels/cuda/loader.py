"""The CuPy loader: compiles ``kernels/*.cu`` with ``cupy.RawModule`` and launches them on torch tensors.

The GPU lane's kernels are raw CUDA C (docs/DESIGN.md section 9: ``CudaDevice`` launches them on torch's
streams). This module

- finds the sources inside the installed package (:mod:`offloadkit.kernels.cuda.nvrtc`, which also holds
  the compile options, shared with the compile check of the test suite so both compile the same);
- compiles each file once per process with ``cupy.RawModule(code=..., options=...,
  name_expressions=[...])`` (templates instantiated per weight dtype; CuPy also caches the binaries on
  disk, keyed by the source text);
- launches a :class:`Launch` on a given torch CUDA stream (the current one by default), passing torch
  tensors as zero-copy CuPy views through ``__cuda_array_interface__`` (bf16, which that interface
  cannot name, as an int16 view of the same memory: the kernel only sees the pointer), and records
  each tensor's use on that stream (``Tensor.record_stream``) so torch's caching allocator does not
  hand its memory to other work before the kernels are done.

What it refuses: CUDA where there is none (:class:`~offloadkit.errors.CudaUnavailableError`, saying
which CuPy to install), and copies: it never moves, converts or makes contiguous a tensor (the
wrappers in :mod:`offloadkit.kernels.cuda.ops` reject such tensors before a launch).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from offloadkit.errors import CudaUnavailableError
from offloadkit.kernels.cuda.nvrtc import KERNELS, KernelCompileError, compile_options, cuda_include_dirs, read_source

INSTALL_HINT = ("install CuPy built for your CUDA driver (pip install cupy-cuda12x for CUDA 12, "
                "pip install cupy-cuda13x for CUDA 13; or pip install -e '.[cuda]') next to a CUDA build of torch, "
                "on a machine with an NVIDIA GPU and driver")

#: A kernel argument: a tensor (passed as its device pointer) or a sized numpy scalar (np.int32 for
#: ``int``, np.int64 for ``long long``, np.float32 for ``float``: a bare Python number would be passed
#: as 64 bits whatever the kernel declares).
KernelArg = torch.Tensor | np.int32 | np.int64 | np.float32


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``file`` (a ``kernels/<file>.cu``), ``kernel`` (one of its name expressions),
    grid and block shapes, and the arguments in the kernel's order."""

    file: str
    kernel: str
    grid: tuple[int, ...]
    block: tuple[int, ...]
    args: tuple[KernelArg, ...]


def cupy_status() -> tuple[bool, str]:
    """(whether CuPy can launch kernels here, and if not, why not and what to install)."""
    try:
        import cupy
    except ImportError:
        return False, f"CuPy is not installed: {INSTALL_HINT}"
    except Exception as e:  # a CuPy built for another CUDA may fail on import
        return False, f"CuPy failed to import ({e}): {INSTALL_HINT}"
    try:
        if cupy.cuda.is_available():
            return True, f"CuPy {cupy.__version__} on {cupy.cuda.runtime.getDeviceCount()} CUDA device(s)"
    except Exception as e:
        return False, f"CuPy {cupy.__version__} is installed but CUDA is not usable ({e}): {INSTALL_HINT}"
    return False, f"CuPy {cupy.__version__} is installed but finds no CUDA GPU or driver: {INSTALL_HINT}"


def cuda_available() -> bool:
    """True where the kernels can run (CuPy imports and sees a GPU); never raises."""
    return cupy_status()[0]


def require_cupy():
    """The ``cupy`` module, or :class:`CudaUnavailableError` saying why not and what to install."""
    ok, why = cupy_status()
    if not ok:
        raise CudaUnavailableError(f"the CUDA kernels cannot run here: {why}")
    import cupy

    return cupy


@functools.cache
def load_module(file: str):
    """The compiled ``cupy.RawModule`` of ``kernels/<file>.cu`` (cached for the process; CuPy compiles
    lazily, for the current device's architecture, on the first ``get_function``)."""
    cupy = require_cupy()
    return cupy.RawModule(code=read_source(file), options=compile_options(), name_expressions=KERNELS[file])


def get_kernel(file: str, kernel: str):
    """The ``cupy.RawKernel`` for name expression ``kernel`` of ``file``, e.g. ``("norm", "rmsnorm<float>")``."""
    if kernel not in KERNELS.get(file, ()):
        raise ValueError(f"{kernel!r} is not among the kernels of {file}.cu: {KERNELS.get(file)}")
    try:
        return load_module(file).get_function(kernel)  # CuPy compiles here, on first use
    except Exception as e:
        if type(e).__name__ != "CompileException":  # cupy.cuda.compiler.CompileException
            raise
        hint = "" if cuda_include_dirs() else (" (no folder with cuda_bf16.h was found: pip install "
                                               "nvidia-cuda-runtime-cu12, or set CUDA_HOME to a CUDA toolkit)")
        raise KernelCompileError(f"CuPy could not compile {file}.cu{hint}:", str(e)) from e


def _as_cupy(cupy, t: torch.Tensor):
    """A zero-copy CuPy view of ``t`` (the same device memory)."""
    if t.dtype == torch.bfloat16:  # __cuda_array_interface__ has no bf16: reinterpret the 16-bit words
        t = t.view(torch.int16)
    return cupy.asarray(t)


class CupyBackend:
    """Launches on a CUDA GPU through CuPy. ``device_type`` is what the input checks demand."""

    device_type = "cuda"

    def run(self, launches: Sequence[Launch], stream: torch.cuda.Stream | None = None) -> None:
        """Launch in order on ``stream`` (default: torch's current stream on the tensors' device)."""
        if not launches:
            return
        cupy = require_cupy()
        device = next(a.device for a in launches[0].args if isinstance(a, torch.Tensor))
        if stream is None:
            stream = torch.cuda.current_stream(device)
        # A tensor allocated on another stream and dropped by its owner before these kernels finish
        # must not be handed out again meanwhile: record the launch stream's use of every tensor
        # (a no-op for a tensor allocated on that stream; see ops.py on streams).
        for launch in launches:
            for a in launch.args:
                if isinstance(a, torch.Tensor) and a.is_cuda:
                    a.record_stream(stream)
        with cupy.cuda.Device(device.index if device.index is not None else 0), \
                cupy.cuda.ExternalStream(stream.cuda_stream):
            for launch in launches:
                args = tuple(_as_cupy(cupy, a) if isinstance(a, torch.Tensor) else a for a in launch.args)
                get_kernel(launch.file, launch.kernel)(launch.grid, launch.block, args)


DEFAULT_BACKEND = CupyBackend()


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def i32(v: Any) -> np.int32:
    return np.int32(int(v))


def i64(v: Any) -> np.int64:
    return np.int64(int(v))


def f32(v: Any) -> np.float32:
    return np.float32(float(v))


__all__ = ["DEFAULT_BACKEND", "INSTALL_HINT", "CupyBackend", "KernelArg", "Launch", "ceil_div", "cuda_available",
           "cupy_status", "f32", "get_kernel", "i32", "i64", "load_module", "require_cupy"]
