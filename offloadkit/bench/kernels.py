"""``offloadkit bench kernels``: the CPU expert kernels against the memory they read and against torch.

One run measures, on each expert shape (a Mixtral-8x7B expert, 4096 x 14336, and the demo model's):

- the **memory read** of this machine (:func:`offloadkit.hardware.stream.measure_read`'s buffer and
  threads, the same figure ``offloadkit profile`` and the notebooks print), sampled in every round;
- the **decode kernel** at n = 1, 2, 4, 8 tokens for bf16 and f32 weights: effective GB/s (weight
  bytes / time) and its ratio to that read, and **torch** (``F.linear`` x 3 + SiLU in the weights'
  dtype) on the same weights: GB/s and our speed-up over it;
- the **prefill kernel** (blocked, widened once per block, torch's BLAS) at n = 32 ... 512:
  GFLOP/s (``6 n H I`` flops) and its ratio to torch's f32 GEMM on the same shapes (f32 weights);
  where ``path="auto"`` takes the decode kernel instead (up to ``DECODE_MAX_TOKENS``), that kernel
  is measured too (rows ``auto``), since it is what the package runs at those token counts;
- the CPU-lane ops around the experts (RMSNorm, LayerNorm, attention over a KV cache), Numba
  against torch (:func:`offloadkit.kernels.cpu.norms_attention.compare_lane_ops`).

Measurements are interleaved: each round takes read samples and times every case once (the best of a
few calls), and each figure is the best over the rounds, so a neighbour's burst of load on a shared
machine hits the numerator and the denominator of a ratio alike. The read's spread over the run is
printed with it: where it is wide, the machine was busy and another run will print other figures.
Every figure is **measured** on the machine named in the output (CPU model, threads) with the dtype in
its row; nothing here is simulated.

It reports ratios, never verdicts: :func:`ratios` turns the rows of this run into sentences a user
can read ("decode n=1 reads its bf16 weights at 0.93x the memory read measured in this run").
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
import torch.nn.functional as F

from offloadkit.hardware.machine import machine_label
from offloadkit.hardware.stream import READ_BYTES, ReadMeasurement, ReadMeter, read_buffer
from offloadkit.kernels.cpu.experts import DECODE_MAX_TOKENS, ExpertWeights, expert_rows
from offloadkit.kernels.cpu.norms_attention import compare_lane_ops
from offloadkit.paths import demo_model_dir

DECODE_TOKENS = (1, 2, 4, 8)
PREFILL_TOKENS = (32, 64, 128, 256, 512)


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int


MIXTRAL = Shape("mixtral-8x7b expert", 4096, 14336)


def demo_shape() -> Shape | None:
    """The demo model's expert shape, if its config is there."""
    cfg = demo_model_dir() / "config.json"
    if not cfg.exists():
        return None
    data = json.loads(cfg.read_text())
    return Shape("demo-mixtral expert", int(data["hidden_size"]), int(data["intermediate_size"]))


# ---- timing ----------------------------------------------------------------------------------------


def time_call(fn: Callable[[], object], min_s: float = 0.02, max_calls: int = 1000) -> float:
    """Seconds per call of ``fn``: calls it until ``min_s`` has passed (at least once), returns the mean."""
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s or calls >= max_calls:
            return elapsed / calls


def _weights(shape: Shape, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Random expert weights in f32 and bf16 (the bf16 bits of the same numbers)."""
    rng = np.random.default_rng(seed)
    h, i = shape.hidden, shape.intermediate
    f32 = [(rng.standard_normal(s, dtype=np.float32) * 0.02) for s in ((i, h), (i, h), (h, i))]
    bf16 = [(a.view(np.uint32) >> 16).astype(np.uint16) for a in f32]
    return {"float32": f32, "bfloat16": bf16}


def torch_views(arrays: list[np.ndarray], dtype: str) -> list[torch.Tensor]:
    """Zero-copy torch views of weight arrays in kernel storage (bf16 bits as ``torch.bfloat16``)."""
    ts = [torch.from_numpy(a) for a in arrays]
    return ts if dtype == "float32" else [t.view(torch.int16).view(torch.bfloat16) for t in ts]


def torch_swiglu(x: torch.Tensor, w: list[torch.Tensor]) -> torch.Tensor:
    """torch's SwiGLU expert (``F.linear`` x 3 + SiLU) in the weights' dtype: what the kernels are held against."""
    with torch.no_grad():
        return F.linear(F.silu(F.linear(x, w[0])) * F.linear(x, w[1]), w[2])


# ---- the benchmark ---------------------------------------------------------------------------------


def bench_shape(shape: Shape, rounds: int = 3, decode_tokens: Sequence[int] = DECODE_TOKENS,
                prefill_tokens: Sequence[int] = PREFILL_TOKENS, min_s: float = 0.02,
                read: ReadMeter | None = None) -> list[dict[str, Any]]:
    """Measured rows for one expert shape (see the module docstring); ``read`` samples the memory read."""
    weights = _weights(shape)
    meter = read or ReadMeter()
    rng = np.random.default_rng(1)
    cases: dict[tuple, Callable[[], object]] = {}
    for dtype, arrays in weights.items():
        ew = ExpertWeights.from_torch(*arrays)
        tw = torch_views(arrays, dtype)
        for n in decode_tokens:
            x = rng.standard_normal((n, shape.hidden), dtype=np.float32)
            xt = torch.from_numpy(x).to(tw[0].dtype)
            cases[("decode", dtype, n)] = lambda x=x, ew=ew: expert_rows(x, ew, path="decode")
            cases[("torch", dtype, n)] = lambda xt=xt, tw=tw: torch_swiglu(xt, tw)
        for n in prefill_tokens:
            x = rng.standard_normal((n, shape.hidden), dtype=np.float32)
            cases[("prefill", dtype, n)] = lambda x=x, ew=ew: expert_rows(x, ew, path="prefill")
            if n <= DECODE_MAX_TOKENS[dtype]:  # "auto" takes the decode kernel here: measure that too
                cases[("auto", dtype, n)] = lambda x=x, ew=ew: expert_rows(x, ew, path="decode")
            if dtype == "float32":
                xt = torch.from_numpy(x)
                cases[("torch_gemm", dtype, n)] = lambda xt=xt, tw=tw: torch_swiglu(xt, tw)
    # Cases that a ratio compares run next to each other (the read, then the same n of every dtype, then
    # torch), so a burst of load from a neighbour on a shared machine tends to hit both sides of a ratio.
    order = sorted(cases, key=lambda k: (k[0] in ("prefill", "auto", "torch_gemm"), k[2], k[1], k[0]))
    for fn in cases.values():  # warm-up: compile / load every kernel, touch every page
        fn()
    best: dict[tuple, float] = {}
    samples_before = len(meter.samples_s)
    for _ in range(rounds):
        spent = 0.0
        while spent < min_s or len(meter.samples_s) == samples_before:  # at least one read per round
            spent += meter.sample()
        for key in order:
            fn = cases[key]
            best[key] = min(best.get(key, float("inf")), time_call(fn, min_s))
    return _rows(shape, weights, best, meter.result(since=samples_before))


def _rows(shape: Shape, weights: dict[str, list[np.ndarray]], best: dict[tuple, float],
          read: ReadMeasurement) -> list[dict[str, Any]]:
    base = {"shape": shape.name, "hidden": shape.hidden, "intermediate": shape.intermediate, "source": "measured"}
    lo, mid, hi = read.spread
    rows = [{**base, "kernel": "read", "dtype": "", "tokens": 0, "time_s": read.nbytes / read.gbps / 1e9,
             "gbps": read.gbps, "gflops": 0.0, "read_bytes": read.nbytes, "read_samples": len(read.samples_s),
             "read_spread_gbps": [lo, mid, hi], "read_noisy": read.noisy, "read_text": read.describe()}]
    flops_per_token = 6 * shape.hidden * shape.intermediate
    for (kind, dtype, n), t in best.items():
        nbytes = sum(a.nbytes for a in weights[dtype])
        row = {**base, "kernel": kind, "dtype": dtype, "tokens": n, "time_s": t, "gbps": nbytes / t / 1e9,
               "gflops": flops_per_token * n / t / 1e9}
        if kind == "decode":
            row["vs_read"] = row["gbps"] / read.gbps
            row["vs_torch"] = best[("torch", dtype, n)] / t
        elif kind == "torch":
            row["vs_read"] = row["gbps"] / read.gbps
        elif kind in ("prefill", "auto"):
            row["vs_torch_f32_gemm"] = best[("torch_gemm", "float32", n)] / t
        rows.append(row)
    return rows


def run(shapes: Sequence[Shape] | None = None, rounds: int = 3, quick: bool = False,
        read_bytes: int = READ_BYTES) -> dict[str, Any]:
    """The whole benchmark: rows for every shape, the machine, and the ratios on the first shape."""
    if shapes is None:
        shapes = [MIXTRAL] + [s for s in (demo_shape(),) if s is not None]
    dec, pre = ((1, 8), (32, 128)) if quick else (DECODE_TOKENS, PREFILL_TOKENS)
    buffer = read_buffer(read_bytes)  # one buffer for the run; each shape keeps its own read samples
    rows = [r for s in shapes
            for r in bench_shape(s, rounds, dec, pre, 0.005 if quick else 0.02, ReadMeter([buffer]))]
    hidden = shapes[0].hidden
    lane = compare_lane_ops(hidden, (1,) if quick else (1, 512), 8 if quick else 512, 3 if quick else 20)
    return {"source": "measured", "machine": machine_label(), "numba_threads": numba.get_num_threads(),
            "torch_threads": torch.get_num_threads(), "numba": numba.__version__, "torch": torch.__version__,
            "rows": rows, "lane_ops": lane, "ratios": ratios(rows, shapes[0].name)}


def ratios(rows: list[dict[str, Any]], shape: str) -> list[dict[str, Any]]:
    """The run's headline ratios on ``shape``, each as a sentence and a number (only rows of this run)."""
    def find(kind: str, dtype: str, n: int) -> dict[str, Any] | None:
        return next((r for r in rows if (r["shape"], r["kernel"], r["dtype"], r["tokens"]) == (shape, kind, dtype, n)),
                    None)

    read = find("read", "", 0)
    out = []
    for dtype in ("bfloat16", "float32"):
        r = find("decode", dtype, 1)
        if r and read:
            out.append({"ratio": r["vs_read"],
                        "text": f"decode n=1 reads its {dtype} weights at {r['vs_read']:.2f}x the memory read "
                                f"measured in this run ({read['gbps']:.1f} GB/s)"})
    r = find("decode", "bfloat16", 1)
    if r:
        out.append({"ratio": r["vs_torch"],
                    "text": f"decode n=1 on bfloat16 weights runs at {r['vs_torch']:.2f}x the speed of torch "
                            f"(F.linear in bfloat16) on the same weights"})
    for dtype in ("bfloat16", "float32"):
        pre = {r["tokens"]: r for r in rows if r["shape"] == shape and r["kernel"] == "prefill" and r["dtype"] == dtype}
        auto = dict(pre)
        auto.update({r["tokens"]: r for r in rows if r["shape"] == shape and r["kernel"] == "auto"
                     and r["dtype"] == dtype})
        for label, chosen in (("the package's kernel (path=auto)", auto), ("the blocked BLAS path alone", pre)):
            if chosen:
                worst = min(chosen.values(), key=lambda r: r["vs_torch_f32_gemm"])
                ratio = worst["vs_torch_f32_gemm"]
                out.append({"ratio": ratio,
                            "text": f"prefill n={min(chosen)}..{max(chosen)} on {dtype} weights, {label}: at least "
                                    f"{ratio:.2f}x the speed of torch's f32 GEMM (slowest at n={worst['tokens']})"})
    return out


# ---- output ----------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def format_markdown(result: dict[str, Any]) -> str:
    """The result as markdown: the read of this run, one table of measured rows, then the ratios."""
    head = (f"**measured** on {result['machine']} (Numba {result['numba']}, {result['numba_threads']} threads; "
            f"torch {result['torch']}, {result['torch_threads']} threads)\n\n")
    reads = [r for r in result["rows"] if r["kernel"] == "read"]
    head += "".join(f"Memory read, sampled between the {r['shape']} kernels: {r['read_text']}\n" for r in reads)
    head += ("\n*vs read*: the kernel's weight bytes per second over that read. Weights that fit in the CPU's "
             "caches (a small expert, the demo model's) are read faster than memory, so their ratio can pass 1.\n")
    head += ("\n| shape | kernel | dtype | tokens | time ms | GB/s | GFLOP/s | vs read | vs torch "
             "| vs torch f32 GEMM |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    order = {"read": 0, "decode": 1, "torch": 2, "auto": 3, "prefill": 4, "torch_gemm": 5}
    rows = sorted(result["rows"], key=lambda r: (r["shape"], order[r["kernel"]], r["dtype"], r["tokens"]))
    lines = []
    for r in rows:
        gflops = "" if r["kernel"] == "read" else _fmt(r["gflops"], ".1f")
        lines.append(f"| {r['shape']} | {r['kernel']} | {r['dtype']} | {r['tokens'] or ''} | "
                     f"{r['time_s'] * 1e3:.3f} | {r['gbps']:.1f} | {gflops} | {_fmt(r.get('vs_read'), '.2f')} | "
                     f"{_fmt(r.get('vs_torch'), '.2f')} | {_fmt(r.get('vs_torch_f32_gemm'), '.2f')} |")
    lane = "\n".join(f"| {r['op']} | {r['tokens']} | {r['hidden']} | {r['numba_s'] * 1e6:.1f} | "
                     f"{r['torch_s'] * 1e6:.1f} | {'Numba' if r['numba_s'] < r['torch_s'] else 'torch'} |"
                     for r in result.get("lane_ops", []))
    if lane:
        lane = ("\n\nCPU-lane ops, **measured** (float32 activations; best of several calls):\n\n"
                "| op | tokens | hidden | Numba µs | torch µs | faster |\n|---|---:|---:|---:|---:|---|\n" + lane)
    first = result["rows"][0]["shape"] if result["rows"] else ""
    said = "\n".join(f"- {r['text']}" for r in result["ratios"])
    return (head + "\n".join(lines) + lane + f"\n\nIn this run, on the {first} (measured on {result['machine']}):\n"
            + said + "\n")


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.write_text(json.dumps(result, indent=1))
    return p


__all__ = ["MIXTRAL", "Shape", "bench_shape", "demo_shape", "format_markdown", "ratios", "run", "time_call",
           "torch_swiglu", "torch_views", "write_json"]
