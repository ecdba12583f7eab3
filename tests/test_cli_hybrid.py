"""``offloadkit generate --device loopback|cuda``: the reference's text, the benchmark's labels, the refusals."""

from __future__ import annotations

import json

import pytest

from offloadkit.cli import main

BASE = ["generate", "--model", "demo"]
LOOPBACK = ["--device", "loopback", "--profile", "rtx4090-desktop", "--gpu-memory-gib", "0.004"]


def _text(capsys, args: list[str]) -> str:
    assert main(args) == 0
    out = capsys.readouterr().out
    return out.split("[measured on")[0].split("]\n", 1)[-1]  # drop the plan line and the speed line


@pytest.mark.parametrize("policy", ["scheinfer", "llamacpp", "fiddler"])
def test_loopback_generate_prints_the_reference_text(capsys, policy):
    prompt = ["--prompt", "def parse(", "--max-new-tokens", "12"]
    want = _text(capsys, BASE + prompt)
    got = _text(capsys, BASE + prompt + LOOPBACK + ["--policy", policy])
    assert got == want and len(got) > len("def parse(")


def test_loopback_bench_labels_measured_and_simulated(capsys, tmp_path):
    trace = tmp_path / "t.json"
    assert main(BASE + LOOPBACK + ["--bench", "-p", "16", "-n", "4", "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "| pp16 |" in out and "| tg4 |" in out
    assert "measured: " in out and "loopback" in out and "not GPU figures" in out
    assert "simulated: the cost model on profile rtx4090-desktop (what-if: 0.004 GiB GPU)" in out
    events = json.loads(trace.read_text())
    assert events["otherData"]["source"] == "measured"
    assert {e["tid"] for e in events["traceEvents"] if e["ph"] == "X"} >= {1, 2, 3}  # cpu, gpu and h2d lanes


@pytest.mark.parametrize("extra, message", [
    (["--device", "loopback", "--prompt", "x"], "--device loopback needs --profile"),
    (LOOPBACK + ["--plan", "all-cpu", "--policy", "fiddler", "--prompt", "x"], "both say what to run"),
    (["--engine", "reference", "--device", "loopback", "--prompt", "x"], "ask for different engines"),
    (["--policy", "scheinfer", "--prompt", "x"], "--policy applies to the hybrid engine"),
    (["--bench"], "--bench times the hybrid engine"),
    (LOOPBACK + ["--bench", "--prompt", "x"], "drop --prompt"),
    (LOOPBACK, "give --prompt TEXT"),
    (LOOPBACK + ["--bench", "-p", "0"], "--prompt-tokens must be at least 1"),
    (["--engine", "hybrid", "--prompt", "x"], "--engine hybrid runs on a device"),
    (["--device", "cuda", "--profile", "rtx4090-desktop", "--prompt", "x"], "torch.cuda.is_available() is False"),
    (LOOPBACK + ["--plan", "all-gpu", "--prompt", "x"], "over by"),
])
def test_generate_refuses_with_a_message(capsys, extra, message):
    import torch

    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("CUDA is here: the refusal is for machines without it")
    assert main(BASE + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("offloadkit: error: ") and message in err and "Traceback" not in err
