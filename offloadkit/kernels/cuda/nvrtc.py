"""The CUDA kernel sources, the options they are compiled with, and a compile that needs no GPU.

This module is the single truth that the CuPy loader (:mod:`offloadkit.kernels.cuda.loader`), the compile
check of the test suite, ``offloadkit kernels compile`` and notebook 03 share:

- where the ``.cu`` files are: ``offloadkit/kernels/cuda/src/`` inside the package (so they ship in
  the wheel; the repository's top-level ``kernels/`` is a link to that folder), read through
  :mod:`importlib.resources`, with ``#include "common.cuh"`` pasted in (see that file for why);
- which kernels each file exports, as NVRTC *name expressions* (templates instantiated for every
  weight dtype: an uninstantiated template body is never fully compiled, so the check would miss it);
- :data:`NVRTC_OPTIONS`, the options the loader gives ``cupy.RawModule``; the check adds the ones
  CuPy appends itself (:data:`CUPY_APPENDED_OPTIONS`, the target architecture), so it compiles what
  CuPy would compile;
- :func:`compile_source`: NVRTC through the ``cuda-bindings`` wheel, which needs no driver and no GPU
  (``cuda_fp16.h`` / ``cuda_bf16.h`` come from the ``nvidia-cuda-runtime-cu12`` wheel).

It refuses to run anything: a compiled kernel is only checked here, never launched (that is
:mod:`offloadkit.kernels.cuda.ops`, and it needs CuPy and a GPU). With ``strict`` (the default) any
NVRTC warning is an error, and the error carries NVRTC's log.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from offloadkit.errors import CudaUnavailableError, OffloadkitError

#: Weight / KV-cache dtypes the templated kernels are instantiated for: torch dtype name -> CUDA type.
CUDA_TYPES: dict[str, str] = {"bfloat16": "__nv_bfloat16", "float16": "__half", "float32": "float"}


def _each_type(*kernels: str) -> tuple[str, ...]:
    return tuple(f"{k}<{c}>" for k in kernels for c in CUDA_TYPES.values())


#: Kernel file (stem of ``cuda/src/<name>.cu``) -> the ``__global__`` functions it exports.
KERNELS: dict[str, tuple[str, ...]] = {
    "attention_decode": _each_type("attention_decode"),
    "expert_swiglu": _each_type("expert_gate_up", "expert_down"),
    "moe_permute": ("moe_route_index", "moe_gather_rows", "moe_unpermute"),
    "norm": _each_type("rmsnorm", "layernorm"),
    "rope": ("rope",),
    "router_topk": ("router_topk",),
}

#: The options offloadkit passes to ``cupy.RawModule(options=...)``; the include path is added by
#: :func:`compile_options`. No fast math: the kernels are checked against their CPU twins.
NVRTC_OPTIONS: tuple[str, ...] = ("--std=c++17",)

#: Options CuPy appends on its own to every NVRTC compile (``cupy/cuda/compiler.py``, CuPy 13-14),
#: besides the architecture (``-arch=sm_XY``, a cubin, where NVRTC knows the GPU). The check adds them
#: too. CuPy may also add ``--pch`` (a precompiled-header cache: speed, not semantics).
CUPY_APPENDED_OPTIONS: tuple[str, ...] = ("--device-as-default-execution-space", "-ftz=true")

#: The compute capabilities every kernel must compile for: A100, RTX 30xx / A6000, RTX 40xx / L4, H100.
COMPUTE_CAPABILITIES: tuple[str, ...] = ("8.0", "8.6", "8.9", "9.0")

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)


class KernelCompileError(OffloadkitError):
    """NVRTC rejected a kernel (or warned, in strict mode); ``log`` holds NVRTC's own words."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(f"{message}\n{log}" if log else message)
        self.log = log


# ---- sources ---------------------------------------------------------------------------------------


def source_dir() -> Path:
    """The folder of the ``.cu`` files inside the installed package (a real folder: setuptools
    installs package data as plain files)."""
    return Path(str(resources.files("offloadkit.kernels.cuda") / "src"))


def kernel_names() -> tuple[str, ...]:
    """The kernel files that exist, e.g. ``("attention_decode", "expert_swiglu", ...)``."""
    return tuple(sorted(p.stem for p in source_dir().glob("*.cu")))


def read_source(name: str, directory: Path | str | None = None) -> str:
    """The CUDA C of kernel file ``name`` with its local ``#include "x.cuh"`` lines pasted in."""
    folder = Path(directory) if directory is not None else source_dir()
    path = folder / f"{name}.cu"
    if not path.is_file():
        raise OffloadkitError(f"no kernel source {path}; the kernels are: {', '.join(kernel_names())}")

    text = path.read_text()

    def paste(match: re.Match) -> str:
        header = folder / match.group(1)
        if not header.is_file():
            raise OffloadkitError(f"{path.name} includes {match.group(1)!r}, which is not in {folder}")
        resume = text.count("\n", 0, match.end()) + 2  # the line after the #include, 1-based
        # #line directives keep NVRTC's messages pointing at the real file and line.
        return f'#line 1 "{match.group(1)}"\n{header.read_text()}\n#line {resume} "{path.name}"'

    return _INCLUDE.sub(paste, text)


def cuda_include_dirs() -> tuple[str, ...]:
    """Folders holding ``cuda_fp16.h`` and ``cuda_bf16.h``: the ``nvidia-cuda-runtime-cu12`` wheel's
    include folder if installed, else what ``cuda-pathfinder`` finds (conda, ``CUDA_HOME``), else none
    (CuPy then relies on its own CUDA path)."""
    try:
        import nvidia.cuda_runtime as runtime_wheel

        for root in runtime_wheel.__path__:
            if (Path(root) / "include" / "cuda_bf16.h").is_file():
                return (str(Path(root) / "include"),)
    except ImportError:
        pass
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
        return (found,) if found else ()
    except Exception:  # pathfinder absent, or a version without this function
        return ()


def compile_options() -> tuple[str, ...]:
    """What the loader gives ``cupy.RawModule``: :data:`NVRTC_OPTIONS` plus the CUDA include path."""
    return NVRTC_OPTIONS + tuple(f"-I{d}" for d in cuda_include_dirs())


def arch_flag(compute_capability: str, target: str = "cubin") -> str:
    """``"8.9"`` -> ``--gpu-architecture=sm_89`` (a cubin, as CuPy compiles) or ``compute_89`` (PTX)."""
    digits = compute_capability.replace(".", "")
    if not digits.isdigit():
        raise OffloadkitError(f"a compute capability looks like 8.9, not {compute_capability!r}")
    return f"--gpu-architecture={'sm' if target == 'cubin' else 'compute'}_{digits}"


# ---- the driverless compile -------------------------------------------------------------------------


@dataclass(frozen=True)
class CompileResult:
    """What NVRTC made of one source for one architecture."""

    name: str
    arch: str
    target: str  # "ptx" or "cubin"
    image: bytes  # the PTX text (as bytes) or the cubin
    log: str
    seconds: float
    lowered: dict[str, str] = field(default_factory=dict)  # name expression -> mangled symbol

    @property
    def ptx(self) -> str:
        if self.target != "ptx":
            raise OffloadkitError(f"{self.name} was compiled to a {self.target}; compile with target='ptx'")
        return self.image.rstrip(b"\0").decode()


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise CudaUnavailableError(
            "compiling CUDA kernels without a GPU needs NVRTC from the cuda-bindings wheel: "
            "pip install 'cuda-bindings>=12.8,<13' nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 "
            "(or the test extra: pip install -e '.[test]')") from e
    return nvrtc


def nvrtc_version() -> str:
    nvrtc = _nvrtc()
    _, major, minor = nvrtc.nvrtcVersion()
    return f"{major}.{minor}"


def compile_source(source: str, name: str = "kernel.cu", name_expressions: tuple[str, ...] = (),
                   arch: str = "8.9", target: str = "ptx", options: tuple[str, ...] | None = None,
                   strict: bool = True) -> CompileResult:
    """Compile CUDA C ``source`` with NVRTC for compute capability ``arch``.

    ``options`` default to what CuPy would receive and add (:func:`compile_options` +
    :data:`CUPY_APPENDED_OPTIONS`). Raises :class:`KernelCompileError` with NVRTC's log on an
    error, and on any warning when ``strict``.
    """
    nvrtc = _nvrtc()
    opts = (compile_options() + CUPY_APPENDED_OPTIONS if options is None else options) + (arch_flag(arch, target),)
    start = time.perf_counter()
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    _ok(nvrtc, err, "nvrtcCreateProgram")
    try:
        for expr in name_expressions:
            _ok(nvrtc, nvrtc.nvrtcAddNameExpression(prog, expr.encode())[0], "nvrtcAddNameExpression")
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        # NVRTC writes into the buffer: it must be a fresh mutable one. (NVIDIA's samples pass
        # ``b" " * size``, which for an empty log (size 1) is CPython's interned ``b" "``: NVRTC's NUL
        # then turns every later ``b" "`` of the process into ``b"\0"``.)
        buf = bytearray(size)
        nvrtc.nvrtcGetProgramLog(prog, buf)
        log = bytes(buf).rstrip(b"\0").decode(errors="replace").strip()
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(f"NVRTC could not compile {name} for sm_{arch.replace('.', '')}:", log)
        if strict and log:
            raise KernelCompileError(f"NVRTC warned while compiling {name} for sm_{arch.replace('.', '')} "
                                     "(warnings are errors here):", log)
        get_size, get = ((nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX) if target == "ptx"
                         else (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN))
        err, size = get_size(prog)
        _ok(nvrtc, err, get_size.__name__)
        image_buf = bytearray(size)
        _ok(nvrtc, get(prog, image_buf)[0], get.__name__)
        image = bytes(image_buf)
        lowered = {}
        for expr in name_expressions:
            err, symbol = nvrtc.nvrtcGetLoweredName(prog, expr.encode())
            _ok(nvrtc, err, "nvrtcGetLoweredName")
            lowered[expr] = symbol.decode()
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return CompileResult(name, arch, target, image, log, time.perf_counter() - start, lowered)


def compile_kernel(name: str, arch: str = "8.9", target: str = "cubin", directory: Path | str | None = None,
                   strict: bool = True) -> CompileResult:
    """Compile kernel file ``name`` (from the package, or from ``directory``) with every name expression
    it exports, exactly as :mod:`offloadkit.kernels.cuda.loader` hands it to CuPy."""
    if name not in KERNELS:
        raise OffloadkitError(f"{name!r} is not a registered kernel file; known: {', '.join(KERNELS)}")
    return compile_source(read_source(name, directory), f"{name}.cu", KERNELS[name], arch, target, strict=strict)


def _ok(nvrtc, err, what: str) -> None:
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, text = nvrtc.nvrtcGetErrorString(err)
        raise KernelCompileError(f"{what} failed: {text.decode() if isinstance(text, bytes) else text}")


__all__ = [
    "COMPUTE_CAPABILITIES", "CUDA_TYPES", "CUPY_APPENDED_OPTIONS", "KERNELS", "NVRTC_OPTIONS", "CompileResult",
    "KernelCompileError", "arch_flag", "compile_kernel", "compile_options", "compile_source", "cuda_include_dirs",
    "kernel_names", "nvrtc_version", "read_source", "source_dir",
]
