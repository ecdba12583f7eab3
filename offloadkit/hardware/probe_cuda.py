"""The GPU and PCIe half of ``offloadkit profile``: what a CUDA device and its link really deliver.

Runs only where ``torch.cuda.is_available()``; ``probe.py`` calls :func:`measure_cuda` then and never
otherwise. It measures, on device 0:

- memory bandwidth: a device-to-device copy of 1 GiB (256 MiB with ``--quick``), read + write bytes;
- dense matmul TFLOP/s in f32 (TF32 off), bf16 and f16 on square matrices (8192; 4096 quick);
- launch overhead: many tiny ``add_`` kernels then one synchronize, per kernel, best of 3;
- H2D and D2H bandwidth from pinned and from pageable host memory (256 MiB; 64 MiB quick), and the
  latency of a 4-byte pinned copy (median);
- total and usable memory (free memory once torch's context exists, minus 0.5 GiB of allocator slack);
- a ``gpu_matmul_bf16`` curve: ``F.linear`` on the expert-sized weight across the probe's token counts.

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


def copy_gbps(direction: str, pinned: bool, nbytes: int, reps: int = 5) -> float:
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
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


def link_name() -> str:
    """The link's generation and width from nvidia-smi, or a plain label when it cannot say."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            r = subprocess.run([smi, "--query-gpu=pcie.link.gen.max,pcie.link.width.max", "--format=csv,noheader",
                                "--id=0"], capture_output=True, text=True, timeout=10)
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
    link: dict[str, Any] = {"name": link_name()}
    for direction in ("h2d", "d2h"):
        for pinned in (True, False):
            key = f"{direction}_{'pinned' if pinned else 'pageable'}_gbps"
            link[key] = copy_gbps(direction, pinned, copy_bytes)
            methods[f"link.{key}"] = (f"{direction.upper()} copy of {copy_bytes // MIB} MiB from "
                                      f"{'pinned' if pinned else 'pageable'} host memory, best of 5")
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
