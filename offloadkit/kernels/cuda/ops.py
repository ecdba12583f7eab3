"""The GPU lane's operations: check the inputs, size the grid, launch the kernels of ``kernels/*.cu``.

Each function here has a CPU twin of the same name and signature in :mod:`offloadkit.kernels.cuda.twins`
(the GPU tests compare the two). Each one checks its tensors against the kernel's contract
(:mod:`offloadkit.kernels.checks`), allocates what it returns on the tensors' device (through torch's
caching allocator), builds the list of :class:`~offloadkit.kernels.cuda.loader.Launch` es and hands it to a
backend: CuPy on a CUDA stream by default (``stream=None``: torch's current stream).

Streams: every buffer a wrapper allocates (output or scratch) is allocated on the *launch* stream
(:func:`on_stream`). Torch's caching allocator hands a freed block straight to the next allocation
on the stream it was allocated on, without waiting for other streams; a scratch buffer allocated on
the current stream, dropped when the wrapper returns while side-stream kernels still read it, could
be handed to other work under their feet. Allocated on the launch stream, it is reused only by work
queued behind them (and a zero-fill, itself a kernel, runs before them). Tensors the caller passes in
are recorded on the launch stream by the CuPy backend (``Tensor.record_stream``), for the same reason.

Not everything is a raw kernel, and it says so:
- the prefill expert (more than ``MAX_DECODE_TOKENS`` tokens) is three GEMMs, run by cuBLAS through
  torch (:func:`offloadkit.model.moe.swiglu` on CUDA tensors), not by ``expert_swiglu.cu``;
- the router GEMM (and every attention projection) is cuBLAS through torch; ``router_topk`` starts
  from the logits.

It refuses to copy: a tensor on the wrong device, of the wrong dtype or not contiguous is an error,
never silently converted.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from offloadkit.kernels.checks import WEIGHT_DTYPES, check_expert_inputs, check_tensor
from offloadkit.kernels.cuda import twins
from offloadkit.kernels.cuda.loader import DEFAULT_BACKEND, Launch, ceil_div, f32, i32, i64
from offloadkit.kernels.cuda.nvrtc import CUDA_TYPES
from offloadkit.model.moe import swiglu

#: Tokens one launch of expert_swiglu.cu handles (its MAX_TOKENS); more go to cuBLAS through torch.
MAX_DECODE_TOKENS = 8
WARPS_PER_BLOCK = 4  # expert and router kernels: one warp per row / token, 128 threads per block


def _ctype(dtype: torch.dtype) -> str:
    return CUDA_TYPES[str(dtype).removeprefix("torch.")]


def on_stream(stream):
    """A context in which allocations (and zero-fills) are queued on ``stream``; a no-op for ``None``
    (the current stream, where the backend launches then) and where torch has no CUDA (the emulator)."""
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def expert_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  out: torch.Tensor, rows: tuple[int, int] | None = None, *, stream=None,
                  backend=DEFAULT_BACKEND) -> torch.Tensor:
    """``out += W2[:, r0:r1] · (silu(W1[r0:r1] x) ⊙ W3[r0:r1] x)``; see :func:`twins.expert_swiglu`."""
    r0, r1 = check_expert_inputs(x, w_gate, w_up, w_down, out, rows, backend.device_type)
    n, hidden = x.shape
    s = r1 - r0
    if n == 0 or s == 0:
        return out
    if n > MAX_DECODE_TOKENS:  # prefill: cuBLAS through torch, on the same stream
        with on_stream(stream):
            out += swiglu(x, w_gate, w_up, w_down, rows=(r0, r1))
        return out
    with on_stream(stream):  # the scratch between the two kernels: freed on return, reused only behind them
        act = torch.empty(n, s, dtype=torch.float32, device=x.device)
    t = _ctype(w_gate.dtype)
    block = (32 * WARPS_PER_BLOCK,)
    launches = [
        Launch("expert_swiglu", f"expert_gate_up<{t}>", (ceil_div(s, WARPS_PER_BLOCK),), block,
               (x, i32(n), i32(hidden), w_gate[r0:r1], w_up[r0:r1], i32(s), act)),
        # W2 is read from column r0, row stride I: w_down[:, r0:] is a view starting at W2[0, r0].
        Launch("expert_swiglu", f"expert_down<{t}>", (ceil_div(hidden, WARPS_PER_BLOCK),), block,
               (act, i32(n), i32(s), w_down[:, r0:], i64(w_down.stride(0)), i32(hidden), out)),
    ]
    backend.run(launches, stream)
    return out


def _norm_launch(kernel: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 eps: float, out: torch.Tensor | None, stream, backend) -> torch.Tensor:
    with on_stream(stream):
        out = twins._norm_out(x, weight, out, backend.device_type)
    if bias is not None:
        check_tensor("bias", bias, dtypes=(weight.dtype,), ndim=1, device_type=backend.device_type)
        twins.check_shape("bias", bias, (x.shape[1],))
    if x.shape[0] == 0:
        return out
    params = (weight,) if bias is None else (weight, bias)
    backend.run([Launch("norm", f"{kernel}<{_ctype(weight.dtype)}>", (x.shape[0],), (256,),
                        (x, *params, out, i32(x.shape[1]), f32(eps)))], stream)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None, *, stream=None,
             backend=DEFAULT_BACKEND) -> torch.Tensor:
    """RMSNorm of the rows of ``x`` [N, H] f32; see :func:`twins.rms_norm`."""
    return _norm_launch("rmsnorm", x, weight, None, eps, out, stream, backend)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               out: torch.Tensor | None = None, *, stream=None, backend=DEFAULT_BACKEND) -> torch.Tensor:
    """LayerNorm (with bias) of the rows of ``x`` [N, H] f32; see :func:`twins.layer_norm`."""
    return _norm_launch("layernorm", x, weight, bias, eps, out, stream, backend)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, stream=None,
         backend=DEFAULT_BACKEND) -> torch.Tensor:
    """Rotate ``x`` [N, heads, D] in place by the rotary tables; see :func:`twins.rope`."""
    twins.check_rope(x, cos, sin, backend.device_type)
    n, heads, dim = x.shape
    threads = n * heads * (dim // 2)
    if threads:
        backend.run([Launch("rope", "rope", (ceil_div(threads, 256),), (256,),
                            (x, cos, sin, i32(n), i32(heads), i32(dim)))], stream)
    return x


def router_topk(logits: torch.Tensor, top_k: int, *, normalize: bool = True, mode: str = "softmax",
                jitter_eps: float = 0.01, shared_gate: bool = False, stream=None, backend=DEFAULT_BACKEND
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Router logits -> (weights, experts, shared gate or None); see :func:`twins.router_topk`."""
    n_experts = twins.check_router(logits, top_k, mode, shared_gate, backend.device_type)
    n = logits.shape[0]
    with on_stream(stream):
        weights = torch.empty(n, top_k, dtype=torch.float32, device=logits.device)
        experts = torch.empty(n, top_k, dtype=torch.int64, device=logits.device)
        shared = torch.empty(n, 1, dtype=torch.float32, device=logits.device) if shared_gate else None
    if n:
        backend.run([Launch("router_topk", "router_topk", (ceil_div(n, WARPS_PER_BLOCK),), (32 * WARPS_PER_BLOCK,),
                            (logits, i32(n), i32(n_experts), i32(shared_gate), i32(top_k),
                             i32(mode == "sparsemixer"), i32(normalize), f32(jitter_eps), weights, experts,
                             shared if shared is not None else weights))], stream)  # unused pointer without a gate
    return weights, experts, shared


def moe_permute(x: torch.Tensor, experts: torch.Tensor, n_experts: int, *, stream=None, backend=DEFAULT_BACKEND
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group tokens by expert -> (x_perm, src, dst, offsets); see :func:`twins.moe_permute`.

    ``experts`` must hold indices in ``[0, n_experts)`` (as ``router_topk`` writes them): the kernel
    cannot check device memory without a synchronisation.
    """
    dev = backend.device_type
    check_tensor("x", x, dtypes=(torch.float32,), ndim=2, device_type=dev)
    check_tensor("experts", experts, dtypes=(torch.int64,), ndim=2, device_type=dev)
    twins.check_shape("experts", experts, (x.shape[0], None))
    n, k = experts.shape
    m, hidden = n * k, x.shape[1]
    with on_stream(stream):
        x_perm = torch.empty(m, hidden, dtype=torch.float32, device=x.device)
        src = torch.empty(m, dtype=torch.int32, device=x.device)
        dst = torch.empty(m, dtype=torch.int32, device=x.device)
        # moe_route_index writes every entry when there are picks; with none, the offsets are all 0.
        offsets = (torch.empty if m else torch.zeros)(n_experts + 1, dtype=torch.int32, device=x.device)
    if m:
        backend.run([
            Launch("moe_permute", "moe_route_index", (n_experts,), (256,),
                   (experts, i32(m), i32(n_experts), src, dst, offsets)),
            Launch("moe_permute", "moe_gather_rows", (m,), (128,), (x, i32(hidden), src, i32(k), x_perm)),
        ], stream)
    return x_perm, src, dst, offsets


def moe_unpermute(y_perm: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, *,
                  stream=None, backend=DEFAULT_BACKEND) -> torch.Tensor:
    """``out[t] += sum_j weights[t, j] * y_perm[dst[t k + j]]``; see :func:`twins.moe_unpermute`."""
    dev = backend.device_type
    for name, t in (("y_perm", y_perm), ("weights", weights), ("out", out)):
        check_tensor(name, t, dtypes=(torch.float32,), ndim=2, device_type=dev)
    check_tensor("dst", dst, dtypes=(torch.int32,), ndim=1, device_type=dev)
    n, k = weights.shape
    twins.check_shape("out", out, (n, y_perm.shape[1]))
    twins.check_shape("dst", dst, (n * k,))
    twins.check_shape("y_perm", y_perm, (n * k, None))
    if n:
        backend.run([Launch("moe_permute", "moe_unpermute", (n,), (128,),
                            (y_perm, i32(y_perm.shape[1]), dst, weights, i32(k), out))], stream)
    return out


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                     window: int | None = None, *, stream=None, backend=DEFAULT_BACKEND) -> torch.Tensor:
    """One query per sequence over the KV cache (GQA) -> [B, H, D] f32; see :func:`twins.attention_decode`."""
    twins.check_attention(q, k_cache, v_cache, length, window, backend.device_type)
    b, heads, dim = q.shape
    with on_stream(stream):
        out = torch.empty_like(q)
    if b and heads:
        backend.run([Launch("attention_decode", f"attention_decode<{_ctype(k_cache.dtype)}>", (heads, b), (128,),
                            (q, k_cache, v_cache, out, i32(heads), i32(k_cache.shape[1]), i32(k_cache.shape[2]),
                             i32(dim), i32(length), i32(window or 0)))], stream)
    return out


__all__ = ["MAX_DECODE_TOKENS", "WEIGHT_DTYPES", "attention_decode", "expert_swiglu", "layer_norm", "moe_permute",
           "moe_unpermute", "on_stream", "rms_norm", "rope", "router_topk"]
