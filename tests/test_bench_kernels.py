"""``offloadkit bench kernels``: the rows, the labels and the targets (on a tiny shape: timings are never tested)."""

from __future__ import annotations

import json

import pytest

from offloadkit.bench import kernels
from offloadkit.bench.kernels import Shape, format_markdown, run, targets
from offloadkit.cli import main


@pytest.fixture(scope="module")
def result() -> dict:
    return run([Shape("tiny expert", 64, 96)], rounds=1, quick=True)


def test_every_row_is_measured_and_complete(result: dict) -> None:
    assert result["source"] == "measured" and "threads" in result["machine"]
    kinds = {(r["kernel"], r["dtype"]) for r in result["rows"]}
    for dtype in ("bfloat16", "float32"):
        assert {("read", dtype), ("decode", dtype), ("torch", dtype), ("prefill", dtype)} <= kinds
    assert ("torch_gemm", "float32") in kinds
    for r in result["rows"]:
        assert r["source"] == "measured" and r["time_s"] > 0
        if r["kernel"] == "decode":
            assert r["vs_read"] > 0 and r["vs_torch"] > 0
        if r["kernel"] in ("prefill", "auto"):
            assert r["vs_torch_f32_gemm"] > 0


def test_markdown_and_targets(result: dict) -> None:
    text = format_markdown(result)
    assert text.startswith("**measured** on ") and "| tiny expert | decode | bfloat16 | 1 |" in text
    assert "Targets (ratios measured in this run)" in text
    names = [t["target"] for t in result["targets"]]
    assert any("decode n=1 bfloat16 >= 85% of the read" in n for n in names)
    assert any("1.2x torch" in n for n in names) and any("torch f32 GEMM" in n for n in names)
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    assert targets([], "nothing") == []  # no rows, no claims


def test_cli_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    monkeypatch.setattr(kernels, "MIXTRAL", Shape("tiny", 32, 64))
    monkeypatch.setattr(kernels, "demo_shape", lambda: None)
    out = tmp_path / "bench.json"
    assert main(["bench", "kernels", "--json", "--quick", "--rounds", "1", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["source"] == "measured" and {r["shape"] for r in printed["rows"]} == {"tiny"}
    assert json.loads(out.read_text())["machine"] == printed["machine"]
