"""The CPU kernels against exact f64 results written from the math, within the f32 error bounds of
tests/numerics.py: partials over any split equal the expert, for every dtype and path; the norms, the
attention core, the linear layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import (
    TINY,
    Bounded,
    U,
    assert_softmax_topk,
    assert_within,
    attention,
    exact,
    layer_norm,
    linear,
    matmul,
    mul,
    rms_norm,
    rope,
    swiglu_expert,
)

from offloadkit.errors import OffloadkitError
from offloadkit.hardware.machine import cpu_features, has_feature, machine_label
from offloadkit.hardware.stream import read_gbps, stream_read
from offloadkit.kernels.cpu.experts import ExpertWeights, KernelInputError, expert_rows, expert_rows_torch
from offloadkit.kernels.cpu.experts import linear as kernel_linear
from offloadkit.kernels.cpu.experts import linear3 as kernel_linear3
from offloadkit.kernels.cpu.layer_ops import gather_rows, qkv_rope, rope_store, router_topk, softmax_topk
from offloadkit.kernels.cpu.norms_attention import (
    attention_bthd,
    causal_attention,
    compare_lane_ops,
    use_torch_attention,
)
from offloadkit.kernels.cpu.norms_attention import layer_norm as kernel_layer_norm
from offloadkit.kernels.cpu.norms_attention import rms_norm as kernel_rms_norm
from offloadkit.kernels.cpu.primitives import storage_view
from offloadkit.model.rope import rotary_tables
from offloadkit.model.spec import ModelSpec
from offloadkit.model.writer import make_config

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


# ---- what the CPU engine's decode step is made of (issue 10) ------------------------------------------


def rotate(b: Bounded, cos: torch.Tensor, sin: torch.Tensor) -> Bounded:
    """RoPE of a computed ``b`` [N, heads, D]: the rotation's rounding (numerics.rope, at the magnitude the
    kernel can see) plus the input's error turned by ``|cos|``, ``|sin|``."""
    half = b.value.shape[-1] // 2
    turned, rounding = rope(b.value, cos, sin), rope(b.value.abs() + b.err, cos, sin).err
    ea, eb = b.err[..., :half], b.err[..., half:]
    ca, sa = cos.double()[:, None, :half].abs(), sin.double()[:, None, :half].abs()
    return Bounded(turned.value, rounding + torch.cat((ea * ca + eb * sa, eb * ca + ea * sa), dim=-1))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(("batch", "tokens", "start", "bias"), [(1, 1, 5, False), (2, 3, 0, True), (1, 70, 2, False)])
def test_qkv_rope_and_rope_store_project_rotate_and_write_the_cache(dtype, batch, tokens, start, bias) -> None:
    heads, kv, dim, hidden, cap = 4, 2, 16, 64, 80
    g = torch.Generator().manual_seed(tokens)
    w = [torch.randn(r * dim, hidden, generator=g).mul(0.2).to(DTYPES[dtype]) for r in (heads, kv, kv)]
    b = torch.randn((heads + 2 * kv) * dim, generator=g) if bias else None
    x = torch.randn(batch * tokens, hidden, generator=g)
    spec = ModelSpec.from_config(make_config("mixtral", hidden=hidden, heads=heads, kv_heads=kv, layers=1))
    cos, sin = rotary_tables(spec, torch.arange(start, start + tokens))
    want = matmul(exact(x), exact(torch.cat(w).T), add=None if b is None else b.expand(batch * tokens, -1))
    cols = [0, heads * dim, (heads + kv) * dim, (heads + 2 * kv) * dim]
    part = [Bounded(want.value[:, a:z], want.err[:, a:z]) for a, z in zip(cols, cols[1:], strict=False)]
    views = [storage_view(t)[0] for t in w]
    c, s = cos.numpy(), sin.numpy()
    def buffers() -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # the cache starts as NaN: untouched slots stay so
        return (np.empty((batch, tokens, heads, dim), np.float32), np.full((batch, kv, cap, dim), np.nan, np.float32),
                np.full((batch, kv, cap, dim), np.nan, np.float32))

    results = {}
    if batch * tokens <= 8:  # the fused decode form
        q, kc, vc = buffers()
        qkv_rope(x.numpy(), *views, None if b is None else b.numpy(), c, s, start, q, kc, vc, threads=2)
        results["qkv_rope"] = (q, kc, vc)
    q, kc, vc = buffers()
    qkv = kernel_linear3(x.numpy(), *views) + (0 if b is None else b.numpy())
    rope_store(qkv, c, s, start, q, kc, vc)
    results["rope_store"] = (q, kc, vc)
    reps = torch.arange(batch * tokens) % tokens  # the table row of each flattened token
    for what, (q, kc, vc) in results.items():
        assert_within(torch.from_numpy(q).reshape(batch * tokens, heads, dim),
                      rotate(Bounded(part[0].value.view(-1, heads, dim), part[0].err.view(-1, heads, dim)),
                             cos[reps], sin[reps]), f"{what}: q")
        k_got = torch.from_numpy(kc[:, :, start:start + tokens]).permute(0, 2, 1, 3).reshape(-1, kv, dim)
        assert_within(k_got, rotate(Bounded(part[1].value.view(-1, kv, dim), part[1].err.view(-1, kv, dim)),
                                    cos[reps], sin[reps]), f"{what}: k in the cache")
        v_got = torch.from_numpy(vc[:, :, start:start + tokens]).permute(0, 2, 1, 3).reshape(-1, kv * dim)
        assert_within(v_got, part[2], f"{what}: v in the cache")
        outside = np.ones(cap, bool)
        outside[start:start + tokens] = False
        assert np.isnan(kc[:, :, outside]).all() and np.isnan(vc[:, :, outside]).all(), f"{what} wrote elsewhere"


@pytest.mark.parametrize(("tokens", "experts", "k", "normalize"), [(1, 8, 2, True), (5, 60, 4, False), (3, 4, 4, True)])
def test_router_topk_is_softmax_then_top_k(tokens, experts, k, normalize) -> None:
    g = torch.Generator().manual_seed(experts)
    w = torch.randn(experts, 64, generator=g).bfloat16()
    x = torch.randn(tokens, 64, generator=g)
    weights, chosen = router_topk(x.numpy(), storage_view(w)[0], k, normalize)
    logits = kernel_linear(x.numpy(), storage_view(w)[0])  # the same decode pass the router runs
    assert_softmax_topk(torch.from_numpy(weights), torch.from_numpy(chosen), torch.from_numpy(logits), k, normalize)
    w2, e2 = softmax_topk(logits, k, normalize)
    assert_softmax_topk(torch.from_numpy(w2), torch.from_numpy(e2), torch.from_numpy(logits), k, normalize)


def test_gather_rows_widens_the_embedding_rows_exactly() -> None:
    table = torch.randn(50, 24).bfloat16()
    ids = np.array([3, 3, 49, 0])
    assert torch.equal(torch.from_numpy(gather_rows(storage_view(table)[0], ids)), table[ids].float())


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("tokens", [1, 5, 70])  # decode kernel, decode kernel, prefill path
def test_scale_weights_each_tokens_output_and_accumulate_adds(dtype: str, tokens: int) -> None:
    ws, ew = make_expert(128, 320, dtype, seed=5)
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, 128)).astype(np.float32)
    scale = rng.uniform(0.1, 1.0, tokens).astype(np.float32)
    y0 = rng.standard_normal((tokens, 128)).astype(np.float32)
    got = expert_rows(x, ew, out=y0.copy(), scale=scale)
    want = swiglu_expert(torch.from_numpy(x), *ws)
    weighted = mul(want, exact(torch.from_numpy(scale)[:, None]))
    # the kernel scales h before the down pass, so its bound is the expert's with the scale applied to h:
    # allow the product bound plus the add into y0 (one more rounding of the sum)
    total = Bounded(weighted.value + torch.from_numpy(y0).double(),
                    weighted.err * 2 + U * (weighted.value.abs() + torch.from_numpy(y0).double().abs()) + TINY)
    assert_within(torch.from_numpy(got), total, f"{dtype}, {tokens} tokens, scaled and added")
    w = ws[0]  # [320, 128]
    out0 = rng.standard_normal((tokens, 320)).astype(np.float32)
    got = kernel_linear(x, storage_view(w)[0], out=out0.copy(), accumulate=True)
    assert_within(torch.from_numpy(got), matmul(exact(torch.from_numpy(x)), exact(w.T), add=torch.from_numpy(out0)),
                  f"linear accumulate, {tokens} tokens")


def test_linear3_is_three_linears_side_by_side() -> None:
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(r, 200, generator=g).half() for r in (64, 16, 16)]
    for n in (1, 3, 80):
        x = torch.randn(n, 200, generator=g)
        got = kernel_linear3(x.numpy(), *(storage_view(t)[0] for t in w))
        assert_within(torch.from_numpy(got), linear(x, torch.cat(w)), f"linear3, {n} tokens")
    with pytest.raises(KernelInputError, match="one dtype and input width"):
        kernel_linear3(x.numpy(), storage_view(w[0])[0], storage_view(w[1].float())[0], storage_view(w[2])[0])


def test_machine_label_names_the_cpu_extensions() -> None:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), []) if Path("/proc/cpuinfo").exists() else []
    assert has_feature("AVX2") == ("avx2" in flags) and has_feature("AVX512_BF16") == ("avx512_bf16" in flags)
    label = machine_label(3)
    assert label.endswith(", 3 threads") and all(f in label for f in cpu_features())
    assert ("AVX2" in label) == ("avx2" in flags)


@pytest.mark.parametrize(("tokens", "window"), [(64, None), (96, 200), (80, 30)])  # torch's fused path; a window
def test_attention_of_a_fresh_prompt_is_the_formula(tokens: int, window: int | None) -> None:
    g = torch.Generator().manual_seed(tokens)
    q = torch.randn(1, tokens, 8, 32, generator=g)
    k, v = torch.randn(1, 2, tokens + 10, 32, generator=g), torch.randn(1, 2, tokens + 10, 32, generator=g)
    k[:, :, tokens:], v[:, :, tokens:] = float("nan"), float("nan")
    got = attention_bthd(q.numpy(), k.numpy(), v.numpy(), tokens, 0, window)
    want = attention(q.transpose(1, 2), k[:, :, :tokens], v[:, :, :tokens], 0, window)
    assert_within(torch.from_numpy(got).transpose(1, 2), want, f"attention of a fresh {tokens}-token prompt")
