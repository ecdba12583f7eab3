"""``offloadkit bench kernels``: the rows, the labels and the ratios (on a tiny shape: timings are never tested)."""

from __future__ import annotations

import json

import pytest

from offloadkit.bench import kernels
from offloadkit.bench.kernels import Shape, format_markdown, ratios, run
from offloadkit.cli import main


@pytest.fixture(scope="module")
def result() -> dict:
    return run([Shape("tiny expert", 64, 96)], rounds=2, quick=True, read_bytes=8 * 2**20)


def test_every_row_is_measured_and_complete(result: dict) -> None:
    assert result["source"] == "measured" and "threads" in result["machine"]
    kinds = {(r["kernel"], r["dtype"]) for r in result["rows"]}
    assert ("read", "") in kinds  # one read of the machine per shape, not one per dtype
    for dtype in ("bfloat16", "float32"):
        assert {("decode", dtype), ("torch", dtype), ("prefill", dtype)} <= kinds
    assert ("torch_gemm", "float32") in kinds
    read = next(r for r in result["rows"] if r["kernel"] == "read")
    assert read["read_bytes"] == 8 * 2**20 and read["read_samples"] >= 2  # at least one sample per round
    lo, mid, hi = read["read_spread_gbps"]
    assert 0 < lo <= mid <= hi == pytest.approx(read["gbps"])  # the figure is the best sample
    for r in result["rows"]:
        assert r["source"] == "measured" and r["time_s"] > 0
        if r["kernel"] == "decode":
            assert r["vs_read"] == pytest.approx(r["gbps"] / read["gbps"]) and r["vs_torch"] > 0
        if r["kernel"] in ("prefill", "auto"):
            assert r["vs_torch_f32_gemm"] > 0


def test_markdown_prints_ratios_a_user_can_read(result: dict) -> None:
    text = format_markdown(result)
    assert text.startswith("**measured** on ") and "| tiny expert | decode | bfloat16 | 1 |" in text
    assert "Memory read, sampled between the tiny expert kernels: " in text and "samples " in text
    assert "MISSED" not in text and "target" not in text.lower()  # no pass/fail jargon
    said = [r["text"] for r in result["ratios"]]
    read = next(r for r in result["rows"] if r["kernel"] == "read")
    assert any(t.startswith("decode n=1 reads its bfloat16 weights at ") and f"({read['gbps']:.1f} GB/s)" in t
               for t in said)
    assert any("the speed of torch (F.linear in bfloat16)" in t for t in said)
    assert any("torch's f32 GEMM" in t for t in said)
    assert all(t in text for t in said) and f"measured on {result['machine']}" in text
    assert all(r["ratio"] > 0 for r in result["ratios"])
    assert ratios([], "nothing") == []  # no rows, no claims


def test_cli_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    monkeypatch.setattr(kernels, "MIXTRAL", Shape("tiny", 32, 64))
    monkeypatch.setattr(kernels, "demo_shape", lambda: None)
    out = tmp_path / "bench.json"
    assert main(["bench", "kernels", "--json", "--quick", "--rounds", "1", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["source"] == "measured" and {r["shape"] for r in printed["rows"]} == {"tiny"}
    assert json.loads(out.read_text())["machine"] == printed["machine"]
