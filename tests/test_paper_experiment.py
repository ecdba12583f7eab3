"""benchmarks/paper.py --quick: the JSON schema, every row labelled simulated, the paper's ranges quoted as its own."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import offloadkit
from offloadkit.plan.policies import POLICIES

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "paper.py"
ROW_KEYS = {"model", "profile", "policy", "phase", "tokens", "seconds", "tokens_per_s", "bound_tokens_per_s",
            "fraction_of_bound", "bounding_lane", "routing", "workload", "source"}
PAPER_RANGES = {"prefill": "1.69–6.33×", "decode": "1.11–1.80×", "overall": "1.25–2.04×"}


def run(out: Path, *extra: str) -> tuple[dict[str, Any], str, str]:
    p = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, check=True)
    return (json.loads((out / "paper_experiment.json").read_text()), (out / "paper_experiment.md").read_text(),
            p.stdout + p.stderr)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str]:
    return run(tmp_path_factory.mktemp("paper"))


def test_metadata(quick):
    meta = quick[0]["metadata"]
    assert meta["source"] == "simulated"
    assert meta["offloadkit_version"] == offloadkit.__version__
    assert dt.datetime.fromisoformat(meta["date"]).tzinfo is not None
    assert "commit" in meta["git"] and (meta["git"]["commit"] is None or len(meta["git"]["commit"]) == 40)
    assert meta["command"].startswith("python benchmarks/paper.py --quick --out ")
    assert "cost model" in meta["cost_model_note"] and "not measured" in meta["cost_model_note"]
    assert meta["workload"] == {"label": "pp512+tg128", "prompt_tokens": 512, "gen_tokens": 128, "batch": 1}
    assert meta["paper"]["ranges"] == {"prefill": [1.69, 6.33], "decode": [1.11, 1.80], "overall": [1.25, 2.04]}
    assert "arXiv 2411.15715" in meta["paper"]["citation"]
    assert meta["wall_s"] > 0 and meta["machine"]
    for p in meta["profiles"].values():
        assert p["gpu_memory_gib"] > 0 and p["link"].startswith("PCIe")


def test_rows_schema_and_every_row_simulated(quick):
    doc = quick[0]
    rows = doc["rows"]
    assert rows
    for r in rows:
        assert set(r) >= ROW_KEYS, ROW_KEYS - set(r)
        assert r["source"] == "simulated"
        assert r["workload"] == "pp512+tg128"
        if r.get("error"):
            assert r["seconds"] is None and r["tokens_per_s"] is None
        else:
            assert r["seconds"] > 0 and r["tokens_per_s"] > 0
            assert 0 < r["fraction_of_bound"] <= 1 + 1e-9
    cases = {(r["profile"], r["model"], r["routing"]) for r in rows}
    assert cases == {("rtx4060ti16-desktop", "mixtral-8x7b", "trace:demo-mixtral-pydoc tiled 4→32 layers"),
                     ("rtx4060ti16-desktop", "llama-2-13b", "dense")}
    for case in cases:  # every policy and phase of every case is a row, run or not
        got = {(r["policy"], r["phase"]) for r in rows if (r["profile"], r["model"], r["routing"]) == case}
        assert got == {(p, ph) for p in POLICIES for ph in ("prefill", "decode", "overall")}
    for key in ("speedups", "bound_fractions", "scheinfer_slower", "faster_than_bound"):
        assert all(x["source"] == "simulated" for x in doc[key])
    assert doc["faster_than_bound"] == []


def test_unmatched_trace_is_skipped_and_said(quick):
    doc, md, _ = quick
    skipped = [c for c in doc["cases"] if c["status"] == "skipped"]
    assert [(c["model"], c["routing"]) for c in skipped] == [("phi-3.5-moe", "trace")]
    assert skipped[0]["reason"].startswith("no matching trace")
    assert "no matching trace" in md and "phi-3.5-moe" in md


def test_speedups_beside_the_papers_ranges(quick):
    doc = quick[0]
    by = {(s["over"], s["phase"]): s for s in doc["speedups"]}
    assert by[("llamacpp", "overall")]["n"] == 2 and by[("fiddler", "overall")]["n"] == 1  # fiddler: MoE only
    for s in doc["speedups"]:
        assert s["paper_range"] == [float(x) for x in PAPER_RANGES[s["phase"]].rstrip("×").split("–")]
        assert "2411.15715" in s["paper_source"]
        assert s["min"] <= s["median"] <= s["max"]


def test_markdown_quotes_the_papers_ranges_as_the_papers(quick):
    md = quick[1]
    assert "**Every offloadkit figure in this file is simulated**" in md
    section = md.split("## The paper's reported ranges (the paper's, not ours)")[1].split("\n## ")[0]
    assert "arXiv 2411.15715, abstract" in section
    assert "1.11x to 1.80x faster in decoding and 1.69x to 6.33x faster in pre-filling" in section
    for phase, rng in PAPER_RANGES.items():
        assert f"| {phase} | {rng} |" in section
    table = md.split("## (b)")[1].split("### Per case")[0]
    for phase, rng in PAPER_RANGES.items():  # beside ours, each range is marked as the paper's
        rows = [line for line in table.splitlines() if line.startswith("| ") and f"| {phase} |" in line]
        assert rows and all(line.endswith(f"| {rng} (paper) |") for line in rows)
    for heading in ("## (a)", "## (b)", "## (c)"):
        assert "(simulated)" in md.split(heading)[1].splitlines()[0]


def test_prints_the_progress_bar_and_the_total_time(quick):
    out = quick[2]
    assert "paper experiment (simulated)" in out and "3/3" in out
    assert "total time" in out and "figures simulated" in out


@pytest.mark.slow
def test_parallel_processes_give_the_same_rows(quick, tmp_path: Path):
    """Every row is identical: plans are deterministic (the partition's repair moves are bounded by a count
    of estimates, not a clock), so two processes give the same figures."""
    doc, _, _ = run(tmp_path, "--jobs", "2")
    assert doc["metadata"]["jobs"] == 2
    one, two = quick[0]["rows"], doc["rows"]
    assert [(r["model"], r["routing"], r["policy"], r["phase"]) for r in one] == \
        [(r["model"], r["routing"], r["policy"], r["phase"]) for r in two]
    for a, b in zip(one, two, strict=True):
        assert a == b
