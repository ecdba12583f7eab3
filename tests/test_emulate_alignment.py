"""The CPU emulation checks what a GPU checks and x86 forgives: 16-byte loads from 16-byte-aligned addresses.

A kernel that reads a uint4 or float4 off the 16-byte grid computes the right numbers on a CPU and
stops with "misaligned address" on a GPU. These tests launch such reads on purpose (a misaligned
slice, and ``expert_swiglu.cu`` with its alignment prologue taken out) and expect the emulation to
fail naming the kernel, the address and the argument; aligned launches still pass. Needs g++ (C++20);
skipped with that reason without one.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from offloadkit.kernels.cuda import ops, twins
from offloadkit.kernels.cuda.emulate import EmulatorBackend, MisalignedLoadError, compiler
from offloadkit.kernels.cuda.loader import Launch
from offloadkit.kernels.cuda.nvrtc import KERNELS, read_source, source_dir

needs_gxx = pytest.mark.skipif(compiler() is None, reason="the CPU emulation of CUDA kernels needs g++ (C++20)")

# One 16-byte load per thread, through each of the two vector intrinsics the kernels use.
VECTOR_LOADS = r"""
__global__ void sum_float4(const float* x, float* out) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(x) + threadIdx.x);
    out[threadIdx.x] = v.x + v.y + v.z + v.w;
}
__global__ void sum_uint4(const float* x, float* out) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(x) + threadIdx.x);
    out[threadIdx.x] = __int_as_float(v.x) + __int_as_float(v.y) + __int_as_float(v.z) + __int_as_float(v.w);
}
"""
THREADS = 32


@pytest.fixture(scope="module")
def emu() -> EmulatorBackend:
    backend = EmulatorBackend()
    backend.add_source("vector_loads", VECTOR_LOADS, ["sum_float4", "sum_uint4"])
    return backend


@needs_gxx
@pytest.mark.parametrize("kernel, how", [("sum_float4", r"__ldg\(const float4\*\)"),
                                         ("sum_uint4", r"__ldcs\(const uint4\*\)")])
@pytest.mark.parametrize("start", [0, 4, 1, 2, 3, 5])  # first float of the slice; 0 and 4 are on the grid
def test_a_vector_load_off_the_16_byte_grid_fails(emu, kernel, how, start):
    base = torch.arange(4 * THREADS + 8, dtype=torch.float32)
    assert base.data_ptr() % 16 == 0  # torch's CPU allocator aligns far beyond 16 bytes
    x = base[start:]
    out = torch.zeros(THREADS)
    launch = Launch("vector_loads", kernel, (1,), (THREADS,), (x, out))
    if start % 4 == 0:
        emu.run([launch])
        torch.testing.assert_close(out, x[: 4 * THREADS].view(THREADS, 4).sum(dim=1))
        return
    with pytest.raises(MisalignedLoadError) as caught:
        emu.run([launch])
    message = str(caught.value)
    found = re.search(rf"vector_loads\.cu {kernel}: misaligned 16-byte load {how} from address 0x([0-9a-f]+) "
                      rf"\({start * 4 % 16} bytes past a 16-byte boundary\) in block \(0, 0, 0\), thread (\d+)",
                      message)
    assert found, message
    thread = int(found.group(2))  # whichever thread got there first: thread t reads 16 bytes at x + 16 t
    assert int(found.group(1), 16) == x.data_ptr() + 16 * thread
    assert f"{16 * thread} bytes into argument 0 (a float32 tensor [{x.numel()}] at 0x{x.data_ptr():x})" in message
    assert "misaligned address" in message


@needs_gxx
def test_the_launches_after_a_misaligned_one_do_not_run(emu):
    x = torch.arange(4 * THREADS + 4, dtype=torch.float32)
    first, second = torch.zeros(THREADS), torch.zeros(THREADS)
    with pytest.raises(MisalignedLoadError, match="sum_float4"):
        emu.run([Launch("vector_loads", "sum_float4", (1,), (THREADS,), (x[1:], first)),
                 Launch("vector_loads", "sum_uint4", (1,), (THREADS,), (x, second))])
    assert (second == 0).all()  # the launch after the faulty one never ran
    emu.run([Launch("vector_loads", "sum_uint4", (1,), (THREADS,), (x, second))])  # a new launch starts clean
    torch.testing.assert_close(second, x[: 4 * THREADS].view(THREADS, 4).sum(dim=1))


# expert_swiglu.cu reads each weight row one element at a time up to its first 16-byte boundary
# ("head"), then in 16-byte packs. With that prologue taken out, the kernel is right on a CPU for any
# slice and wrong on a GPU for every row that does not start on the grid.
ALIGNMENT_PROLOGUE = "int head = (int)(((16 - (reinterpret_cast<size_t>(w) & 15)) & 15) / sizeof(T));"


def launches_of_expert_swiglu(*args, rows):
    """The launches ``ops.expert_swiglu`` builds, not run."""
    captured: list[Launch] = []

    class Capture:
        device_type = "cpu"

        def run(self, launches, stream=None):
            captured.extend(launches)

    ops.expert_swiglu(*args, rows, backend=Capture())
    return captured


@needs_gxx
@pytest.mark.parametrize("hidden, inter, rows, aligned", [
    (64, 48, (8, 32), True),    # bf16 rows of 128 and 96 bytes, slice on 8-element boundaries: all on the grid
    (67, 45, (3, 30), False),   # odd widths: most rows start off the grid
])
def test_expert_swiglu_without_its_alignment_prologue_fails_only_on_unaligned_rows(emu, hidden, inter, rows, aligned):
    source = read_source("expert_swiglu")
    assert source.count(ALIGNMENT_PROLOGUE) == 1
    emu.add_source("expert_swiglu_no_head", source.replace(ALIGNMENT_PROLOGUE, "int head = 0;"),
                   KERNELS["expert_swiglu"])
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(3, hidden, generator=g)
    wg, wu = (torch.randn(inter, hidden, generator=g).bfloat16() for _ in range(2))
    wd = torch.randn(hidden, inter, generator=g).bfloat16()
    out = torch.randn(3, hidden, generator=g)
    launches = launches_of_expert_swiglu(x, wg, wu, wd, out, rows=rows)
    expected = twins.expert_swiglu(x, wg, wu, wd, out.clone(), rows)

    real = out.clone()
    emu.run([dataclasses.replace(la, args=tuple(real if a is out else a for a in la.args)) for la in launches])
    torch.testing.assert_close(real, expected, rtol=1e-4, atol=1e-4)  # the real kernel: right either way

    broken = out.clone()
    no_head = [dataclasses.replace(la, file="expert_swiglu_no_head",
                                   args=tuple(broken if a is out else a for a in la.args)) for la in launches]
    if aligned:  # every row the kernels read starts on the grid: nothing to catch
        emu.run(no_head)
        torch.testing.assert_close(broken, expected, rtol=1e-4, atol=1e-4)
    else:
        with pytest.raises(MisalignedLoadError, match=r"expert_gate_up<__nv_bfloat16>: misaligned 16-byte load "
                                                      r"__ldcs\(const uint4\*\) .* bytes into argument 3 "
                                                      r"\(a bfloat16 tensor \[27, 67\]"):
            emu.run(no_head)


@needs_gxx
def test_scalar_loads_need_only_their_own_alignment(emu):
    emu.add_source("scalar_load", "__global__ void copy(const float* x, float* out) "
                                  "{ out[threadIdx.x] = __ldg(x + threadIdx.x); }", ["copy"])
    x, out = torch.randn(THREADS + 3), torch.zeros(THREADS)
    emu.run([Launch("scalar_load", "copy", (1,), (THREADS,), (x[3:], out))])  # 12 bytes off the grid: fine
    torch.testing.assert_close(out, x[3:])
    raw = torch.zeros(4 * THREADS + 8, dtype=torch.uint8)
    with pytest.raises(MisalignedLoadError, match=r"misaligned 4-byte load __ldg .*\(2 bytes past a 4-byte"):
        emu.run([Launch("scalar_load", "copy", (1,), (THREADS,), (raw[2:], out))])


def test_every_vector_load_in_the_kernels_goes_through_a_checked_intrinsic():
    """The emulation checks __ldg and __ldcs; a plain ``*reinterpret_cast<const float4*>(p)`` would slip by."""
    cast = re.compile(r"reinterpret_cast<\s*(?:const\s+)?(?:u?int|float|double|u?long|u?short|u?char)[1-4]\s*\*\s*>")
    sources = sorted(source_dir().glob("*.cu")) + sorted(source_dir().glob("*.cuh"))
    assert len(sources) >= 7
    seen = 0
    for path in sources:
        text = path.read_text()
        for match in cast.finditer(text):
            seen += 1
            before = text[:match.start()].rstrip()
            assert before.endswith(("__ldg(", "__ldcs(")), (
                f"{path.name}: a vector pointer cast not inside __ldg/__ldcs, which the emulation cannot check: "
                f"{text[match.start():match.end() + 20]!r}")
    assert seen >= 2  # Pack<T>::load's uint4 and warp_dot's float4 reads
