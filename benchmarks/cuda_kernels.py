"""Measured speed of the GPU lane's CUDA kernels, against the physical limit and against torch.

- ``expert_swiglu`` (a Mixtral-8x7B expert, 4096 x 14336, bf16 / f16): effective GB/s (weight bytes
  read / time) at n = 1 ... 8 tokens, next to the device's measured memory bandwidth (a 1 GiB
  device-to-device copy, counting read + write). The kernel is memory bound there: its roofline is
  that bandwidth (see the napkin math in ``kernels/expert_swiglu.cu``).
- ``attention_decode`` (Mixtral's 32 query / 8 KV heads x 128) at several cache lengths, against
  ``torch.nn.functional.scaled_dot_product_attention`` on the same cache.

Every figure is **measured** on the GPU named in the output, with CUDA events, after a warm-up.
On a machine without CUDA it says so and exits 0 (nothing to measure; see tests/test_cuda_compile.py
for what is checked there). Run: ``python benchmarks/cuda_kernels.py [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from offloadkit.hardware.probe_cuda import memory_bandwidth_gbps


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``fn`` on the current stream (CUDA events), after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_expert(dtype: torch.dtype, repeats: int, hidden: int = 4096, inter: int = 14336) -> list[dict]:
    from offloadkit.kernels.cuda import ops

    w = [torch.randn(*s, device="cuda").to(dtype) * 0.02 for s in ((inter, hidden), (inter, hidden), (hidden, inter))]
    weight_bytes = sum(t.numel() * t.element_size() for t in w)
    rows = []
    for n in range(1, ops.MAX_DECODE_TOKENS + 1):
        x, out = torch.randn(n, hidden, device="cuda"), torch.zeros(n, hidden, device="cuda")
        ms = time_ms(lambda x=x, out=out: ops.expert_swiglu(x, *w, out), repeats)
        rows.append({"tokens": n, "ms": ms, "gbps": weight_bytes / (ms * 1e-3) / 1e9})
    return rows


def bench_attention(repeats: int, lengths=(512, 2048, 8192, 32768), batch: int = 1) -> list[dict]:
    import torch.nn.functional as F

    from offloadkit.kernels.cuda import ops

    heads, kv, dim = 32, 8, 128
    rows = []
    for length in lengths:
        q = torch.randn(batch, heads, dim, device="cuda")
        k, v = (torch.randn(batch, kv, length, dim, device="cuda", dtype=torch.bfloat16) for _ in "kv")
        ours = time_ms(lambda q=q, k=k, v=v, n=length: ops.attention_decode(q, k, v, n), repeats)
        qb = q.to(torch.bfloat16)[:, :, None]
        sdpa = time_ms(lambda qb=qb, k=k, v=v: F.scaled_dot_product_attention(qb, k, v, enable_gqa=True), repeats)
        cache_bytes = 2 * k.numel() * k.element_size()
        rows.append({"length": length, "ours_ms": ours, "sdpa_ms": sdpa,
                     "ours_gbps": cache_bytes / (ours * 1e-3) / 1e9})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    from offloadkit.kernels.cuda.loader import cupy_status

    ok, why = cupy_status()
    if not (ok and torch.cuda.is_available()):
        print(f"No CUDA here, nothing to measure: {why if not ok else 'torch is a CPU build'}.")
        print("The kernels are still compiled for sm_80/86/89/90 by NVRTC on every test run "
              "(tests/test_cuda_compile.py) and checked against their twins in a CPU emulation.")
        return 0

    name = torch.cuda.get_device_name()
    peak = memory_bandwidth_gbps(2**30, args.repeats)  # the probe's measurement: one physical limit
    print(f"measured on {name}; device memory bandwidth (1 GiB copy, read + write): {peak:.0f} GB/s\n")
    for dtype in (torch.bfloat16, torch.float16):
        print(f"expert_swiglu, Mixtral-8x7B expert 4096 x 14336, {str(dtype)[6:]} weights (measured)")
        print("| tokens | ms | effective GB/s | of device bandwidth |\n|---:|---:|---:|---:|")
        for r in bench_expert(dtype, args.repeats):
            print(f"| {r['tokens']} | {r['ms']:.3f} | {r['gbps']:.0f} | {r['gbps'] / peak:.0%} |")
        print()
    print("attention_decode, 32 query / 8 KV heads x 128, bf16 cache, batch 1 (measured)")
    print("| cache length | ours ms | SDPA ms | ours / SDPA | ours cache GB/s |\n|---:|---:|---:|---:|---:|")
    for r in bench_attention(args.repeats):
        print(f"| {r['length']} | {r['ours_ms']:.3f} | {r['sdpa_ms']:.3f} | {r['ours_ms'] / r['sdpa_ms']:.2f} | "
              f"{r['ours_gbps']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
