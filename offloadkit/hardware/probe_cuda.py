"""The GPU and PCIe half of ``offloadkit profile``: what a CUDA device and its link really deliver.

Runs only where ``torch.cuda.is_available()``; ``probe.py`` calls :func:`measure_cuda` then and never
otherwise. It measures, on device 0:

- memory bandwidth: a device-to-device copy of 1 GiB (256 MiB with ``--quick``), read + write bytes;
- dense matmul TFLOP/s in f32 (TF32 off), bf16 and f16 on square matrices (8192; 4096 quick);
- launch overhead: many tiny ``add_`` kernels then one synchronize, per kernel, best of 3;
- H2D and D2H bandwidth from pinned and from pageable host memory (256 MiB; 64 MiB quick), every
  host page written first, and the latency of a 4-byte pinned copy (median); the link's generation
  and width from ``nvidia-smi``, asked about *this* device by its PCI bus id (or UUID);
- total and usable memory (free memory once torch's context exists, minus 0.5 GiB of allocator slack);
- a ``gpu_matmul_bf16`` curve: ``F.linear`` on the expert-sized weight across the probe's token counts,
  which the cost model prices bf16 and f16 GPU matmuls with (never below bytes / bandwidth).

It refuses to run on the CPU (no fallback figures): without CUDA it raises ``ProfileError``. None of
this can run on the machines offloadkit is developed on; ``tests/test_probe.py`` checks the profile
it produces through a fake measurement dict.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from typing import Any

from offloadkit.errors import ProfileError

STEPS = 5  # progress-bar steps this module adds
MIB = 2**20
GIB = 2**30
ALLOCATOR_SLACK_GIB = 0.5


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (False when torch lacks CUDA or there is no driver)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install must not break a CPU-only probe
        return False


def cuda_best_time(fn: Any, reps: int) -> float:
    """Best GPU time of ``fn`` (seconds) by CUDA events, after one warm-up."""
    import torch

    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def wall_best_time(fn: Any, reps: int) -> float:
    """Best wall time of ``fn`` followed by a device synchronize (for copies from pageable memory)."""
    import torch

    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth_gbps(nbytes: int, reps: int = 5) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_best_time(lambda: dst.copy_(src), reps) / 1e9


def matmul_tflops(dtype: Any, n: int, reps: int = 5) -> float:
    import torch

    a = torch.randn(n, n, device="cuda").to(dtype)
    b = torch.randn(n, n, device="cuda").to(dtype)
    c = torch.empty(n, n, device="cuda", dtype=dtype)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # f32 means the FP32 pipes, as in the spec sheets
    try:
        t = cuda_best_time(lambda: torch.mm(a, b, out=c), reps)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return 2 * n**3 / t / 1e12


def launch_overhead_us(kernels: int = 2000) -> float:
    import torch

    x = torch.zeros(1, device="cuda")

    def burst() -> None:
        for _ in range(kernels):
            x.add_(1.0)

    return wall_best_time(burst, 3) / kernels * 1e6


def host_buffer(nbytes: int, pinned: bool) -> Any:
    """A host tensor of ``nbytes`` bytes whose every page has been written.

    A fresh pageable allocation of this size is mapped on demand: until a page is written, every read
    of it comes from the kernel's one shared zero page, which stays in the CPU caches. An H2D copy from
    such a buffer reads almost no DRAM and overstates the pageable bandwidth. Writing it first gives
    each page its own frame, as a real weight buffer has. (Pinned memory is mapped and locked at
    allocation; it is written anyway, so both kinds are measured alike.)
    """
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    host.fill_(0xA5)  # any value: what matters is that every page is written
    return host


def copy_gbps(direction: str, pinned: bool, nbytes: int, reps: int = 5) -> float:
    import torch

    host = host_buffer(nbytes, pinned)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    if direction == "h2d":
        fn = lambda: dev.copy_(host, non_blocking=pinned)
    else:
        fn = lambda: host.copy_(dev, non_blocking=pinned)
    return nbytes / wall_best_time(fn, reps) / 1e9


def copy_latency_us(copies: int = 200) -> float:
    import torch

    host = torch.ones(1, dtype=torch.float32, pin_memory=True)
    dev = torch.empty(1, device="cuda")
    samples = []
    for _ in range(copies):
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples[10:]) * 1e6


def parse_link_query(text: str) -> str | None:
    """``"4, 16"`` (nvidia-smi's pcie.link.gen.max, pcie.link.width.max) -> ``"PCIe 4.0 x16"``."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    parts = [p.strip() for p in first.split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return f"PCIe {parts[0]}.0 x{parts[1]}"


def smi_device_id(index: int = 0) -> str | None:
    """How ``nvidia-smi --id=`` names torch's CUDA device ``index``: its PCI bus id (``00000000:41:00.0``),
    else its UUID (``GPU-...``), else None.

    Not the index: nvidia-smi numbers every GPU of the machine in PCI order, while torch numbers only
    those ``CUDA_VISIBLE_DEVICES`` shows, in the order it lists them (and CUDA's default order is
    fastest first): with ``CUDA_VISIBLE_DEVICES=1``, torch's device 0 is nvidia-smi's 1. The bus id
    and the UUID name one physical GPU whatever the numbering.
    """
    import torch

    props = torch.cuda.get_device_properties(index)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:  # where this torch has the PCI ids (older builds: the UUID only); function 0
        return f"{getattr(props, 'pci_domain_id', 0):08X}:{bus:02X}:{getattr(props, 'pci_device_id', 0):02X}.0"
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid:
        return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    return None


def link_name(index: int = 0) -> str:
    """The link's generation and width from nvidia-smi for torch's device ``index``, or a plain label
    when it cannot say (no nvidia-smi, or no way to name the device to it)."""
    smi = shutil.which("nvidia-smi")
    device = smi_device_id(index) if smi else None
    if smi and device:
        try:
            r = subprocess.run([smi, "--query-gpu=pcie.link.gen.max,pcie.link.width.max", "--format=csv,noheader",
                                f"--id={device}"], capture_output=True, text=True, timeout=10)
            name = parse_link_query(r.stdout) if r.returncode == 0 else None
            if name:
                return name
        except (OSError, subprocess.SubprocessError):
            pass
    return "PCIe (generation unknown)"


def measure_cuda(m: dict[str, Any], s: Any, bar: Any) -> None:
    """Add ``gpu``, ``link``, a ``gpu_matmul_bf16`` curve and their methods to the measurement dict."""
    if not cuda_available():
        raise ProfileError("no CUDA device: the GPU half of the probe cannot run here")
    import torch
    import torch.nn.functional as F

    quick = bool(m.get("quick"))
    methods = m["methods"]
    dev_bytes, copy_bytes, n = (256 * MIB, 64 * MIB, 4096) if quick else (GIB, 256 * MIB, 8192)
    torch.cuda.init()
    gpu: dict[str, Any] = {"name": torch.cuda.get_device_name(0)}

    bar.set_postfix_str("GPU memory bandwidth")
    gpu["memory_bandwidth_gbps"] = memory_bandwidth_gbps(dev_bytes)
    methods["gpu.memory_bandwidth_gbps"] = f"device copy of {dev_bytes // MIB} MiB (read + write), best of 5"
    bar.update()

    bar.set_postfix_str("GPU matmul")
    for key, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16)):
        gpu[f"flops_{key}_tflops"] = matmul_tflops(dtype, n)
        methods[f"gpu.flops_{key}_tflops"] = f"torch.mm {n} x {n} x {n} in {key} (TF32 off), best of 5"
    torch.cuda.empty_cache()
    bar.update()

    bar.set_postfix_str("GPU launch overhead")
    gpu["launch_overhead_us"] = launch_overhead_us()
    methods["gpu.launch_overhead_us"] = "2000 tiny add_ kernels then one synchronize, per kernel, best of 3"
    free, total = torch.cuda.mem_get_info(0)
    gpu["memory_gib"] = total / GIB
    gpu["usable_memory_gib"] = max(free / GIB - ALLOCATOR_SLACK_GIB, 0.0)
    methods["gpu.memory_gib"] = "torch.cuda.mem_get_info total"
    methods["gpu.usable_memory_gib"] = (f"free memory after torch's CUDA context, minus {ALLOCATOR_SLACK_GIB} GiB "
                                        "of allocator slack")
    bar.update()

    bar.set_postfix_str("PCIe copies")
    link: dict[str, Any] = {"name": link_name(0)}
    for direction in ("h2d", "d2h"):
        for pinned in (True, False):
            key = f"{direction}_{'pinned' if pinned else 'pageable'}_gbps"
            link[key] = copy_gbps(direction, pinned, copy_bytes)
            methods[f"link.{key}"] = (f"{direction.upper()} copy of {copy_bytes // MIB} MiB from "
                                      f"{'pinned' if pinned else 'pageable'} host memory (every page written "
                                      "first), best of 5")
    link["latency_us"] = copy_latency_us()
    methods["link.latency_us"] = "median of 200 pinned 4-byte H2D copies, each followed by a synchronize"
    bar.update()

    bar.set_postfix_str("GPU matmul curve")
    rows, cols = 14336, 4096  # a Mixtral-8x7B expert's W1 (the GPU has memory to spare for it)
    w = torch.randn(rows, cols, device="cuda").to(torch.bfloat16)
    seconds = []
    for tok in s.tokens:
        x = torch.randn(tok, cols, device="cuda").to(torch.bfloat16)
        seconds.append(cuda_best_time(lambda x=x, w=w: F.linear(x, w), 5))
    m["curves"]["gpu_matmul_bf16"] = {
        "tokens": list(s.tokens), "seconds": seconds, "params": rows * cols,
        "method": f"torch F.linear in bf16 on a {rows} x {cols} weight, best of 5 (CUDA events)"}
    del w
    torch.cuda.empty_cache()
    bar.update()
    m["gpu"], m["link"] = gpu, link
