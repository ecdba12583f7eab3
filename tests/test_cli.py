"""The command line: tables it prints and errors it reports without a traceback."""

import subprocess
import sys

import pytest

from offloadkit.cli import main
from offloadkit.hardware.machine import cpu_model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offloadkit.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_info_prints_breakdown(capsys):
    assert main(["info", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "routed experts" in out and "46.70 B" in out and "12.88 B" in out
    assert "86.99 GiB" in out


@pytest.mark.parametrize("args, message", [
    (["info", "/no/such/model"], "no model named '/no/such/model'"),
    (["info", "not-a-zoo-model"], "mixtral-8x7b"),
])
def test_errors_are_one_line_without_traceback(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("offloadkit: error:") and message in r.stderr


def test_unsupported_architecture_from_cli(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    r = run_cli("info", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'bert' is not supported" in r.stderr


def test_make_model_then_generate_matches_the_reference(tmp_path, capsys):
    import torch

    from offloadkit.runtime.engines import load_engine

    out = tmp_path / "tiny"
    assert main(["make-model", "--arch", "qwen2_moe", "--out", str(out), "--layers", "2", "--hidden", "32",
                 "--experts", "4", "--vocab", "300", "--seed", "3"]) == 0
    assert main(["generate", "--model", str(out), "--prompt", "hi", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert f"measured on {cpu_model()}" in printed and "engine: reference" in printed
    model, tok = load_engine("reference", out)
    ids = tok.encode("hi")
    expected = model.greedy(torch.tensor([ids]), 6)[0].tolist()
    stop = next((i for i, t in enumerate(expected) if t in tok.eos_ids), len(expected) - 1)
    assert tok.decode(expected[:stop + 1]) in printed


def test_corrupt_checkpoint_from_cli(tmp_path):
    out = tmp_path / "m"
    assert main(["make-model", "--arch", "llama", "--out", str(out), "--hidden", "32", "--vocab", "300"]) == 0
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    r = run_cli("generate", "--model", str(out), "--prompt", "x", "--max-new-tokens", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "model.safetensors" in r.stderr and "truncated" in r.stderr


def test_make_model_rejects_bad_sizes(tmp_path):
    r = run_cli("make-model", "--arch", "mixtral", "--out", str(tmp_path / "x"), "--experts", "2",
                "--top-k", "3")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "exceeds the number of experts" in r.stderr
