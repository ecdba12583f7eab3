"""Run the CUDA kernels on the CPU, one OS thread per CUDA thread, where no GPU exists.

NVRTC proves the kernels compile; only running them proves they compute the right thing. Where no
GPU is at hand, :class:`EmulatorBackend` compiles a kernel file with g++ after ``cuda/src/emulate.hpp``
(a few CUDA intrinsics in C++20: barriers for ``__syncthreads``, shuffles and ballots through a
mailbox) and runs the very launches :mod:`offloadkit.kernels.cuda.ops` builds, on CPU tensors. The
tests compare the result with the kernels' CPU twins, so the indexing, the warp reductions, the
odd-size tails and unaligned slices of every kernel are exercised on every machine with a C++
compiler. Alignment is checked as a GPU checks it: a 16-byte load from an address off the 16-byte grid
(which x86 reads without complaint) fails the launch with :class:`MisalignedLoadError`, naming the
kernel, the address and the tensor argument it points into.

It refuses to pass for a GPU: it is slow (every block starts ~128 threads), only for small shapes,
says nothing about speed, and does not model what differs on a GPU (memory coalescing, caches,
independent warp scheduling, fused multiply-add rounding). A missing ``g++`` raises
:class:`~offloadkit.errors.CudaUnavailableError`; the tests skip with that reason.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from offloadkit.errors import CudaUnavailableError
from offloadkit.kernels.cuda.loader import Launch
from offloadkit.kernels.cuda.nvrtc import KERNELS, read_source, source_dir

_CUDA_HEADERS = re.compile(r"^\s*#\s*include\s*<cuda_(bf16|fp16)\.h>\s*$", re.MULTILINE)
_CXX_FLAGS = ("-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-fno-strict-aliasing", "-w")


def compiler() -> str | None:
    """The C++ compiler the emulator uses (``g++`` on PATH), or None."""
    return shutil.which("g++")


def emulation_source(file: str, source: str | None = None, name_expressions: Sequence[str] | None = None) -> str:
    """``kernels/<file>.cu`` (or ``source``) after the emulation header, with one C entry point per name
    expression: ``int emu_launch_<i>(grid x, y, z, block x, void** args)``, non-zero after a misaligned
    load (``emu_fault()`` then says which)."""
    shim = (source_dir() / "emulate.hpp").read_text()
    text = read_source(file) if source is None else source
    body = _CUDA_HEADERS.sub("// (CUDA header left out: emulate.hpp defines what is used)", text)
    names = KERNELS[file] if name_expressions is None else name_expressions
    entries = [f'extern "C" int emu_launch_{i}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, void** args) {{\n'
               f"    return emu_run(dim3{{gx, gy, gz}}, dim3{{bx, 1, 1}}, [args] {{ emu_call(&{expr}, args); }});\n}}"
               for i, expr in enumerate(names)]
    return "\n".join((shim, body, *entries)) + "\n"


class MisalignedLoadError(RuntimeError):
    """A kernel read a vector from an address its alignment forbids: on a GPU, ``cudaErrorMisalignedAddress``."""


class EmulatorBackend:
    """A backend for :mod:`offloadkit.kernels.cuda.ops` that runs the kernels on CPU tensors."""

    device_type = "cpu"

    def __init__(self, build_dir: Path | str | None = None) -> None:
        self.build_dir = Path(build_dir or Path(tempfile.gettempdir()) / "offloadkit-emulate")
        self._libs: dict[str, ctypes.CDLL] = {}
        self._extra: dict[str, tuple[str, tuple[str, ...]]] = {}

    def add_source(self, file: str, source: str, name_expressions: Sequence[str]) -> None:
        """Make ``Launch(file, ...)`` run kernels of ``source`` (CUDA C not in ``kernels/``, e.g. a
        notebook's draft), exporting ``name_expressions``."""
        self._extra[file] = (source, tuple(name_expressions))
        self._libs.pop(file, None)

    def names(self, file: str) -> tuple[str, ...]:
        return self._extra[file][1] if file in self._extra else KERNELS[file]

    def library(self, file: str) -> ctypes.CDLL:
        """The compiled emulation of ``file`` (built once per source text, then reused from disk)."""
        if file in self._libs:
            return self._libs[file]
        cxx = compiler()
        if cxx is None:
            raise CudaUnavailableError("the CPU emulation of the CUDA kernels needs a C++20 compiler (g++) on PATH")
        source = emulation_source(file, *self._extra.get(file, (None, None)))
        digest = hashlib.sha256((source + " ".join(_CXX_FLAGS)).encode()).hexdigest()[:16]
        lib_path = self.build_dir / f"{file}-{digest}.so"
        if not lib_path.exists():
            self.build_dir.mkdir(parents=True, exist_ok=True)
            src_path = lib_path.with_suffix(".cpp")
            src_path.write_text(source)
            tmp = lib_path.with_suffix(f".{id(self)}.tmp")
            r = subprocess.run([cxx, *_CXX_FLAGS, str(src_path), "-o", str(tmp)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"g++ could not build the emulation of {file}.cu:\n{r.stderr[-4000:]}")
            tmp.replace(lib_path)  # atomic: a parallel test run never loads half a library
        self._libs[file] = ctypes.CDLL(str(lib_path))
        return self._libs[file]

    def run(self, launches: Sequence[Launch], stream=None) -> None:
        """Run the launches in order; raise :class:`MisalignedLoadError` after one that read a vector
        from a misaligned address (the launches after it are not run)."""
        for launch in launches:
            lib = self.library(launch.file)
            entry = getattr(lib, f"emu_launch_{self.names(launch.file).index(launch.kernel)}")
            entry.restype = ctypes.c_int
            values = [_c_value(a) for a in launch.args]
            pointers = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
                                                       for v in values))
            grid = (*launch.grid, 1, 1)[:3]
            if entry(*(ctypes.c_uint(g) for g in grid), ctypes.c_uint(launch.block[0]), pointers) != 0:
                lib.emu_fault.restype = ctypes.c_char_p
                fault = lib.emu_fault().decode()
                raise MisalignedLoadError(f"{launch.file}.cu {launch.kernel}: {fault}{_which_argument(fault, launch)}; "
                                          "a GPU stops this launch with 'misaligned address'")


def _which_argument(fault: str, launch: Launch) -> str:
    """`` — 4 bytes into argument 3 (a bfloat16 tensor [5, 67])`` for the tensor argument whose memory
    holds the faulting address, or nothing when none does."""
    match = re.search(r"address 0x([0-9a-f]+)", fault)
    if match is None:
        return ""
    address = int(match.group(1), 16)
    for i, a in enumerate(launch.args):
        if isinstance(a, torch.Tensor) and a.data_ptr() <= address < a.data_ptr() + a.numel() * a.element_size():
            return (f" — {address - a.data_ptr()} bytes into argument {i} (a {str(a.dtype).removeprefix('torch.')} "
                    f"tensor {list(a.shape)} at 0x{a.data_ptr():x})")
    return ""


def _c_value(a) -> ctypes._SimpleCData:
    """A kernel argument as the C value the kernel declares (a tensor: its data pointer)."""
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise CudaUnavailableError(f"the emulator runs on CPU tensors, got one on {a.device}")
        return ctypes.c_void_p(a.data_ptr())
    if isinstance(a, np.int32):
        return ctypes.c_int32(int(a))
    if isinstance(a, np.int64):
        return ctypes.c_int64(int(a))
    if isinstance(a, np.float32):
        return ctypes.c_float(float(a))
    raise TypeError(f"kernel arguments are tensors or sized numpy scalars, got {type(a).__name__}")


__all__ = ["EmulatorBackend", "MisalignedLoadError", "compiler", "emulation_source"]
