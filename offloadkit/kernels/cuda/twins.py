"""CPU twins of the CUDA kernels: plain torch functions with exactly each kernel's semantics.

A twin is the specification of its kernel (``kernels/<name>.cu``): same arguments, same layouts, same
output buffers written or accumulated into, same input contract (:mod:`offloadkit.kernels.checks`).
The GPU tests compare each kernel with its twin; the ``LoopbackDevice`` runs twins in place of
kernels on machines without a GPU. Where the reference forward already has the math, the twin calls
it (:func:`offloadkit.model.moe.swiglu`, :func:`offloadkit.model.reference.rms_norm`,
:func:`offloadkit.model.rope.apply_rope`, the routers of :mod:`offloadkit.model.moe`,
:func:`offloadkit.model.reference.causal_attention`) and adds only the kernel's contract: the
slice-and-accumulate into ``out``, the in-place rotation, the permuted layout.

Twins refuse to be fast (that is the kernels' job, and the Numba CPU kernels' for the CPU lane); they
accept tensors on any device, so a twin can also run on a GPU as a second opinion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offloadkit.errors import OffloadkitError
from offloadkit.kernels.checks import WEIGHT_DTYPES, check_expert_inputs, check_shape, check_tensor
from offloadkit.model.moe import route_softmax_topk, route_sparsemixer, swiglu
from offloadkit.model.reference import causal_attention
from offloadkit.model.reference import rms_norm as reference_rms_norm
from offloadkit.model.rope import apply_rope

F32 = (torch.float32,)

# ---- expert_swiglu.cu -------------------------------------------------------------------------------


def expert_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  out: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """``out += W2[:, r0:r1] · (silu(W1[r0:r1] x) ⊙ W3[r0:r1] x)`` in f32; returns ``out``.

    x, out [n, H] f32; w_gate, w_up [I, H] and w_down [H, I] bf16 / f16 / f32 (the whole block, or a
    staged slice passed with ``rows=None``). An empty slice adds nothing.
    """
    r0, r1 = check_expert_inputs(x, w_gate, w_up, w_down, out, rows, device_type=None)
    if r1 > r0 and x.shape[0] > 0:
        out += swiglu(x, w_gate, w_up, w_down, rows=(r0, r1))
    return out


# ---- norm.cu ----------------------------------------------------------------------------------------


def _norm_out(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None, device_type: str | None
              ) -> torch.Tensor:
    check_tensor("x", x, dtypes=F32, ndim=2, device_type=device_type)
    check_tensor("weight", weight, dtypes=WEIGHT_DTYPES, ndim=1, device_type=device_type)
    check_shape("weight", weight, (x.shape[1],))
    if out is None:
        return torch.empty_like(x)
    check_tensor("out", out, dtypes=F32, device_type=device_type)
    check_shape("out", out, tuple(x.shape))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``x`` [N, H] f32 RMS-normalised and scaled by ``weight`` [H]; written to ``out`` (may be ``x``)."""
    out = _norm_out(x, weight, out, None)
    return out.copy_(reference_rms_norm(x, weight, eps))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """PhiMoE's LayerNorm of rows of ``x`` [N, H] f32 with ``weight`` and ``bias`` [H]; written to ``out``."""
    out = _norm_out(x, weight, out, None)
    check_tensor("bias", bias, dtypes=(weight.dtype,), ndim=1)
    check_shape("bias", bias, (x.shape[1],))
    return out.copy_(F.layer_norm(x, (x.shape[1],), weight.float(), bias.float(), eps))


# ---- rope.cu ----------------------------------------------------------------------------------------


def check_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, device_type: str | None) -> None:
    check_tensor("x", x, dtypes=F32, ndim=3, device_type=device_type)
    if x.shape[2] % 2:
        raise OffloadkitError(f"rope needs an even head dimension, got {x.shape[2]}")
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor(name, table, dtypes=F32, ndim=2, device_type=device_type)
        check_shape(name, table, (x.shape[0], x.shape[2]))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [N, heads, D] f32 in place by the tables ``cos``, ``sin`` [N, D] of
    :func:`offloadkit.model.rope.rotary_tables` (row t for token t); returns ``x``."""
    check_rope(x, cos, sin, None)
    return x.copy_(apply_rope(x, cos[:, None, :], sin[:, None, :]))


# ---- router_topk.cu ---------------------------------------------------------------------------------


def check_router(logits: torch.Tensor, top_k: int, mode: str, shared_gate: bool, device_type: str | None) -> int:
    """Returns the number of routed experts E (``logits`` has E + 1 columns with a shared gate)."""
    check_tensor("logits", logits, dtypes=F32, ndim=2, device_type=device_type)
    n_experts = logits.shape[1] - int(shared_gate)
    if mode not in ("softmax", "sparsemixer"):
        raise OffloadkitError(f"router mode must be 'softmax' or 'sparsemixer', got {mode!r}")
    if mode == "sparsemixer" and top_k != 2:
        raise OffloadkitError(f"the sparsemixer router picks exactly 2 experts, not {top_k}")
    if not 1 <= top_k <= n_experts or n_experts > 256:
        raise OffloadkitError(f"top_k = {top_k} of {n_experts} experts: need 1 <= top_k <= E <= 256")
    return n_experts


def router_topk(logits: torch.Tensor, top_k: int, *, normalize: bool = True, mode: str = "softmax",
                jitter_eps: float = 0.01, shared_gate: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Router ``logits`` [N, E (+1)] f32 -> (weights [N, k] f32, experts [N, k] int64, shared [N, 1] f32 or None).

    ``mode="softmax"``: softmax, top-k, renormalised if ``normalize`` (Mixtral, Qwen2-MoE);
    ``mode="sparsemixer"``: PhiMoE's inference-time top-2. With ``shared_gate`` the last column is
    Qwen's shared-expert gate logit, and ``shared`` is its sigmoid.
    """
    n_experts = check_router(logits, top_k, mode, shared_gate, None)
    routed = logits[:, :n_experts]
    if mode == "sparsemixer":
        weights, experts = route_sparsemixer(routed, jitter_eps)
    else:
        weights, experts = route_softmax_topk(routed, top_k, normalize)
    shared = torch.sigmoid(logits[:, n_experts:]) if shared_gate else None
    return weights.float(), experts.long(), shared


# ---- moe_permute.cu ---------------------------------------------------------------------------------


def moe_permute(x: torch.Tensor, experts: torch.Tensor, n_experts: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the N x k picks by expert: (x_perm [N k, H] f32, src [N k] int32, dst [N k] int32, offsets [E+1] int32).

    Pick p = t * k + j goes to permuted row ``dst[p]``; ``src`` is the inverse; expert e's rows are
    ``[offsets[e], offsets[e + 1])``, in increasing p (the order ``dispatch_experts`` visits them).
    """
    check_tensor("x", x, dtypes=F32, ndim=2)
    check_tensor("experts", experts, dtypes=(torch.int64,), ndim=2)
    check_shape("experts", experts, (x.shape[0], None))
    flat = experts.reshape(-1)
    src = torch.argsort(flat, stable=True)
    dst = torch.empty_like(src)
    dst[src] = torch.arange(flat.numel(), device=flat.device)
    counts = torch.bincount(flat, minlength=n_experts)[:n_experts]
    offsets = torch.cat((counts.new_zeros(1), torch.cumsum(counts, 0)))
    x_perm = x[src // experts.shape[1]]
    return x_perm, src.int(), dst.int(), offsets.int()


def moe_unpermute(y_perm: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[t] += sum_j weights[t, j] * y_perm[dst[t * k + j]]``; returns ``out`` [N, H] f32."""
    check_tensor("y_perm", y_perm, dtypes=F32, ndim=2)
    check_tensor("weights", weights, dtypes=F32, ndim=2)
    check_tensor("out", out, dtypes=F32, ndim=2)
    check_tensor("dst", dst, dtypes=(torch.int32,), ndim=1)
    n, k = weights.shape
    check_shape("out", out, (n, y_perm.shape[1]))
    check_shape("dst", dst, (n * k,))
    check_shape("y_perm", y_perm, (n * k, None))
    out += (weights[:, :, None] * y_perm[dst.long()].view(n, k, -1)).sum(dim=1)
    return out


# ---- attention_decode.cu ----------------------------------------------------------------------------


def check_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                    window: int | None, device_type: str | None) -> None:
    check_tensor("q", q, dtypes=F32, ndim=3, device_type=device_type)
    check_tensor("k_cache", k_cache, dtypes=WEIGHT_DTYPES, ndim=4, device_type=device_type)
    check_tensor("v_cache", v_cache, dtypes=(k_cache.dtype,), ndim=4, device_type=device_type)
    b, heads, dim = q.shape
    check_shape("k_cache", k_cache, (b, None, None, dim))
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    kv, capacity = k_cache.shape[1], k_cache.shape[2]
    if heads % kv:
        raise OffloadkitError(f"{heads} query heads cannot share {kv} KV heads (H must be a multiple of KV)")
    if dim > 256:
        raise OffloadkitError(f"attention_decode handles head_dim <= 256, got {dim}")
    if not 1 <= length <= capacity:
        raise OffloadkitError(f"length {length} must be in [1, {capacity}] (the cache's capacity)")
    if window is not None and window < 0:
        raise OffloadkitError(f"a sliding window must be positive (or None), got {window}")


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                     window: int | None = None) -> torch.Tensor:
    """One query per sequence, ``q`` [B, H, D] f32 at position ``length - 1``, over the cached keys and
    values [B, KV, S, D] of positions ``[0, length)`` (a sliding ``window`` if given) -> [B, H, D] f32."""
    check_attention(q, k_cache, v_cache, length, window, None)
    k = k_cache[:, :, :length].float()
    v = v_cache[:, :, :length].float()
    return causal_attention(q[:, :, None, :], k, v, length - 1, window or None)[:, :, 0, :].contiguous()


__all__ = ["attention_decode", "expert_swiglu", "layer_norm", "moe_permute", "moe_unpermute", "rms_norm",
           "rope", "router_topk"]
