"""How far an f32 kernel's result may honestly be from the exact one: forward error bounds for the tests.

Every kernel offloadkit has (the Numba CPU kernels, the CUDA kernels and their emulation, the torch
twins) computes in f32 from inputs it reads *exactly*: f32 activations, and weights stored bf16 / f16
/ f32, which widen to f32 without rounding. So a test computes the exact result in f64 from the same
stored inputs (storage rounding is then not counted as kernel error) and checks that the kernel is
within a bound that numerical analysis gives for *any* f32 implementation of the formula, whatever
order it sums in: SIMD lanes, warps, BLAS tiles, row slices accumulated into ``out``.

    >>> want = swiglu_expert(x, w_gate, w_up, w_down, rows=(0, 13), out=out0)  # exact value, bound
    >>> assert_within(kernel_result, want, "expert_swiglu")

The model is Higham's (*Accuracy and Stability of Numerical Algorithms*, 2nd ed., 2002):

- each + - * / and square root is rounded once: ``fl(a op b) = (a op b)(1 + δ)``, ``|δ| <= u = 2^-24``;
- ``k`` roundings compound to ``1 + θ`` with ``|θ| <= γ_k = k u / (1 - k u)`` (his Lemma 3.1), and
  ``γ_j + γ_k + γ_j γ_k <= γ_{j+k}`` (Lemma 3.3), which is how the counts below add up;
- a dot product of length ``n``, summed in any order, with or without FMA, has
  ``|fl(x·y) - x·y| <= γ_n Σ|x_i y_i|`` (his (3.5)). The error is relative to the sum of the
  *absolute* terms: a dot product whose terms cancel has a large error relative to its result, and
  that is no bug (the one-row expert of ``hidden=22, inter=1`` in issue 8 is such a case).

Library functions are not correctly rounded; the bounds use the loosest accuracy any backend may have:

- ``exp`` within 4 ulp, a relative error of ``8u`` (:data:`EXP`): glibc's ``expf`` and Sleef's ``u10``
  functions (torch on the CPU) are within 1 ulp, CUDA's ``expf`` within 2 ulp (CUDA C++ Programming
  Guide, "Mathematical functions"), and SVML's default variants (without ``_ha``), which Numba picks
  under ``fastmath`` where Intel's SVML is installed, within 4 ulp;
- a division, reciprocal or reciprocal square root within ``8u`` (:data:`DIV`): IEEE division is
  ``u``, ``1/sqrt(x)`` ``2u``, CUDA's ``rsqrtf`` 2 ulp (``4u``), and a fast-math hardware estimate
  (``rcpps`` / ``rsqrtps``, 12 bits) refined by one Newton step, as LLVM may emit under ``fastmath``,
  about ``7.5u``.

What the bounds assume, and so what they refuse: no TF32 or bf16 GEMMs (torch's default for f32
matmuls; a kernel that narrows its activations *should* fail them, see tests/test_numerics.py); no
overflow. Underflow (and the GPU build's flush-to-zero) adds at most ``2^-126`` per operation
(:data:`TINY`), which the bounds add for every operation they count. The f64 reference's own error
(the same bounds with ``u = 2^-53``) is ``2^-29`` of the f32 bound and is ignored.

Each function returns a :class:`Bounded`: the exact value (f64, on the inputs' device) and a bound on
``|computed - value|`` for each element. Helpers compose: :func:`matmul`, :func:`mul` and :func:`silu`
propagate the bound of their inputs (the SwiGLU expert is three of them); the norms, the router's
softmax and attention have their own derivations in their docstrings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: f32 unit roundoff.
U = 2.0**-24
#: The smallest normal f32: underflow or flush-to-zero loses at most this much per operation.
TINY = 2.0**-126
#: Roundings' worth of relative error of one ``exp`` (4 ulp = 8u, see the module docstring).
EXP = 8
#: Roundings' worth of one division, reciprocal or reciprocal square root (8u, see the module docstring).
DIV = 8
#: ``max |silu'(x)| = 1.0998...`` (at x = 2.3994): silu moves an input error by at most this factor.
SILU_LIPSCHITZ = 1.1
#: silu(g) = g / (1 + exp(-g)) rounds: an exp, an add and a division (the relative error of exp(-g)
#: reaches the sum 1 + exp(-g) scaled by exp(-g) / (1 + exp(-g)) <= 1).
SILU_ROUNDINGS = EXP + 1 + DIV
#: For g < -88.7, exp(-g) overflows to inf and silu(g) is computed as -0, where |silu(g)| < 3e-37 < 2^-121.
SILU_ABS = 2.0**-121


def gamma(n: int | float | torch.Tensor) -> float | torch.Tensor:
    """``γ_n = n u / (1 - n u)``, the bound on ``n`` compounded f32 roundings (``n u < 1/2`` here)."""
    nu = n * U
    if (nu >= 0.5).any() if isinstance(nu, torch.Tensor) else nu >= 0.5:
        raise ValueError(f"γ_n needs n u < 1/2; n = {n} is too many roundings for a meaningful bound")
    return nu / (1 - nu)


@dataclass(frozen=True)
class Bounded:
    """An exact result and a bound on the error of its f32 computation: ``|computed - value| <= err``."""

    value: torch.Tensor  # f64
    err: torch.Tensor  # f64, >= 0, the shape of value (a 0-d zero for an exact input)

    @property
    def mag(self) -> torch.Tensor:
        """A bound on the magnitude of the *computed* value: ``|value| + err``."""
        return self.value.abs() + self.err


def exact(t: torch.Tensor) -> Bounded:
    """An input the kernel reads exactly (f32 activations, bf16 / f16 / f32 weights): error 0."""
    v = t.detach().double()
    return Bounded(v, torch.zeros((), dtype=torch.float64, device=v.device))


def _is_exact(b: Bounded) -> bool:
    return b.err.dim() == 0 and not b.err


# ---- the building blocks: products and sums ---------------------------------------------------------


def matmul(a: Bounded, b: Bounded, add: torch.Tensor | None = None) -> Bounded:
    """``add + a @ b`` computed in f32, summed in any order (``a`` [..., n], ``b`` [n, m]).

    The sum has ``n + 1`` terms counting ``add``, the ``out`` a kernel accumulates into (counted even
    when absent: zero, which costs the bound one ``u``). The bound is the error the inputs bring,
    ``|a|·Δb + Δa·|b| + Δa·Δb`` (written ``(|a| + Δa)·Δb + Δa·|b|``), plus the dot-product bound on the
    computed inputs, ``γ_{n+1} (|add| + |â|·|b̂|)`` with ``|â| <= |a| + Δa`` (Higham (3.5)).
    """
    n = a.value.shape[-1] + 1
    base = torch.zeros((), dtype=torch.float64, device=a.value.device) if add is None else add.detach().double()
    value = base + a.value @ b.value
    err = gamma(n) * (base.abs() + a.mag @ b.mag) + 2 * n * TINY
    if not _is_exact(b):
        err = err + a.mag @ b.err
    if not _is_exact(a):
        err = err + a.err @ b.value.abs()
    return Bounded(value, err)


def mul(a: Bounded, b: Bounded) -> Bounded:
    """``a * b`` elementwise in f32: ``|a| Δb + |b| Δa + Δa Δb`` plus one rounding of the computed product."""
    err = a.value.abs() * b.err + b.value.abs() * a.err + a.err * b.err + U * a.mag * b.mag + TINY
    return Bounded(a.value * b.value, err)


def silu(g: Bounded) -> Bounded:
    """``silu(g) = g / (1 + exp(-g))`` in f32: the input error moved by at most :data:`SILU_LIPSCHITZ`,
    plus ``γ_{SILU_ROUNDINGS}`` relative on the computed value (and :data:`SILU_ABS` where exp overflows)."""
    value = g.value * torch.sigmoid(g.value)
    moved = SILU_LIPSCHITZ * g.err
    err = moved + gamma(SILU_ROUNDINGS) * (value.abs() + moved) + SILU_ABS
    return Bounded(value, err)


def linear(x: torch.Tensor, w: torch.Tensor) -> Bounded:
    """``x @ w.T`` for f32 ``x`` [n, K] and a weight ``w`` [M, K] in any stored dtype."""
    return matmul(exact(x), exact(w.T))


def swiglu_expert(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> Bounded:
    """``out + W2[:, r0:r1] (silu(W1[r0:r1] x) ⊙ W3[r0:r1] x)``, the SwiGLU expert over a row slice.

    Written from the formula with ``@`` and a sigmoid in f64, not with offloadkit's own ``swiglu``. The
    bound propagates: the gate and up products (dot products of length H), silu, the product
    ``h = silu(g) ⊙ u``, then the down projection over the slice's rows, ``|W2|·Δh`` plus the dot-product
    bound ``γ_{s+1}(|out| + |W2|·|ĥ|)``. Because that last sum may be split anywhere, the bound also
    holds for partial slices accumulated one after another into ``out``, in any order.
    """
    r0, r1 = rows if rows is not None else (0, w_gate.shape[0])
    xb = exact(x)
    g = matmul(xb, exact(w_gate[r0:r1].T))
    u = matmul(xb, exact(w_up[r0:r1].T))
    h = mul(silu(g), u)
    return matmul(h, exact(w_down[:, r0:r1].T), add=out)


# ---- norms ------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Bounded:
    """``x / sqrt(mean(x²) + eps) * weight`` over the rows of ``x`` [N, H].

    Relative error of each output at most ``γ_{H + 5 + DIV}``: ``H`` for the sum of squares (positive
    terms, any order: its relative error is ``γ_H``), 2 for the mean's division by ``H`` (or a product
    with a rounded ``1/H``), 1 for ``+ eps`` (eps's own rounding to f32 is no worse than the sum's, the
    terms being positive), :data:`DIV` for the reciprocal square root, 2 for the products
    ``x · r · w``. ``(1 + θ)^(-1/2)`` stays within ``|θ|`` of 1 for ``|θ| <= 0.6``, so the square root
    passes the relative error on (it halves it; the bound does not claim that).
    """
    xv, wv = x.detach().double(), weight.detach().double()
    hidden = xv.shape[-1]
    value = xv * torch.rsqrt(xv.square().mean(-1, keepdim=True) + eps) * wv
    return Bounded(value, gamma(hidden + 5 + DIV) * value.abs() + (hidden + 6) * TINY)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> Bounded:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the rows of ``x`` [N, H] (biased variance).

    Let ``d = x - μ``, ``V = mean(d²)``, ``r = (V + eps)^(-1/2)``, ``c = d r``. The mean, summed in any
    order then divided by H, is within ``Δμ = γ_{H+2} mean|x|``. The variance around the computed mean is
    ``V + Δμ²`` (the cross term sums to zero), computed with a relative error of at most
    ``γ_{2H+6} κ``, ``κ = sqrt(1 + μ²/V)``: that covers the two-pass algorithm (the kernels: ``H + 6``
    roundings) and the updating (Welford-style) moments of torch's ``F.layer_norm`` on the CPU, whose
    relative error is about ``H κ u`` (Chan, Golub & LeVeque, "Algorithms for computing the sample
    variance: analysis and recommendations", 1983). So ``r̂ = r (1 + ρ)`` with
    ``ρ <= (1 + γ_{2H+6} κ + Δμ²/(V+eps))(1 + γ_{DIV}) - 1``.

    The centred, scaled value is computed as ``(x - μ̂) r̂`` (the kernels) or ``x r̂ - μ̂ r̂`` (torch's
    fused form), within ``r (1 + ρ)(Δμ + γ_3 (|x| + |μ| + Δμ)) + |c| ρ`` of ``c`` either way; then
    ``ĉ w + b`` adds two roundings of the computed terms.
    """
    xv, wv, bv = x.detach().double(), weight.detach().double(), bias.detach().double()
    hidden = xv.shape[-1]
    mu = xv.mean(-1, keepdim=True)
    d = xv - mu
    var = d.square().mean(-1, keepdim=True)
    r = torch.rsqrt(var + eps)
    c = d * r
    value = c * wv + bv
    d_mu = gamma(hidden + 2) * xv.abs().mean(-1, keepdim=True)
    kappa = torch.sqrt(1 + mu.square() / var.clamp_min(TINY))
    rho = (1 + gamma(2 * hidden + 6) * kappa + d_mu.square() / (var + eps)) * (1 + gamma(DIV)) - 1
    d_c = r * (1 + rho) * (d_mu + gamma(3) * (xv.abs() + mu.abs() + d_mu)) + c.abs() * rho
    cw = (c.abs() + d_c) * wv.abs()
    err = wv.abs() * d_c + gamma(2) * (cw + bv.abs()) + (2 * hidden + 10) * TINY
    return Bounded(value, err)


# ---- rotary embeddings -------------------------------------------------------------------------------


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Bounded:
    """Rotate each pair ``(x_i, x_{i + D/2})`` of ``x`` [N, heads, D] by the complex number ``cos_i + i sin_i``.

    Written with complex multiplication, from tables [N, D] whose halves repeat (as
    :func:`offloadkit.model.rope.rotary_tables` makes them: the second half of ``cos`` is the first).
    Each output is two products and a sum: within ``γ_2 (|x_a cos| + |x_b sin|)``.
    """
    half = x.shape[-1] // 2
    c, s = cos.detach().double(), sin.detach().double()
    if not (torch.equal(c[:, :half], c[:, half:]) and torch.equal(s[:, :half], s[:, half:])):
        raise ValueError("rope tables must repeat their first half (rotary_tables' layout)")
    xv = x.detach().double()
    z = torch.complex(xv[..., :half], xv[..., half:])
    turned = z * torch.complex(c[:, None, :half], s[:, None, :half])
    value = torch.cat((turned.real, turned.imag), dim=-1)
    x1, x2 = xv[..., :half].abs(), xv[..., half:].abs()
    ca, sa = c[:, None, :half].abs(), s[:, None, :half].abs()
    err = gamma(2) * torch.cat((x1 * ca + x2 * sa, x2 * ca + x1 * sa), dim=-1) + 3 * TINY
    return Bounded(value, err)


# ---- softmax: routers and attention ------------------------------------------------------------------


def softmax_log_error(logits: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """A bound on ``|log p̂_j - log p_j|`` for ``p = softmax(logits)`` over the entries ``keep`` (all if None).

    The kernels compute ``exp(l_j - m) / Σ_k exp(l_k - m)`` with ``m`` the max. Rounding ``l_j - m``
    moves the exponent by ``u |l_j - m| <= u R`` (``R`` the spread of the kept logits), in the
    numerator and in every term of the denominator; each exp is off by :data:`EXP`; the sum of ``E``
    positive terms by ``γ_{E-1}``; the division by :data:`DIV`. In all: ``2 u R + γ_{E + 2 EXP + DIV}``.
    Returns one bound per row.
    """
    lv = logits.detach().double()
    keep = torch.ones_like(lv, dtype=torch.bool) if keep is None else keep
    hi = lv.masked_fill(~keep, -math.inf).amax(-1)
    lo = lv.masked_fill(~keep, math.inf).amin(-1)
    n = keep.sum(-1).double()
    return 2 * U * (hi - lo) + gamma(n + 2 * EXP + DIV)


def softmax(logits: torch.Tensor, keep: torch.Tensor | None = None) -> Bounded:
    """Softmax of f32 ``logits`` [..., E] over ``keep`` (0 elsewhere), with :func:`softmax_log_error`'s bound."""
    lv = logits.detach().double()
    keep = torch.ones_like(lv, dtype=torch.bool) if keep is None else keep
    value = torch.softmax(lv.masked_fill(~keep, -math.inf), dim=-1)
    lam = softmax_log_error(logits, keep)[..., None]
    return Bounded(value, torch.expm1(lam) * value + TINY)


def sigmoid(logits: torch.Tensor) -> Bounded:
    """``1 / (1 + exp(-x))`` in f32: an exp, an add and a division, relative ``γ_{EXP + 1 + DIV}``."""
    value = torch.sigmoid(logits.detach().double())
    return Bounded(value, gamma(EXP + 1 + DIV) * value + TINY)


def normalized(p: Bounded, log_err: torch.Tensor) -> Bounded:
    """``p_j / Σ_i p_i`` over the last dimension, from probabilities each within a log error ``log_err``
    (one per row): the numerator's and the weighted denominator's errors, the sum of k terms and a
    division, ``2 log_err + γ_{k - 1 + DIV}``."""
    value = p.value / p.value.sum(-1, keepdim=True)
    lam = 2 * log_err[..., None] + gamma(p.value.shape[-1] - 1 + DIV)
    return Bounded(value, torch.expm1(lam) * value + TINY)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, window: int | None = None,
              online_streams: int | None = None) -> Bounded:
    """Softmax attention, ``q`` [B, H, T, D] at positions ``q_start..`` over ``k``, ``v`` [B, KV, S, D]
    (the first S positions; query head h reads KV head ``h // (H / KV)``), causal, with an optional
    sliding ``window`` (a query at p sees keys ``p - window < s <= p``), written from the formula in f64.

    The output is ``o = Σ_j p_j v_j``. Every operation after the scores multiplies a term by a
    positive factor or adds terms, so the computed ``ô`` is ``Σ_j p_j (1 + ρ_j) v_j`` with
    ``|log(1 + ρ_j)| <= λ``, and ``|ô - o| <= expm1(λ) Σ_j p_j |v_j|``, where ``λ`` adds up:

    - the scores' errors: ``Δs_j = c Δt_j + γ_{1+DIV} c (|t_j| + Δt_j)`` (``t = q·k_j`` within
      ``γ_D Σ|q k_j|``, times ``c = D^-1/2``, itself rounded); softmax moves ``log p_j`` by at most
      ``Δs_j + max Δs <= 2 max Δs``;
    - the rounding of each ``s_j - m`` (and, online, of each ``m_old - m_new``: they telescope, and of
      the final merge): ``3 u R`` in the numerator and again in the denominator (``R`` the spread of the
      computed scores);
    - the exps a term passes through, its own, one per later rescaling of its stream and the merge:
      ``2 (C + 2) EXP`` roundings, with ``C`` the rescalings (0 for a two-pass softmax);
    - the accumulations: at most two roundings per key of a stream (times the correction, plus the new
      term), the product ``p v``, a merge of the streams and the final division:
      ``2 γ_{2 L + W + 1} + γ_DIV`` for ``W`` streams of at most ``L`` keys.

    ``online_streams=W`` describes a kernel that runs ``W`` interleaved online softmaxes (the
    FlashAttention recurrence; attention_decode.cu runs one per warp, W = 4) and merges them; a
    stream rescales its sum when its running max grows, which can only happen at a key whose exact
    score is above the running exact max less ``2 max Δs``: ``C`` counts those keys. ``None`` is a
    two-pass softmax (the Numba kernel, torch): ``W = 1``, ``C = 0``.
    """
    qv, kv, vv = q.detach().double(), k.detach().double(), v.detach().double()
    groups = qv.shape[1] // kv.shape[1]
    kv, vv = kv.repeat_interleave(groups, dim=1), vv.repeat_interleave(groups, dim=1)
    dim, keys, tokens = qv.shape[-1], kv.shape[2], qv.shape[2]
    c = dim**-0.5
    t = qv @ kv.transpose(-1, -2)
    dt = gamma(dim) * (qv.abs() @ kv.abs().transpose(-1, -2))
    ds = c * dt + gamma(1 + DIV) * c * (t.abs() + dt)
    q_pos = torch.arange(q_start, q_start + tokens, device=qv.device)[:, None]
    k_pos = torch.arange(keys, device=qv.device)[None, :]
    visible = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
    s = (t * c).masked_fill(~visible, -math.inf)
    p = torch.softmax(s, dim=-1)
    value = p @ vv

    max_ds = ds.masked_fill(~visible, 0).amax(-1)
    s_hi = s.amax(-1)
    s_lo = (t * c).masked_fill(~visible, math.inf).amin(-1)
    spread = s_hi - s_lo + 2 * max_ds
    n_visible = visible.sum(-1)
    if online_streams is None:
        streams, rescales = 1, torch.zeros_like(max_ds)
        longest = int(n_visible.max())
    else:
        if tokens != 1:
            raise ValueError("the online-softmax bound is written for one query per sequence (decode)")
        streams = online_streams
        first = int(visible[0].nonzero()[0])
        longest = math.ceil(int(n_visible[0]) / streams)
        rescales = torch.zeros_like(max_ds)
        for w in range(streams):
            seq = s[..., first + w::streams]
            if seq.shape[-1] < 2:
                continue
            running = seq.cummax(-1).values[..., :-1]
            grows = seq[..., 1:] > running - 2 * max_ds[..., None]
            rescales = torch.maximum(rescales, grows.sum(-1).double())
    lam = (2 * max_ds + 6 * U * spread + 2 * (rescales + 2) * gamma(EXP)
           + 2 * gamma(2 * longest + streams + 1) + gamma(DIV))
    err = torch.expm1(lam)[..., None] * (p @ vv.abs()) + (4 * keys + dim) * TINY
    return Bounded(value, err)


# ---- routers: which experts, and their weights ------------------------------------------------------------


def assert_softmax_topk(weights: torch.Tensor, experts: torch.Tensor, logits: torch.Tensor, top_k: int,
                        normalize: bool, what: str = "router") -> None:
    """The softmax → top-k → (renormalised) router, checked against the formula in f64.

    A pick must be *a* legitimate r-th largest probability: within the two bounds of the exact r-th
    one (two probabilities closer than their bounds may come out of an f32 kernel in either order,
    and the spec cannot tell them apart). The weights are then checked for the experts picked.
    """
    p = softmax(logits)
    e = experts.detach().long().cpu()
    pv, pe = p.value.cpu(), p.err.cpu()
    assert e.shape == (logits.shape[0], top_k), f"{what}: experts of shape {tuple(e.shape)}"
    assert all(len(set(row)) == top_k for row in e.tolist()), f"{what}: an expert picked twice"
    ranked, at = pv.topk(top_k, dim=-1)
    picked, picked_err = pv.gather(-1, e), pe.gather(-1, e)
    wrong = (picked - ranked).abs() > picked_err + pe.gather(-1, at)
    assert not wrong.any(), (f"{what}: experts {e[wrong.any(-1)].tolist()} are not the top {top_k} "
                             f"(exact ranking {at[wrong.any(-1)].tolist()})")
    chosen = Bounded(picked, picked_err)
    if normalize:
        chosen = normalized(chosen, softmax_log_error(logits.cpu()))
    assert_within(weights, chosen, f"{what} weights")


def sparsemixer(logits: torch.Tensor, jitter_eps: float) -> tuple[Bounded, torch.Tensor, torch.Tensor]:
    """PhiMoE's inference-time top-2 router from its definition, in f64: ``(weights, experts, unsure)``.

    Expert 1 is the argmax; its weight is its softmax share among the experts whose score is within a
    relative ``2 eps`` of the max, ``(top - s) / max(|s|, top) <= 2 eps``. Expert 2 is the argmax of the
    others; its weight its softmax share among the others within ``2 eps`` of *that* max. The weights
    carry :func:`softmax_log_error`'s bound over the experts kept.

    ``unsure`` marks the rows where an expert's relative gap is so close to ``2 eps`` that f32 rounding
    (``γ_{1+DIV}`` of the quotient, and eps's own rounding to f32) may decide either way: there the
    spec allows two answers, and a test should not draw such inputs.
    """
    lv = logits.detach().double().cpu()
    eps2 = 2 * jitter_eps
    top1, first = lv.max(dim=-1, keepdim=True)
    others = lv.scatter(-1, first, -math.inf)
    top2, second = others.max(dim=-1, keepdim=True)
    rows, unsure = [], torch.zeros(lv.shape[0], dtype=torch.bool)
    for top, pool in ((top1, lv), (top2, others)):
        gap = (top - lv) / lv.abs().clamp(min=top)
        keep = (gap <= eps2) & pool.isfinite()
        unsure |= (((gap - eps2).abs() <= gamma(1 + DIV) * gap.abs() + U * eps2) & pool.isfinite()).any(-1)
        rows.append((keep, top))
    value = torch.cat([1 / (torch.exp(lv - top) * keep).sum(-1, keepdim=True) for keep, top in rows], dim=-1)
    lam = torch.stack([softmax_log_error(lv, keep) for keep, _ in rows], dim=-1)
    return Bounded(value, torch.expm1(lam) * value + TINY), torch.cat((first, second), dim=-1), unsure


def assert_sparsemixer(weights: torch.Tensor, experts: torch.Tensor, logits: torch.Tensor, jitter_eps: float,
                       what: str = "sparsemixer") -> None:
    """The sparsemixer router's picks equal the definition's (argmaxes of exact inputs: no rounding), and its
    weights are within the bound; inputs where the mask is a rounding away from flipping are refused."""
    want, want_experts, unsure = sparsemixer(logits, jitter_eps)
    assert not unsure.any(), (f"{what}: rows {unsure.nonzero().flatten().tolist()} have a score within rounding "
                              f"of the 2 eps threshold: draw other logits")
    assert torch.equal(experts.detach().long().cpu(), want_experts), f"{what}: experts differ"
    assert_within(weights, want, f"{what} weights")


# ---- checking -----------------------------------------------------------------------------------------


def assert_within(got: torch.Tensor, want: Bounded, what: str = "result") -> None:
    """Assert ``|got - want.value| <= want.err`` everywhere (a NaN anywhere fails), naming the worst element."""
    got64 = torch.as_tensor(got).detach().double().cpu()
    value = want.value.detach().cpu()
    err = want.err.detach().cpu().expand_as(value)
    assert got64.shape == value.shape, f"{what}: shape {tuple(got64.shape)}, expected {tuple(value.shape)}"
    diff = (got64 - value).abs()
    bad = ~(diff <= err)
    if bad.any():
        ratio = torch.where(bad & diff.isnan(), math.inf, diff / err.clamp_min(TINY))
        i = tuple(int(j) for j in torch.unravel_index(ratio.argmax(), ratio.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements outside the f32 error bound; worst at {i}: "
            f"got {got64[i]:.9g}, exact {value[i]:.9g}, |error| {diff[i]:.3g} > bound {err[i]:.3g} "
            f"({float(ratio[i]):.3g}x)")


__all__ = ["DIV", "EXP", "SILU_LIPSCHITZ", "TINY", "U", "Bounded", "assert_softmax_topk", "assert_sparsemixer",
           "assert_within", "attention", "exact", "gamma", "layer_norm", "linear", "matmul", "mul", "normalized",
           "rms_norm", "rope", "sigmoid", "silu", "softmax", "softmax_log_error", "sparsemixer", "swiglu_expert"]
