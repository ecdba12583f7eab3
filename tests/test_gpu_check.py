"""benchmarks/gpu_check.py rehearsed without a GPU: ``--device loopback`` runs the hybrid engine stage
(benchmarks/hybrid_check.py) on the loopback device, skips the stages that need CUDA saying why, and
labels every figure as measured on the loopback device (never a GPU) or simulated on a named profile."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
POLICIES = ["scheinfer", "llamacpp", "fiddler"]


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loopback_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "loopback", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    return run, out


@pytest.mark.slow
def test_loopback_runs_the_hybrid_stage_and_skips_the_gpu_ones(loopback_run):
    run, out = loopback_run
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ("GPU tests", "probe on this device", "kernel benchmark"):
        assert f"## {name}: skipped (needs a CUDA GPU; skipped on the loopback device)" in run.stdout
    assert "## hybrid engine: exit 0" in run.stdout and "failed stages: none" in run.stdout
    assert (out / "gpu_check.log").read_text().count("## ") == 4


@pytest.mark.slow
def test_the_table_says_tokens_equal_and_labels_loopback_not_gpu(loopback_run):
    run, _ = loopback_run
    lines = run.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("policy "))
    assert "tokens equal" in lines[header] and "pp t/s measured" in lines[header]
    assert "tg t/s simulated" in lines[header] and "tg measured/simulated" in lines[header]
    rows = {line.split()[0]: line.split() for line in lines[header + 2:header + 2 + len(POLICIES)]}
    assert sorted(rows) == sorted(POLICIES)
    for cells in rows.values():
        assert cells[1] == "yes" and all(float(c) > 0 for c in cells[-6:])  # the rates and ratios
    legend = "\n".join(lines[header:])
    assert "measured: the hybrid engine on loopback (CPU threads standing in for a GPU)" in legend
    assert "simulated: offloadkit's simulator on profile rtx4090-desktop" in legend
    assert "loopback device (CPU threads, not GPU figures)" in run.stdout


@pytest.mark.slow
def test_the_json_holds_every_policy_with_sources(loopback_run):
    _, out = loopback_run
    report = json.loads((out / "hybrid" / "hybrid_check.json").read_text())
    assert report["device"]["kind"] == "loopback" and report["device"]["is_gpu"] is False
    assert "loopback" in report["device"]["label"]
    assert report["profile"]["name"] == "rtx4090-desktop"
    assert report["device_cap_bytes"] < report["all_gpu_bytes"]  # a moderate GPU: the model does not fit whole
    assert report["profile"]["usable_gpu_bytes"] <= report["device_cap_bytes"]
    assert [r["policy"] for r in report["policies"]] == POLICIES
    for r in report["policies"]:
        assert "error" not in r, r.get("error")
        assert r["tokens_equal"] is True and r["tokens"] == report["reference_tokens"]
        assert len(r["tokens"]) == report["workload"]["gen_tokens"] + 1
        m, s = r["measured"], r["simulated"]
        assert m["source"] == "measured" and "loopback" in m["device"] and m["device_kind"] == "loopback"
        assert s["source"] == "simulated" and s["profile"] == "rtx4090-desktop"
        assert m["pp_tps"] > 0 and m["tg_tps"] > 0 and s["pp_tps"] > 0 and s["tg_tps"] > 0
        assert r["ratio"]["tg"] == pytest.approx(m["tg_tps"] / s["tg_tps"])
        assert 0 <= r["resident_share"] < 1
        assert (out / "hybrid" / f"timeline-{r['policy']}.json").is_file()


def test_on_cuda_every_stage_runs_and_the_hybrid_stage_gets_the_device(tmp_path):
    gc = _load_gpu_check()
    stages = gc.stages("cuda", tmp_path)
    assert [name for name, _, _ in stages] == ["GPU tests", "probe on this device", "kernel benchmark",
                                                "hybrid engine"]
    assert all(cmd is not None for _, cmd, _ in stages)
    hybrid = stages[-1][1]
    assert hybrid[1:] == ["benchmarks/hybrid_check.py", "--device", "cuda", "--out", str(tmp_path / "hybrid")]
    for path in stages[0][1]:
        if path.startswith("tests/"):
            assert (REPO / path).is_file(), path
    loop = gc.stages("loopback", None)
    assert [cmd is None for _, cmd, _ in loop] == [True, True, True, False]
    assert "--out" not in loop[-1][1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_default_device_says_so_and_passes():
    run = subprocess.run([sys.executable, str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "No CUDA here" in run.stdout and "--device loopback" in run.stdout
