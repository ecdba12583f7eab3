"""The CPU kernels against exact f64 results written from the math, within the f32 error bounds of
tests/numerics.py: partials over any split equal the expert, for every dtype and path; the norms, the
attention core, the linear layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import assert_within, attention, layer_norm, linear, rms_norm, swiglu_expert

from offloadkit.errors import OffloadkitError
from offloadkit.hardware.machine import machine_label
from offloadkit.hardware.stream import read_gbps, stream_read
from offloadkit.kernels.cpu.experts import ExpertWeights, KernelInputError, expert_rows, expert_rows_torch
from offloadkit.kernels.cpu.experts import linear as kernel_linear
from offloadkit.kernels.cpu.norms_attention import causal_attention, compare_lane_ops, use_torch_attention
from offloadkit.kernels.cpu.norms_attention import layer_norm as kernel_layer_norm
from offloadkit.kernels.cpu.norms_attention import rms_norm as kernel_rms_norm
from offloadkit.kernels.cpu.primitives import storage_view

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_expert(hidden: int, inter: int, dtype: str, seed: int) -> tuple[list[torch.Tensor], ExpertWeights]:
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g).mul(0.3).to(DTYPES[dtype]) for s in ((inter, hidden), (inter, hidden),
                                                                          (hidden, inter))]
    return ws, ExpertWeights.from_torch(*ws)


def check_expert(got: np.ndarray | torch.Tensor, x: np.ndarray, ws: list[torch.Tensor],
                 rows: tuple[int, int] | None = None, what: str = "expert") -> None:
    """``got`` is the expert over ``rows`` on the same stored weights, within the f32 bound."""
    assert_within(torch.as_tensor(got), swiglu_expert(torch.from_numpy(x), *ws, rows=rows), what)


def split_sum(x: np.ndarray, ew: ExpertWeights, cuts: list[int], path: str) -> np.ndarray:
    """Partials over the split of [0, I) at ``cuts``, summed by accumulating into one ``out``."""
    out = np.zeros((x.shape[0], ew.hidden), dtype=np.float32)
    bounds = [0, *sorted(cuts), ew.intermediate]
    for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
        expert_rows(x, ew, (r0, r1), out=out, path=path)
    return out


# ---- numerics ----------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hidden=st.integers(1, 48), inter=st.integers(1, 72), tokens=st.integers(0, 11),
       dtype=st.sampled_from(sorted(DTYPES)), path=st.sampled_from(["auto", "decode", "prefill"]),
       data=st.data())
def test_partials_over_any_split_sum_to_the_reference(hidden, inter, tokens, dtype, path, data) -> None:
    ws, ew = make_expert(hidden, inter, dtype, seed=hidden * 1000 + inter)
    cuts = data.draw(st.lists(st.integers(0, inter), max_size=4), label="cuts")
    x = np.random.default_rng(tokens).standard_normal((tokens, hidden)).astype(np.float32)
    got = split_sum(x, ew, cuts, path)
    assert got.shape == (tokens, hidden) and got.dtype == np.float32
    if tokens == 0:
        return
    check_expert(got, x, ws, what=f"{path} partials over cuts {sorted(cuts)}")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("tokens", [1, 3, 8, 40])
def test_parallel_and_blocked_paths_on_a_larger_expert(dtype: str, tokens: int) -> None:
    # large enough for the parallel decode passes (> 64 KB per pass) and several prefill blocks
    ws, ew = make_expert(256, 608, dtype, seed=7)
    x = np.random.default_rng(0).standard_normal((tokens, 256)).astype(np.float32)
    for path in ("decode", "prefill"):
        check_expert(split_sum(x, ew, [100, 357], path), x, ws, what=f"{path}, three slices")
        check_expert(expert_rows(x, ew, (64, 600), path=path), x, ws, (64, 600), f"{path}, rows [64, 600)")


def test_empty_slices_and_zero_tokens_give_zeros() -> None:
    _, ew = make_expert(8, 16, "bfloat16", seed=0)
    x = np.ones((3, 8), np.float32)
    assert not expert_rows(x, ew, (5, 5)).any()
    assert expert_rows(np.zeros((0, 8), np.float32), ew).shape == (0, 8)
    out = np.full((3, 8), 2.0, np.float32)
    assert (expert_rows(x, ew, (16, 16), out=out) == 2.0).all()  # out left as it was


def test_torch_entry_point_and_linear() -> None:
    ws, ew = make_expert(16, 24, "float16", seed=3)
    x = torch.randn(2, 16)
    y = expert_rows_torch(x, ew, (4, 20))
    assert isinstance(y, torch.Tensor)
    check_expert(y, x.numpy(), ws, (4, 20))
    w = torch.randn(600, 300).bfloat16()
    arr, dtype = storage_view(w)
    assert dtype == "bfloat16" and np.shares_memory(arr, w.view(torch.int16).numpy())
    assert kernel_linear(np.zeros((0, 300), np.float32), arr).shape == (0, 600)
    for n in (1, 5, 12, 64):  # the decode kernel, then the prefill one
        xs = np.random.default_rng(n).standard_normal((n, 300)).astype(np.float32)
        assert_within(torch.from_numpy(kernel_linear(xs, arr)), linear(torch.from_numpy(xs), w), f"linear, {n} tokens")


# ---- bad input ---------------------------------------------------------------------------------------


def test_bad_slices_activations_and_weights_are_refused_with_reasons() -> None:
    ws, ew = make_expert(8, 16, "float32", seed=0)
    x = np.ones((2, 8), np.float32)
    with pytest.raises(KernelInputError, match=r"r0 > r1"):
        expert_rows(x, ew, (9, 3))
    with pytest.raises(KernelInputError, match=r"outside the intermediate dimension \[0, 16\)"):
        expert_rows(x, ew, (4, 17))
    with pytest.raises(KernelInputError, match=r"outside"):
        expert_rows(x, ew, (-1, 3))
    with pytest.raises(KernelInputError, match=r"expected \[tokens, 8\]"):
        expert_rows(np.ones((2, 9), np.float32), ew)
    with pytest.raises(KernelInputError, match=r"float64; the CPU kernels take float32"):
        expert_rows(np.ones((2, 8)), ew)
    with pytest.raises(KernelInputError, match=r"torch.bfloat16; the CPU kernels take float32"):
        expert_rows(torch.ones(2, 8, dtype=torch.bfloat16), ew)
    with pytest.raises(KernelInputError, match=r"out must be .* shape \(2, 8\)"):
        expert_rows(x, ew, out=np.zeros((2, 7), np.float32))
    with pytest.raises(KernelInputError, match=r"path must be one of"):
        expert_rows(x, ew, path="fast")
    with pytest.raises(KernelInputError, match=r"not contiguous .* w.contiguous\(\)"):
        ExpertWeights.from_torch(ws[0], ws[1], ws[0].T)
    with pytest.raises(KernelInputError, match=r"mix dtypes"):
        ExpertWeights.from_torch(ws[0], ws[1].bfloat16(), ws[2])
    with pytest.raises(KernelInputError, match=r"do not form a SwiGLU expert"):
        ExpertWeights.from_torch(ws[0], ws[1], ws[2][:, :8].contiguous())
    with pytest.raises(KernelInputError, match=r"quantized formats are out of scope"):
        ExpertWeights.from_torch(*(w.to(torch.int8) for w in ws))
    assert issubclass(KernelInputError, OffloadkitError)


# ---- the lane ops and the read ---------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 40])  # serial, then parallel over tokens
def test_rms_norm_is_the_formula(tokens: int) -> None:
    x = torch.randn(tokens, 2048)
    w = torch.rand(2048) + 0.5
    assert_within(torch.from_numpy(kernel_rms_norm(x.numpy(), w.numpy(), 1e-5)), rms_norm(x, w, 1e-5), "rms_norm")


@pytest.mark.parametrize("tokens", [1, 40])
def test_layer_norm_is_the_formula(tokens: int) -> None:
    x, w, b = torch.randn(tokens, 2048) * 3 + 1, torch.rand(2048) + 0.5, torch.randn(2048)
    got = kernel_layer_norm(x.numpy(), w.numpy(), b.numpy(), 1e-5)
    assert_within(torch.from_numpy(got), layer_norm(x, w, b, 1e-5), "layer_norm")


@pytest.mark.parametrize(("heads", "kv", "tokens", "length", "window"),
                         [(4, 2, 1, 9, None), (4, 4, 5, 5, None), (6, 2, 3, 12, 4), (2, 1, 7, 7, 3),
                          (8, 2, 40, 60, 17)])  # the last one runs parallel
def test_attention_is_the_formula(heads: int, kv: int, tokens: int, length: int, window: int | None) -> None:
    g = torch.Generator().manual_seed(length)
    q = torch.randn(2, heads, tokens, 16, generator=g)
    k, v = torch.randn(2, kv, length + 6, 16, generator=g), torch.randn(2, kv, length + 6, 16, generator=g)
    k[:, :, length:], v[:, :, length:] = float("nan"), float("nan")  # the capacity past `length` is never read
    start = length - tokens
    got = causal_attention(q.numpy(), k.numpy(), v.numpy(), length, start, window)
    assert_within(torch.from_numpy(got), attention(q, k[:, :, :length], v[:, :, :length], start, window), "attention")
    assert use_torch_attention(64, 100) and not use_torch_attention(1, 100) and not use_torch_attention(64, 0)


def test_lane_op_comparison_is_measured() -> None:
    rows = compare_lane_ops(hidden=64, tokens=(1, 3), positions=8, repeats=2)
    assert [r["op"][:9] for r in rows[:3]] == ["rms_norm", "layer_nor", "attention"]
    assert all(r["torch_s"] > 0 and r["numba_s"] > 0 for r in rows)


def test_stream_read_reads_every_byte() -> None:
    a = np.random.default_rng(0).integers(0, 2**63, size=1001, dtype=np.uint64)
    b = np.arange(12, dtype=np.uint16)
    want = int(np.bitwise_xor.reduce(a)) ^ int(np.bitwise_xor.reduce(b[:12].view(np.uint64)))
    assert stream_read([a, b]) == want
    assert read_gbps([a], repeats=1) > 0
    assert "threads" in machine_label()


def test_kernels_run_from_several_threads_at_once() -> None:
    # nogil kernels: two worker threads (as the real executor's CPU lane beside other threads) get exact results
    from concurrent.futures import ThreadPoolExecutor

    ws, ew = make_expert(256, 608, "bfloat16", seed=11)
    xs = [np.random.default_rng(i).standard_normal((i % 3 + 1, 256)).astype(np.float32) for i in range(6)]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda x: expert_rows(x, ew), xs))
    for x, y in zip(xs, outs, strict=True):
        check_expert(y, x, ws, what="an expert run beside another thread")


def test_linear_refuses_weights_outside_kernel_storage() -> None:
    with pytest.raises(KernelInputError, match="kernel storage"):
        kernel_linear(np.ones((1, 4), np.float32), np.ones((3, 4), np.float64))
    with pytest.raises(KernelInputError, match="kernel storage"):
        kernel_linear(np.ones((1, 4), np.float32), np.ones((4, 3), np.float32).T)
