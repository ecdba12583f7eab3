"""The error bounds of tests/numerics.py hold where the analysis says they must, and they are not vacuous:
a result off by more than the bound, a NaN, or a kernel that narrows its activations to bf16 fails them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numerics import SILU_LIPSCHITZ, U, assert_within, exact, gamma, matmul, swiglu_expert

from offloadkit.kernels.cpu.experts import ExpertWeights, expert_rows


def bf16_expert(hidden: int, inter: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
    return [torch.randn(s, generator=g).mul(0.3).bfloat16() for s in shapes]


def test_gamma_and_the_silu_constant() -> None:
    assert gamma(1) == pytest.approx(U / (1 - U), rel=1e-12) and gamma(1000) > 1000 * U
    with pytest.raises(ValueError, match="too many roundings"):
        gamma(2**23)
    # silu' = σ(x)(1 + x(1 - σ(x))): its largest magnitude, 1.0998 at x = 2.3994, is what the bound uses
    x = torch.linspace(-40, 40, 800_001, dtype=torch.float64)
    s = torch.sigmoid(x)
    slope = (s * (1 + x * (1 - s))).abs().max()
    assert 1.0998 < slope <= SILU_LIPSCHITZ


def test_a_cancelling_sum_is_within_the_bound_not_within_a_relative_tolerance() -> None:
    terms = np.array([1.0, 2.0**-24, -1.0], dtype=np.float32)
    total = np.float32(0.0)
    for t in terms:  # in f32, left to right: 1 + 2^-24 rounds to 1, and the small term is lost
        total = np.float32(total + t)
    want = matmul(exact(torch.from_numpy(terms)[None]), exact(torch.ones(3, 1)))
    assert total == 0.0 and float(want.value) == 2.0**-24  # 100% relative error, no bug
    assert_within(torch.tensor([[total]]), want, "the sum")
    assert float(want.err) == pytest.approx(gamma(4) * (2 + 2.0**-24), rel=1e-9)  # γ_{n+1} Σ|terms|


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_the_ill_conditioned_expert_of_issue_8_is_within_the_bound(path: str) -> None:
    # hidden=22, inter=1, bf16: the one gate row's products cancel ~3000-fold, so the kernel's result
    # is off by far more than 1e-5 of itself (issue 8 saw 5.1e-5) while within γ_n Σ|terms|
    ws = bf16_expert(22, 1, seed=22 * 1000 + 1)
    x = np.random.default_rng(1).standard_normal((1, 22)).astype(np.float32)
    xv, w_gate = torch.from_numpy(x).double(), ws[0].double()
    assert float((xv.abs() @ w_gate.abs().T) / (xv @ w_gate.T).abs()) > 1000
    got = expert_rows(x, ExpertWeights.from_torch(*ws), path=path)
    assert_within(torch.from_numpy(got), swiglu_expert(torch.from_numpy(x), *ws), f"the {path} expert")


def test_a_result_beyond_the_bound_or_a_nan_fails() -> None:
    ws = bf16_expert(48, 40, seed=5)
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(5))
    want = swiglu_expert(x, *ws)
    got = torch.from_numpy(expert_rows(x.numpy(), ExpertWeights.from_torch(*ws)))
    assert_within(got, want)
    off = got.clone()
    off[1, 7] = float(want.value[1, 7] + 2 * want.err[1, 7])  # twice the bound away: must fail, and say where
    with pytest.raises(AssertionError, match=r"1 of 144 elements outside the f32 error bound; worst at \(1, 7\)"):
        assert_within(off, want)
    off[1, 7] = float(want.value[1, 7] + 0.5 * want.err[1, 7])
    assert_within(off, want)
    off[2, 0] = float("nan")
    with pytest.raises(AssertionError, match=r"worst at \(2, 0\)"):
        assert_within(off, want)
    with pytest.raises(AssertionError, match="shape"):
        assert_within(got[:2], want)


@pytest.mark.parametrize("narrow", [torch.bfloat16, torch.float16])
def test_an_expert_that_narrows_its_activations_falls_outside_the_bound(narrow: torch.dtype) -> None:
    # A plausible kernel bug: activations rounded to 16 bits before the dot products. At small hidden
    # sizes the worst-case bound separates it from an f32 kernel; γ_n grows like n while typical errors
    # grow like sqrt(n), so at a Mixtral expert's 4096 it no longer would (tests can only catch such
    # bugs on small shapes, which is where they run).
    ws = bf16_expert(64, 64, seed=0)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    ew = ExpertWeights.from_torch(*ws)
    want = swiglu_expert(x, *ws)
    assert_within(torch.from_numpy(expert_rows(x.numpy(), ew)), want)
    narrowed = x.to(narrow).float().numpy()
    with pytest.raises(AssertionError, match="outside the f32 error bound"):
        assert_within(torch.from_numpy(expert_rows(narrowed, ew)), want)
