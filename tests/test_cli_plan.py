"""``offloadkit plan`` and ``offloadkit simulate --policy/--plan/--json``: what they print and write agrees with the
package's own plans and simulations, and bad input (a workload, a trace of another model, a plan or model that
does not fit the GPU or the host) is refused in one line with exit status 2, before any work."""

import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from offloadkit.cli import main
from offloadkit.errors import PlanError
from offloadkit.hardware.catalog import hardware_dir, load_profile
from offloadkit.model.zoo import load_spec
from offloadkit.plan.commands import POLICY_NAMES
from offloadkit.plan.host_memory import check_host_fits, host_bytes_breakdown
from offloadkit.plan.plan_io import load_plan
from offloadkit.plan.plans import Workload, all_cpu, all_gpu, gpu_bytes_breakdown, parse_plan
from offloadkit.plan.policies import POLICIES, make_plan
from offloadkit.runtime.compare import compare_policies
from offloadkit.runtime.sim import simulate

SMALL = ["--prompt", "64", "--gen", "4"]
W = Workload(64, 4)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offloadkit.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_the_clis_policy_names_are_the_policies():
    assert POLICY_NAMES == POLICIES


# ---- offloadkit plan ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def described(tmp_path_factory):
    """``offloadkit plan`` of Mixtral on the 4090 desktop, its printed text and the plan file it wrote."""
    out = tmp_path_factory.mktemp("plan") / "mixtral.json"
    args = ["plan", "--model", "mixtral-8x7b", "--profile", "rtx4090-desktop", *SMALL, "--routing", "zipf:1.2",
            "--out", str(out)]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout, load_plan(out, load_spec("mixtral-8x7b")), out


def test_plan_is_labelled_simulated_and_writes_a_plan_file(described):
    text, plan, out = described
    first = text.splitlines()[0]
    assert first.startswith("plan scheinfer (scheinfer) of mixtral-8x7b for rtx4090-desktop · pp64+tg4, batch 1 · "
                            "routing zipf:1.2 — every figure simulated on rtx4090-desktop")
    assert "predicted, simulated on rtx4090-desktop" in text
    assert plan.policy == "scheinfer" and plan.assign == "balance"
    assert text.rstrip().endswith(f"--profile rtx4090-desktop --prompt 64 --gen 4 --batch 1 --routing zipf:1.2 "
                                  f"--plan {out})")


def test_plan_figures_are_those_of_the_plan_it_wrote(described):
    text, plan, _ = described
    spec, hw = load_spec("mixtral-8x7b"), load_profile("rtx4090-desktop")
    gpu = gpu_bytes_breakdown(plan, spec, W)
    weights_row = next(line for line in text.splitlines() if line.startswith("all weights"))
    assert f"{gpu['weights'] / 2**30:.2f} / {spec.total_bytes / 2**30:.2f}" in weights_row
    assert f"{100 * gpu['weights'] / spec.total_bytes:.1f}%" in weights_row
    expert_row = next(line for line in text.splitlines() if line.startswith("expert "))
    resident = sum(plan.gg_rows.get(f"L{layer}.expert{e}", 0) for layer in range(32) for e in range(8))
    assert f"{resident:,} / {32 * 8 * 14336:,}" in expert_row
    memory = next(line for line in text.splitlines() if line.startswith("GPU memory:"))
    assert f"= {sum(gpu.values()) / 2**30:.2f} GiB of 23.00 GiB usable on rtx4090-desktop" in memory
    result = simulate(spec, hw, plan, W, "zipf:1.2", record=False)
    predicted = text.split("predicted, simulated on rtx4090-desktop")[1].splitlines()
    rows = {line.split()[0]: line.split() for line in predicted if line.startswith(("prefill ", "decode "))}
    assert rows["prefill"][3] == f"{result.prefill_tokens_per_s:.2f}"
    assert rows["decode"][3] == f"{result.decode_tokens_per_s:.2f}"


def test_plan_lists_the_experts_it_keeps_resident_in_every_layer(described):
    text, plan, _ = described
    listed = {}
    for line in text.splitlines():
        m = re.fullmatch(r"  L(\d+): (.*)", line)
        if m:
            listed[int(m.group(1))] = {int(e): int(p) for e, p in re.findall(r"e(\d+) (\d+)%", m.group(2))}
    assert sorted(listed) == list(range(32))
    for layer, experts in listed.items():
        gg = {e: plan.gg_rows.get(f"L{layer}.expert{e}", 0) for e in range(8)}
        assert set(experts) == {e for e, rows in gg.items() if rows}, layer
        for e, pct in experts.items():
            assert pct == round(100 * gg[e] / 14336), (layer, e)
    assert "of the layer's routed tokens, from the plan's routing zipf:1.2" in text


def test_plan_layer_table_covers_every_layer_once(described):
    text, plan, _ = described
    table = text.split("GG by layer:\n")[1].split("\n\n")[0].splitlines()[2:]
    covered = []
    for line in table:
        first, _, last = line.split()[0].partition("-")
        covered += range(int(first[1:]), int((last or first)[1:]) + 1)
    assert covered == list(range(32))


def test_plan_of_a_dense_model_on_a_gpu_it_fits(capsys):
    assert main(["plan", "--model", "llama-2-7b", "--policy", "llamacpp", *SMALL]) == 0
    text = capsys.readouterr().out
    assert "plan llamacpp (ngl:33) (llamacpp) of llama-2-7b" in text
    assert "Experts resident" not in text and "FFN GG" in text
    assert re.search(r"^L0-L31 +100.0% +100.0% +GPU ", text, re.MULTILINE)  # every layer alike: one line
    assert "host rows of an op of >= 32 tokens are copied to the GPU" in text
    assert "prompt in 1 chunk of <= 64 tokens; lanes run one after another (serial)" in text


# ---- offloadkit simulate --policy / --plan / --json ----------------------------------------------------------

def test_simulate_json_rows_of_one_policy_are_compare_policies_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["simulate", "--policy", "llamacpp", *SMALL, "--json", str(out)]) == 0
    assert f"wrote 3 rows (simulated) to {out}" in capsys.readouterr().out
    spec, hw = load_spec("mixtral-8x7b"), load_profile("rtx4090-desktop")
    expected = compare_policies(spec, hw, W, "uniform", policies=["llamacpp"]).rows()
    assert json.loads(out.read_text()) == expected
    assert [r["phase"] for r in expected] == ["prefill", "decode", "overall"]


def test_bare_json_prints_the_rows_as_the_last_line(capsys):
    assert main(["simulate", "--plan", "ngl:4", *SMALL, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert {r["policy"] for r in rows} == {"llamacpp"} and all(r["source"] == "simulated" for r in rows)
    result = simulate("mixtral-8x7b", "rtx4090-desktop", "ngl:4", W, "uniform", record=False)
    assert rows[0]["seconds"] == result.prefill_s and rows[1]["seconds"] == result.decode_s


def test_simulate_runs_a_plan_file_written_by_plan(described, capsys):
    _, plan, out = described
    assert main(["simulate", "--plan", str(out), *SMALL, "--routing", "zipf:1.2", "--json"]) == 0
    printed = capsys.readouterr().out
    assert "plan scheinfer · pp64+tg4, batch 1 — simulated on rtx4090-desktop" in printed
    rows = json.loads(printed.splitlines()[-1])
    result = simulate("mixtral-8x7b", "rtx4090-desktop", plan, W, "zipf:1.2", record=False)
    assert rows[0]["tokens_per_s"] == pytest.approx(result.prefill_tokens_per_s, rel=1e-12)


def test_policy_all_compares_every_policy(tmp_path, capsys):
    out = tmp_path / "all.json"
    assert main(["simulate", "--policy", "all", *SMALL, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for name in POLICIES:
        assert re.search(rf"^{name} ", text, re.MULTILINE), name
    assert "simulated on rtx4090-desktop" in text and "x decode" in text
    assert re.search(r"^gpu-only +- +cannot run: plan all-gpu does not fit", text, re.MULTILINE)
    rows = json.loads(out.read_text())
    assert [(r["policy"], r["phase"]) for r in rows] == [(p, ph) for p in POLICIES
                                                         for ph in ("prefill", "decode", "overall")]
    gpu_only = [r for r in rows if r["policy"] == "gpu-only"]
    assert all(r["seconds"] is None and "does not fit" in r["error"] for r in gpu_only)


def test_the_acceptance_trace_has_events_on_all_four_lanes(tmp_path, capsys):
    trace = tmp_path / "t.json"
    assert main(["simulate", "--model", "mixtral-8x7b", "--profile", "rtx4090-desktop", "--trace", str(trace)]) == 0
    assert "plan scheinfer · pp512+tg128" in capsys.readouterr().out
    events = json.loads(trace.read_text())["traceEvents"]
    lanes = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    busy = {lane: 0.0 for lane in lanes.values()}
    for e in events:
        if e["ph"] == "X":
            busy[lanes[e["tid"]]] += e["dur"]
    assert set(busy) == {"cpu", "gpu", "h2d", "d2h"} and all(v > 0 for v in busy.values()), busy


# ---- refusals, one line each, before any work ------------------------------------------------------------------

def tiny_gpu_profile(tmp_path) -> str:
    """The 4090 desktop with 0.5 GiB of usable GPU memory: Mixtral's fixed state cannot fit."""
    text = (hardware_dir() / "rtx4090-desktop.toml").read_text()
    old = "usable_memory_gib = { total = 24.0, reserve = 1.0,"
    assert old in text
    path = tmp_path / "tiny-gpu.toml"
    path.write_text(text.replace(old, "usable_memory_gib = { total = 24.0, reserve = 23.5,"))
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["simulate", "--plan", "all-cpu", "--policy", "llamacpp"],
     "--plan all-cpu and --policy llamacpp both say what to run; give one"),
    (["simulate", "--plan", "all-cpu", "--policy", "scheinfer"], "--plan all-cpu and --policy scheinfer"),
    (["simulate", "--policy", "all", "--trace", "{tmp}/t.json"], "--trace needs one plan, and --policy all runs every"),
    (["simulate", "--policy", "all", "--ignore-memory"], "--ignore-memory needs one plan"),
    (["simulate", "--policy", "fiddler", "--ignore-memory"], "--ignore-memory applies to --plan"),
    (["simulate", "--batch", "0"], "--batch must be >= 1, got 0"),
    (["plan", "--prompt", "0"], "--prompt must be >= 1, got 0"),
    (["plan", "--batch", "-2"], "--batch must be >= 1, got -2"),
    (["plan", "--gen", "-1"], "--gen must be >= 0, got -1 (--gen 0 simulates the prefill only)"),
    (["plan", "--out", "{tmp}/no/p.json"], "--out {tmp}/no/p.json: the folder {tmp}/no does not exist"),
    (["simulate", "--json", "{tmp}/no/r.json"], "--json {tmp}/no/r.json: the folder {tmp}/no does not exist"),
    (["simulate", "--plan", "ngl:2", "--trace", "{tmp}/x.json", "--json", "{tmp}/x.json"],
     "--trace and --json name the same file"),
    (["simulate", "--plan", "{tmp}/none.json"], "plan file {tmp}/none.json: no such file"),
    (["simulate", "--plan", "{tmp}/file"], "unknown plan '{tmp}/file'"),
    (["plan", "--model", "qwen1.5-moe-a2.7b", "--routing", "trace:demo-mixtral-pydoc.npz"],
     "the trace of demo-mixtral (4 MoE layers, 8 experts, top-2) does not match qwen1.5-moe-a2.7b"),
    (["simulate", "--model", "llama-2-7b", "--routing", "trace:demo-mixtral-pydoc.npz"],
     "the trace of demo-mixtral (4 MoE layers, 8 experts, top-2) does not match llama-2-7b"),
    (["plan", "--routing", "trace:{tmp}/none.npz"], "cannot read routing trace {tmp}/none.npz"),
    (["plan", "--policy", "fiddler", "--model", "llama-2-7b"], "fiddler runs Mixture-of-Experts models only"),
    (["plan", "--policy", "gpu-only"], "plan all-gpu does not fit rtx4090-desktop"),
    (["plan", "--profile", "{tiny}"], "mixtral-8x7b cannot run on rtx4090-desktop (usable 0.50 GiB) even with zero "
                                      "GG rows"),
    (["plan", "--model", "llama-2-70b", "--policy", "cpu-only"],
     "plan all-cpu does not fit the host memory of rtx4090-desktop"),
    (["simulate", "--model", "llama-2-70b", "--plan", "all-cpu"],
     "plan all-cpu does not fit the host memory of rtx4090-desktop"),
])
def test_bad_input_is_refused_in_one_line(tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("keep me")
    fill = {"tmp": tmp_path, "tiny": tiny_gpu_profile(tmp_path)}
    assert main([a.format(**fill) for a in [args[0], *SMALL, *args[1:]]]) == 2  # args' own --gen/--prompt win
    captured = capsys.readouterr()
    assert captured.err.startswith(f"offloadkit: error: {message.format(**fill)}"), captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "tiny-gpu.toml"]  # nothing written


def test_unknown_policy_is_refused_by_the_parser():
    r = run_cli("simulate", "--policy", "scheinfr")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "invalid choice: 'scheinfr'" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["plan", "--model", "llama-2-70b", "--policy", "cpu-only"], "does not fit the host memory of rtx4090-desktop"),
    (["simulate", "--model", "phi-3.5-moe", "--routing", "trace:demo-mixtral-pydoc.npz"], "does not match phi-3.5-moe"),
])
def test_refusals_from_the_shell_have_no_traceback(args, message):
    r = run_cli(*args, *SMALL)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.startswith("offloadkit: error: ") and message in r.stderr and r.stderr.count("\n") == 1


def test_ignore_memory_runs_a_plan_the_host_cannot_hold(capsys):
    assert main(["simulate", "--model", "llama-2-70b", "--plan", "all-cpu", "--ignore-memory", *SMALL]) == 0
    assert "llama-2-70b · plan all-cpu · pp64+tg4, batch 1 — simulated on rtx4090-desktop" in capsys.readouterr().out


# ---- host memory ----------------------------------------------------------------------------------------------

def test_all_cpu_keeps_the_whole_model_and_kv_cache_on_the_host():
    spec, hw = load_spec("llama-2-70b"), load_profile("rtx4090-desktop")
    w = Workload(512, 128, batch=2)
    kv = 2 * 640 * 80 * 2 * 8 * 128 * 2  # batch x positions x layers x (K, V) x kv heads x head dim x bf16 bytes
    assert host_bytes_breakdown(all_cpu(spec), spec, w) == {"weights": spec.total_bytes, "kv_cache": kv}
    over = spec.total_bytes + kv - 128 * 2**30
    with pytest.raises(PlanError, match=f"over by {over:,} bytes"):
        check_host_fits(all_cpu(spec), spec, hw, w)
    assert host_bytes_breakdown(all_gpu(spec), spec, w) == {"weights": 0, "kv_cache": 0}


def test_host_and_gpu_weights_add_up_to_the_model():
    spec, hw = load_spec("mixtral-8x7b"), load_profile("rtx4090-desktop")
    for policy in ("llamacpp", "fiddler", "ktransformers", "cpu-only"):
        plan = make_plan(policy, spec, hw, W)
        host, gpu = host_bytes_breakdown(plan, spec, W), gpu_bytes_breakdown(plan, spec, W)
        assert host["weights"] + gpu["weights"] == spec.total_bytes, policy
        left = check_host_fits(plan, spec, hw, W)
        assert left == 128 * 2**30 - sum(host.values()) > 0, policy
    ngl = parse_plan("ngl:8", spec)  # 8 layers' KV cache on the GPU, 24 on the host
    assert host_bytes_breakdown(ngl, spec, W)["kv_cache"] == 24 * 68 * 2 * 8 * 128 * 2


def test_a_tied_embedding_is_held_once():
    spec = replace(load_spec("llama-2-7b"), tie_word_embeddings=True)
    assert host_bytes_breakdown(all_cpu(spec), spec)["weights"] == spec.total_bytes


def test_unknown_host_memory_is_not_checked():
    spec, hw = load_spec("llama-2-70b"), load_profile("rtx4090-desktop")
    hw = replace(hw, cpu=replace(hw.cpu, memory_gib=None))
    assert check_host_fits(all_cpu(spec), spec, hw, Workload()) is None
