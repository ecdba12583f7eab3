"""Every CUDA kernel compiles with NVRTC, on every test run, on machines without a GPU.

Each kernel file is compiled for compute capabilities 8.0, 8.6, 8.9 and 9.0 to a cubin (as CuPy
compiles on those GPUs, ptxas included), with every templated kernel instantiated and with the very
options the loader gives ``cupy.RawModule`` plus those CuPy appends. Any NVRTC error or warning
fails the test with NVRTC's log. NVRTC comes from the ``cuda-bindings`` and ``nvidia-cuda-nvrtc-cu12``
wheels of the test extra: if they are missing this module fails to import, it never skips.
"""

from __future__ import annotations

import shutil
import sys
import types

import pytest
from cuda.bindings import nvrtc as _nvrtc_bindings  # noqa: F401  (a missing test extra fails here, loudly)

from offloadkit.kernels.cuda import loader, nvrtc
from offloadkit.kernels.cuda.nvrtc import COMPUTE_CAPABILITIES, KERNELS, KernelCompileError


@pytest.mark.parametrize("arch", COMPUTE_CAPABILITIES)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_compiles_without_warnings(name, arch):
    result = nvrtc.compile_kernel(name, arch)  # strict: a warning raises with NVRTC's log
    assert result.image and result.log == ""
    assert set(result.lowered) == set(KERNELS[name]), "every exported kernel must resolve to a symbol"


def test_every_kernel_file_is_registered():
    assert nvrtc.kernel_names() == tuple(sorted(KERNELS))
    assert (nvrtc.source_dir() / "common.cuh").is_file()


def test_check_options_are_the_loaders_plus_what_cupy_adds():
    opts = nvrtc.compile_options()
    assert opts[:len(nvrtc.NVRTC_OPTIONS)] == nvrtc.NVRTC_OPTIONS
    assert any(o.startswith("-I") and o.endswith("include") for o in opts), "cuda_bf16.h must be on the path"
    assert nvrtc.arch_flag("8.9") == "--gpu-architecture=sm_89"
    assert nvrtc.arch_flag("9.0", "ptx") == "--gpu-architecture=compute_90"


def test_loader_hands_cupy_the_same_source_options_and_names(monkeypatch):
    """With a stand-in CuPy, the loader's RawModule gets what the compile check compiles."""
    made = []

    class RawModule:
        def __init__(self, **kwargs):
            made.append(kwargs)

    fake = types.SimpleNamespace(RawModule=RawModule, __version__="fake",
                                 cuda=types.SimpleNamespace(is_available=lambda: True,
                                                            runtime=types.SimpleNamespace(getDeviceCount=lambda: 1)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    loader.load_module.cache_clear()
    try:
        for name in KERNELS:
            loader.load_module(name)
    finally:
        loader.load_module.cache_clear()
    for name, kwargs in zip(KERNELS, made, strict=True):
        assert kwargs["code"] == nvrtc.read_source(name)
        assert kwargs["options"] == nvrtc.compile_options()
        assert tuple(kwargs["name_expressions"]) == KERNELS[name]


def test_a_broken_kernel_fails_with_nvrtcs_message(tmp_path):
    shutil.copytree(nvrtc.source_dir(), tmp_path, dirs_exist_ok=True)
    path = tmp_path / "expert_swiglu.cu"
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if "out[t * hidden + h] += s;" in line)
    lines[at] = lines[at].replace("+= s;", "+= s * missing_scale;")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(KernelCompileError) as err:
        nvrtc.compile_kernel("expert_swiglu", "8.9", directory=tmp_path)
    assert f"expert_swiglu.cu({at + 1}): error" in str(err.value)  # the real file and line, despite the pasting
    assert 'identifier "missing_scale" is undefined' in err.value.log


def test_a_warning_fails_the_check(tmp_path):
    shutil.copytree(nvrtc.source_dir(), tmp_path, dirs_exist_ok=True)
    path = tmp_path / "rope.cu"
    path.write_text(path.read_text().replace("const int half = dim / 2;", "const int half = dim / 2;\n    int unused;"))
    with pytest.raises(KernelCompileError, match="warned") as err:
        nvrtc.compile_kernel("rope", "8.0", directory=tmp_path)
    assert "unused" in err.value.log
    assert nvrtc.compile_kernel("rope", "8.0", directory=tmp_path, strict=False).image


def test_ptx_can_be_produced():
    result = nvrtc.compile_kernel("rope", "8.9", target="ptx")
    assert ".target sm_89" in result.ptx and ".entry " + result.lowered["rope"] in result.ptx


def test_cli_compiles_and_reports_sizes(capsys):
    from offloadkit.cli import main

    assert main(["kernels", "compile", "--arch", "8.6", "--kernel", "norm"]) == 0
    out = capsys.readouterr().out
    assert "NVRTC 12." in out and "norm" in out and " ok " in out and "B" in out


def test_compiling_leaves_python_bytes_intact():
    """NVRTC writes its log into the buffer it is given; an immutable one corrupts the interpreter.

    With ``b" " * size`` as the buffer, an empty log (size 1) is written into CPython's interned
    ``b" "``, and every later ``b" " * n`` in the process is NUL bytes (it broke safetensors headers).
    """
    nvrtc.compile_kernel("norm", COMPUTE_CAPABILITIES[0])
    pad = 3
    assert b" " * pad == b"\x20\x20\x20"
