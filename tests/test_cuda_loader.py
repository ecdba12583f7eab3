"""The CuPy loader's behaviour that needs no GPU: its errors (no CUDA, wrong device, wrong dtype,
non-contiguous tensors, a slice outside the block) and its launch path with a stand-in CuPy
(zero-copy views, bf16 passed as int16, the stream it was given)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from offloadkit import CudaUnavailableError, OffloadkitError
from offloadkit.kernels.checks import check_tensor
from offloadkit.kernels.cuda import loader, ops, twins
from offloadkit.kernels.cuda.emulate import EmulatorBackend

CPU_BACKEND = EmulatorBackend()  # device_type "cpu": the checks run as for a GPU, without one


def expert(dtype=torch.bfloat16, n=2, hidden=16, inter=24):
    return (torch.randn(n, hidden), torch.randn(inter, hidden).to(dtype), torch.randn(inter, hidden).to(dtype),
            torch.randn(hidden, inter).to(dtype), torch.zeros(n, hidden))


@pytest.mark.skipif(loader.cuda_available(), reason="this machine has CUDA")
def test_no_cuda_says_which_cupy_to_install():
    ok, why = loader.cupy_status()
    assert not ok and "cupy-cuda12x" in why and "cupy-cuda13x" in why
    with pytest.raises(CudaUnavailableError, match="cupy-cuda12x"):
        loader.require_cupy()
    with pytest.raises(CudaUnavailableError):
        loader.load_module("rope")


@pytest.mark.skipif(loader.cuda_available(), reason="this machine has CUDA")
def test_cpu_tensors_are_refused_by_the_gpu_kernels():
    with pytest.raises(OffloadkitError, match="x is on cpu, the kernel runs on cuda"):
        ops.expert_swiglu(*expert())
    with pytest.raises(OffloadkitError, match="is on cpu"):
        ops.rope(torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8))


def test_wrong_dtype_is_refused():
    x, wg, wu, wd, out = expert()
    with pytest.raises(OffloadkitError, match="w_up has dtype float16; this kernel takes bfloat16"):
        ops.expert_swiglu(x, wg, wu.half(), wd, out, backend=CPU_BACKEND)
    with pytest.raises(OffloadkitError, match="experts has dtype int32"):
        ops.moe_permute(x, torch.zeros(2, 2, dtype=torch.int32), 4, backend=CPU_BACKEND)
    with pytest.raises(OffloadkitError, match="q has dtype bfloat16"):
        ops.attention_decode(torch.randn(1, 2, 8).bfloat16(), *(torch.randn(1, 2, 4, 8) for _ in "kv"), 3,
                                  backend=CPU_BACKEND)


def test_non_contiguous_is_refused_not_copied():
    x, wg, wu, wd, out = expert()
    with pytest.raises(OffloadkitError, match="w_down .* is not contiguous"):
        ops.expert_swiglu(x, wg, wu, wd.t().contiguous().t(), out, backend=CPU_BACKEND)
    q = torch.randn(4, 3, 8).transpose(0, 1)
    with pytest.raises(OffloadkitError, match="x .* is not contiguous"):
        ops.rope(q, torch.randn(3, 8), torch.randn(3, 8), backend=CPU_BACKEND)
    with pytest.raises(OffloadkitError, match="not contiguous"):
        twins.rope(q, torch.randn(3, 8), torch.randn(3, 8))


def test_a_slice_outside_the_block_is_refused():
    with pytest.raises(OffloadkitError, match=r"the slice rows \[20, 25\) lies outside .*\(I = 24\)"):
        ops.expert_swiglu(*expert(), rows=(20, 25), backend=CPU_BACKEND)
    with pytest.raises(OffloadkitError, match=r"rows \[5, 3\)"):
        ops.expert_swiglu(*expert(), rows=(5, 3), backend=CPU_BACKEND)
    with pytest.raises(OffloadkitError, match=r"w_down has shape \(24, 15\), expected \[16, 24\]"):
        ops.expert_swiglu(*expert()[:3], torch.randn(24, 15).bfloat16(), torch.zeros(2, 16), backend=CPU_BACKEND)


def test_check_tensor_messages():
    with pytest.raises(OffloadkitError, match="must be a torch.Tensor"):
        check_tensor("x", [1.0], dtypes=(torch.float32,))
    with pytest.raises(OffloadkitError, match="must have 2 dimensions"):
        check_tensor("x", torch.zeros(3), dtypes=(torch.float32,), ndim=2)


def test_launch_path_with_a_stand_in_cupy(monkeypatch):
    """Tensors reach the kernel as zero-copy views (bf16 as int16), scalars as sized numpy values,
    inside the CUDA stream it was given."""
    calls, streams = [], []

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __call__(self, grid, block, args):
            calls.append((self.name, grid, block, args, streams[-1]))

    class Module:
        def __init__(self, **kwargs):
            pass

        def get_function(self, name):
            return Kernel(name)

    class Context:
        def __init__(self, value):
            self.value = value

        def __enter__(self):
            streams.append(self.value)

        def __exit__(self, *exc):
            return False

    fake = types.SimpleNamespace(
        RawModule=Module, __version__="fake", asarray=lambda t: ("view", t.dtype, t.data_ptr()),
        cuda=types.SimpleNamespace(is_available=lambda: True, Device=Context, ExternalStream=Context,
                                   runtime=types.SimpleNamespace(getDeviceCount=lambda: 1)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(loader.CupyBackend, "device_type", "cpu")
    loader.load_module.cache_clear()
    try:
        x, wg, wu, wd, out = expert(n=3, inter=24)
        ops.expert_swiglu(x, wg, wu, wd, out, rows=(5, 13), stream=types.SimpleNamespace(cuda_stream=1234))
    finally:
        loader.load_module.cache_clear()
    (name1, grid1, block1, args1, stream1), (name2, grid2, _, args2, _) = calls
    assert (name1, name2) == ("expert_gate_up<__nv_bfloat16>", "expert_down<__nv_bfloat16>")
    assert stream1 == 1234 and block1 == (128,) and grid1 == (2,) and grid2 == (4,)
    assert args1[0] == ("view", torch.float32, x.data_ptr())
    assert args1[3] == ("view", torch.int16, wg.data_ptr() + 5 * 16 * 2)  # row r0 of W1, as int16
    assert args2[3][2] == wd.data_ptr() + 5 * 2 and args2[4] == np.int64(24)  # W2[0, r0], leading dimension I
    assert all(isinstance(a, tuple | np.int32 | np.int64 | np.float32) for a in args1 + args2)


@pytest.mark.skipif(loader.cuda_available(), reason="this machine has CUDA")
def test_benchmark_says_there_is_no_cuda_and_exits_0(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "cuda_kernels.py"
    spec = importlib.util.spec_from_file_location("cuda_kernels_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([]) == 0
    assert "No CUDA here" in capsys.readouterr().out
