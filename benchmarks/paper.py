"""The ScheInfer paper's experiment (arXiv 2411.15715), simulated on offloadkit's catalog profiles.

    python benchmarks/paper.py [--out data/results] [--quick]

The paper compares ScheInfer with llama.cpp and Fiddler on Mixtral, LLaMA-2, Qwen and PhiMoE models on
three machines with moderate GPUs, and its abstract reports the speedup ranges quoted in
:data:`PAPER`. offloadkit cannot rerun that on real hardware here, so this script runs the same
comparison through offloadkit's engine and cost model: every policy of
:mod:`offloadkit.plan.policies` on every (model, profile, routing) case, ``pp512 + tg128`` at batch 1,
with the bound no placement can beat (:func:`~offloadkit.runtime.compare.compare_policies`).

It writes ``paper_experiment.json`` (metadata, then every row; each row ``"source": "simulated"``) and
``paper_experiment.md`` (tokens/s per case, speedups of scheinfer over llama.cpp and Fiddler beside the
paper's ranges, each policy's fraction of the bound, and every case where scheinfer is slower than
another policy). Every offloadkit figure is **simulated** on the named profile; the paper's figures
are the paper's, quoted from its abstract, never mixed with ours, and nothing here is tuned to them.

Routings: ``uniform``, ``zipf:1.2``, and the demo model's recorded trace tiled onto the model's layers
(:class:`~offloadkit.plan.trace_tiling.TiledTrace`), which only fits models with the trace's 8 experts
and top-2 (Mixtral-8x7B); the other MoE models are listed as "no matching trace". Dense LLaMA models
have no routing and run once (routing ``dense``). ``--quick`` runs a few cases (for the tests).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import offloadkit
from offloadkit.errors import TraceError
from offloadkit.hardware.catalog import load_profile
from offloadkit.hardware.machine import machine_label
from offloadkit.hardware.profile import HardwareProfile
from offloadkit.model.spec import ModelSpec
from offloadkit.model.zoo import load_spec
from offloadkit.plan.plans import Workload, all_gpu
from offloadkit.plan.policies import POLICIES
from offloadkit.plan.routing import Routing
from offloadkit.plan.trace_tiling import TiledTrace
from offloadkit.runtime.compare import PHASES, Comparison, compare_policies

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("mixtral-8x7b", "llama-2-70b", "llama-2-13b", "qwen2-57b-a14b", "qwen1.5-moe-a2.7b", "phi-3.5-moe")
PROFILES = ("rtx4060ti16-desktop", "rtx4090-desktop", "rtxa6000-workstation", "t4-server-pcie3")
ROUTINGS = ("uniform", "zipf:1.2", "trace")
TRACE = "demo-mixtral-pydoc.npz"
WORKLOAD = Workload(prompt_tokens=512, gen_tokens=128, batch=1)
#: --quick: one profile; Mixtral on its tiled trace, a dense LLaMA, and one MoE model without a matching trace.
QUICK = {"profiles": ("rtx4060ti16-desktop",), "models": ("mixtral-8x7b", "llama-2-13b", "phi-3.5-moe"),
         "routings": ("trace",)}
BASELINES_OF_PAPER = ("llamacpp", "fiddler")

#: The paper's own reported speedups of ScheInfer, as its abstract states them (measured by its authors on
#: their machines, over llama.cpp and Fiddler together: the abstract does not split them by baseline).
PAPER: dict[str, Any] = {
    "citation": "Lin, Pan, Shi, Wang, Chu: Task Scheduling for Efficient Inference of Large Language Models on "
                "Single Moderate GPU Systems, arXiv 2411.15715, abstract",
    "quote": "ScheInfer achieves speeds between 1.11x to 1.80x faster in decoding and 1.69x to 6.33x faster in "
             "pre-filling, leading to an overall speedup ranging from 1.25x to 2.04x compared to state-of-the-art "
             "solutions, llama.cpp and Fiddler.",
    "over": "llama.cpp and Fiddler",
    "ranges": {"prefill": (1.69, 6.33), "decode": (1.11, 1.80), "overall": (1.25, 2.04)},
}
COST_MODEL_NOTE = (
    "Simulated, not measured: every task is priced by offloadkit's cost model (offloadkit/plan/costmodel.py: "
    "per-call overhead + max(bytes / bandwidth, FLOPs / rate) from the catalog profile's figures; the catalog "
    "profiles carry no measured curves) and scheduled by offloadkit's simulator (offloadkit/runtime/sim.py) "
    "on the cpu, h2d and gpu lanes; weights in each model's published dtype; the baselines are offloadkit's "
    "own re-implementations of their placement and assignment rules (offloadkit/plan/policies.py).")


@dataclass
class Case:
    """One (model, profile, routing) of the experiment, with its comparison or why it was skipped."""

    model: str
    profile: str
    routing: str  # "uniform", "zipf:1.2", "trace" or "dense"
    comparison: Comparison | None = None
    skipped: str | None = None
    wall_s: float = 0.0  # measured: how long planning and simulating the case took on this machine

    @property
    def key(self) -> str:
        return f"{self.profile} · {self.model} · {self.comparison.routing if self.comparison else self.routing}"


def plan_cases(quick: bool) -> list[Case]:
    """Every case in run order (profiles outer, then models, then routings); dense models get one case."""
    profiles = QUICK["profiles"] if quick else PROFILES
    models = QUICK["models"] if quick else MODELS
    routings = QUICK["routings"] if quick else ROUTINGS
    out = []
    for profile in profiles:
        for model in models:
            if not load_spec(model).is_moe:
                out.append(Case(model, profile, "dense"))
                continue
            out.extend(Case(model, profile, r) for r in routings)
    return out


def routing_of(spec: ModelSpec, name: str) -> Routing | str | None:
    """The routing to simulate ``spec`` with; raises TraceError where the trace does not match the model."""
    if name == "dense":
        return None
    if name == "trace":
        return TiledTrace.load(TRACE, spec)
    return name


_SPECS: dict[str, ModelSpec] = {}
_PROFILES: dict[str, HardwareProfile] = {}


def run_case(case: Case) -> Case:
    """Simulate ``case`` (every policy and the bounds); a trace that does not match marks it skipped."""
    spec = _SPECS.get(case.model) or _SPECS.setdefault(case.model, load_spec(case.model))
    profile = _PROFILES.get(case.profile) or _PROFILES.setdefault(case.profile, load_profile(case.profile))
    try:
        routing = routing_of(spec, case.routing)
    except TraceError as e:
        case.skipped = f"no matching trace: {e}"
        return case
    t0 = time.perf_counter()
    comparison = compare_policies(spec, profile, WORKLOAD, routing, policies=POLICIES, seed=0)
    case.wall_s = time.perf_counter() - t0
    if case.routing == "dense":
        comparison.routing = "dense"
    case.comparison = comparison
    return case


# ---- summaries ------------------------------------------------------------------------------------


def speedups(cases: Sequence[Case], over: str, phase: str) -> list[tuple[Case, float]]:
    """scheinfer's speedup over ``over`` in ``phase`` for every case where both ran."""
    out = []
    for c in cases:
        if c.comparison is not None:
            s = c.comparison.speedup(over, phase)
            if s is not None:
                out.append((c, s))
    return out


def stats(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {"n": len(values), "min": min(values), "median": statistics.median(values), "max": max(values)}


def speedup_summary(cases: Sequence[Case]) -> list[dict[str, Any]]:
    """Per baseline (llamacpp, fiddler, and both pooled as the paper pools them) and phase: min/median/max."""
    out = []
    for over in (*BASELINES_OF_PAPER, "llamacpp+fiddler"):
        for phase in PHASES:
            names = BASELINES_OF_PAPER if over == "llamacpp+fiddler" else (over,)
            values = [s for name in names for _, s in speedups(cases, name, phase)]
            lo, hi = PAPER["ranges"][phase]
            out.append({"over": over, "phase": phase, **stats(values), "source": "simulated",
                        "paper_range": [lo, hi], "paper_source": PAPER["citation"]})
    return out


def bound_fractions(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per policy and phase: the mean and min of its fraction of the bound over the cases it ran."""
    out = []
    for policy in POLICIES:
        for phase in PHASES:
            rs = [r for r in rows
                  if r["policy"] == policy and r["phase"] == phase and r.get("fraction_of_bound") is not None]
            f = [r["fraction_of_bound"] for r in rs]
            worst = min(rs, key=lambda r: r["fraction_of_bound"]) if rs else None
            out.append({"policy": policy, "phase": phase, "n": len(f),
                        "mean": statistics.fmean(f) if f else None, "min": min(f) if f else None,
                        "max": max(f) if f else None,
                        "min_case": f"{worst['profile']} · {worst['model']} · {worst['routing']}" if worst else None,
                        "source": "simulated"})
    return out


def slower_cases(cases: Sequence[Case]) -> list[dict[str, Any]]:
    """Every (case, policy, phase) where scheinfer takes longer than another policy that ran."""
    out = []
    for c in cases:
        if c.comparison is None or c.comparison.runs["scheinfer"].result is None:
            continue
        for name, run in c.comparison.runs.items():
            if name == "scheinfer" or run.result is None:
                continue
            for phase in c.comparison.phases():
                s = c.comparison.speedup(name, phase)
                if s is not None and s < 1.0:
                    tok = c.comparison.tokens(phase)
                    out.append({"profile": c.profile, "model": c.model, "routing": c.comparison.routing,
                                "policy": name, "phase": phase, "speedup": s,
                                "scheinfer_tokens_per_s": tok / c.comparison.runs["scheinfer"].seconds(phase),
                                "other_tokens_per_s": tok / run.seconds(phase), "source": "simulated"})
    return out


def bound_violations(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows faster than their bound (a fraction above 1 by more than rounding): the bound would be wrong."""
    return [r for r in rows if r.get("fraction_of_bound") is not None and r["fraction_of_bound"] > 1 + 1e-9]


# ---- output ---------------------------------------------------------------------------------------


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "tracked_files_modified": bool(status) if status is not None else None}


def profile_info(p: HardwareProfile) -> dict[str, Any]:
    return {"name": p.name, "description": p.description, "cpu": p.cpu.name, "cpu_cores": p.cpu.cores,
            "dram_gbps_effective": p.cpu.dram_bandwidth_gbps,
            "gpu": p.gpu.name if p.gpu else None, "gpu_memory_gib": p.gpu.memory_gib if p.gpu else None,
            "gpu_usable_gib": p.gpu.usable_memory_gib if p.gpu else None,
            "gpu_gbps_effective": p.gpu.memory_bandwidth_gbps if p.gpu else None,
            "link": p.link.name if p.link else None,
            "h2d_pinned_gbps_effective": p.link.h2d_pinned_gbps if p.link else None}


def scheinfer_plan(case: Case) -> str:
    """How scheinfer's plan of ``case`` came about: the partition, a baseline's seed, or the whole model."""
    plan = case.comparison.runs["scheinfer"].plan if case.comparison else None
    if plan is None:
        return "–"
    whole = all_gpu(_SPECS.get(case.model) or load_spec(case.model))
    if dict(plan.gg_rows) == dict(whole.gg_rows) and plan.kv_on_gpu == whole.kv_on_gpu:
        return "whole model on GPU"
    seed = plan.meta.get("seeded_from")
    return f"seeded from {seed}" if seed else "partition"


def _f(v: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    return "–" if v is None else f"{v:{fmt}}{suffix}"


def markdown(meta: dict[str, Any], cases: Sequence[Case], rows: Sequence[dict[str, Any]],
             summary: list[dict[str, Any]], fractions: list[dict[str, Any]], slower: list[dict[str, Any]],
             violations: list[dict[str, Any]]) -> str:
    ran = [c for c in cases if c.comparison is not None]
    lines = [
        "# The ScheInfer paper's experiment, simulated",
        "",
        "**Every offloadkit figure in this file is simulated** (offloadkit's cost model on the named catalog "
        "profile; no hardware was run). The paper's figures are **the paper's**: measured by its authors on "
        "their own machines and quoted from the abstract of arXiv 2411.15715; they are shown beside ours, "
        "never mixed into them, and nothing here was tuned to them.",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; offloadkit {meta['offloadkit_version']}; git commit {meta['git']['commit']}"
        + (" (tracked files modified)" if meta["git"]["tracked_files_modified"] else ""),
        f"- workload: {meta['workload']['label']} (prompt {meta['workload']['prompt_tokens']}, generate "
        f"{meta['workload']['gen_tokens']}, batch {meta['workload']['batch']}); policies: {', '.join(POLICIES)}",
        f"- cases: {len(ran)} simulated, {len(cases) - len(ran)} skipped; wall time {meta['wall_s']:.1f} s "
        f"(measured on {meta['machine']}, {meta['jobs']} process{'es' if meta['jobs'] > 1 else ''})",
        f"- {COST_MODEL_NOTE}",
        "- every plan is deterministic: scheinfer's repair moves are bounded by a count of estimates "
        "(`partition(polish_evals=3000)`, in layer-step estimates), not by a clock.",
        "",
        "## The paper's reported ranges (the paper's, not ours)",
        "",
        f"> {PAPER['quote']}",
        f"> — {PAPER['citation']}",
        "",
        "| phase | the paper's speedup range (over llama.cpp and Fiddler, as the abstract reports it) |",
        "|---|---|",
    ]
    lines += [f"| {ph} | {lo:.2f}–{hi:.2f}× |" for ph, (lo, hi) in PAPER["ranges"].items()]
    lines += ["", "## Profiles (catalog, simulated)", "",
              "| profile | GPU | GPU memory (usable) | PCIe link | CPU | DRAM GB/s (effective) | description |",
              "|---|---|---|---|---|---|---|"]
    for p in meta["profiles"].values():
        lines.append(f"| {p['name']} | {p['gpu']} | {p['gpu_memory_gib']:g} GiB ({p['gpu_usable_gib']:g} usable) | "
                     f"{p['link']} | {p['cpu']} ({p['cpu_cores']} cores) | {p['dram_gbps_effective']:.1f} | "
                     f"{p['description']} |")
    lines += ["", "## Routings", "",
              "- `uniform`, `zipf:1.2`: offloadkit's seeded synthetic routing (seed 0).",
              f"- `trace`: the demo model's recorded routing `{TRACE}` (4 MoE layers, 8 experts, top-2, 320 tokens: "
              "a 256-token prompt and 64 decode steps) tiled onto the model's layers with a seeded expert "
              "permutation per layer (offloadkit/plan/trace_tiling.py); the 640 tokens of the workload wrap "
              "around its 320. It matches only models with 8 experts and top-2, here Mixtral-8x7B; for the "
              "other MoE models there is **no matching trace** and that case is skipped (listed at the end).",
              "- `dense`: LLaMA-2 models have no experts, so no routing; each runs once per profile.", ""]
    # (a)
    lines += ["## (a) Tokens/s per policy, phase and case (simulated)", "",
              "`–`: the policy cannot run the case (it does not fit the GPU, or does not apply: Fiddler on a "
              "dense model); the reason is in the JSON rows. `bound`: what no placement beats on that profile.", ""]
    by = {(r["profile"], r["model"], r["routing"], r["policy"], r["phase"]): r for r in rows}
    for phase in PHASES:
        lines += [f"### {phase} tokens/s (simulated)", "",
                  "| profile | model | routing | " + " | ".join(POLICIES) + " | bound |",
                  "|---|---|---|" + "---|" * (len(POLICIES) + 1)]
        for c in ran:
            cmp_ = c.comparison
            assert cmp_ is not None
            cells = [by.get((c.profile, c.model, cmp_.routing, p, phase), {}).get("tokens_per_s") for p in POLICIES]
            b = cmp_.bounds.get(phase)
            lines.append(f"| {c.profile} | {c.model} | {cmp_.routing} | " + " | ".join(_f(v) for v in cells)
                         + f" | {_f(b.tokens_per_s if b else None)} |")
        lines.append("")
    # (b)
    lines += ["## (b) Speedup of scheinfer over llama.cpp and Fiddler (simulated), beside the paper's ranges", "",
              "Our min / median / max are over the simulated cases where both policies ran; the last column is "
              "the paper's own range (arXiv 2411.15715, abstract), which pools llama.cpp and Fiddler. The two are "
              "not like for like: the paper measured real llama.cpp and Fiddler on its own three machines; ours "
              "are offloadkit's models of their policies on these catalog profiles, in offloadkit's cost model.",
              "",
              "| over | phase | cases | simulated min | simulated median | simulated max | the paper's range |",
              "|---|---|---|---|---|---|---|"]
    for s in summary:
        lo, hi = s["paper_range"]
        lines.append(f"| {s['over']} | {s['phase']} | {s['n']} | {_f(s['min'], '.2f', '×')} | "
                     f"{_f(s['median'], '.2f', '×')} | {_f(s['max'], '.2f', '×')} | {lo:.2f}–{hi:.2f}× (paper) |")
    lines += ["", "### Per case (simulated)", "",
              "`scheinfer plan`: `partition` (the adaptive partition), `seeded from X` (the partition searched "
              "from baseline X's placement won), `whole model on GPU` (it fits: nothing to partition, so ties "
              "with baselines that also hold everything are expected).", "",
              "| profile | model | routing | scheinfer plan | "
              + " | ".join(f"× {o} {ph}" for o in BASELINES_OF_PAPER for ph in PHASES)
              + " |", "|---|---|---|---|" + "---|" * (len(BASELINES_OF_PAPER) * len(PHASES))]
    for c in ran:
        cmp_ = c.comparison
        assert cmp_ is not None
        cells = [cmp_.speedup(o, ph) for o in BASELINES_OF_PAPER for ph in PHASES]
        lines.append(f"| {c.profile} | {c.model} | {cmp_.routing} | {scheinfer_plan(c)} | "
                     + " | ".join(_f(v, '.2f', '×') for v in cells) + " |")
    # (c)
    lines += ["", "## (c) Fraction of the bound per policy and phase (simulated)", "",
              "The bound's time over the policy's (1 = as fast as any placement could be on the profile), over "
              "the cases the policy ran. The bound (offloadkit/plan/bounds.py) leaves out per-call overheads, "
              "attention and norms and pools each lane over the whole phase, so it is loosest where many small "
              "kernels dominate (Qwen1.5-MoE's 60 small experts; even the whole model on the GPU reaches only "
              "about half of it there).", "",
              "| policy | phase | cases | mean | min | max | case of the min |", "|---|---|---|---|---|---|---|"]
    for f in fractions:
        lines.append(f"| {f['policy']} | {f['phase']} | {f['n']} | {_f(f['mean'], '.3f')} | {_f(f['min'], '.3f')} | "
                     f"{_f(f['max'], '.3f')} | {f['min_case'] or '–'} |")
    # checks
    lines += ["", "## Cases where scheinfer is slower than another policy (simulated)", ""]
    if slower:
        lines += ["Each is a case where the optimiser left time on the table: scheinfer's plan space contains "
                  "every other policy's placement.", "",
                  "| profile | model | routing | slower than | phase | scheinfer tok/s | its tok/s | speedup |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s['profile']} | {s['model']} | {s['routing']} | {s['policy']} | {s['phase']} | "
                  f"{s['scheinfer_tokens_per_s']:.3f} | {s['other_tokens_per_s']:.3f} | {s['speedup']:.4f}× |"
                  for s in slower]
    else:
        lines.append("None: in every simulated case and phase scheinfer is at least as fast as every other policy "
                     "that ran.")
    lines += ["", "## Rows faster than their bound (simulated)", ""]
    if violations:
        lines += [f"- {r['profile']} · {r['model']} · {r['routing']} · {r['policy']} · {r['phase']}: fraction "
                  f"{r['fraction_of_bound']:.4f}" for r in violations]
    else:
        lines.append("None.")
    skipped: dict[tuple[str, str, str], list[str]] = {}
    for c in cases:
        if c.skipped:
            skipped.setdefault((c.model, c.routing, c.skipped), []).append(c.profile)
    lines += ["", "## Skipped cases", ""]
    lines += [f"- {model} · {routing}, on {', '.join(profs)}: {why}"
              for (model, routing, why), profs in skipped.items()] or ["None."]
    lines += ["", "## Slowest cases to plan and simulate (measured wall time on "
              f"{meta['machine']})", ""]
    lines += [f"- {c.key}: {c.wall_s:.2f} s" for c in sorted(ran, key=lambda c: -c.wall_s)[:5]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "data" / "results"),
                        help="folder for paper_experiment.json and .md (default: data/results)")
    parser.add_argument("--quick", action="store_true", help="a few cases only (for the tests)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cases simulated in parallel processes (default 1; the figures do not depend on it)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    cases = plan_cases(args.quick)
    specs = {m: load_spec(m) for m in dict.fromkeys(c.model for c in cases)}
    profiles = {p: load_profile(p) for p in dict.fromkeys(c.profile for c in cases)}
    bar = tqdm(total=len(cases), desc="paper experiment (simulated)", unit="case")
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run_case, c): i for i, c in enumerate(cases)}
            for f in as_completed(futures):
                cases[futures[f]] = f.result()
                bar.update()
    else:
        for case in cases:
            run_case(case)
            bar.update()
    bar.close()
    wall_s = time.perf_counter() - t_start

    rows = [r for c in cases if c.comparison is not None for r in c.comparison.rows()]
    summary, fractions = speedup_summary(cases), bound_fractions(rows)
    slower, violations = slower_cases(cases), bound_violations(rows)
    shown_argv = list(sys.argv[1:]) if argv is None else list(argv)
    meta = {
        "title": "The ScheInfer paper's experiment (arXiv 2411.15715), simulated by offloadkit",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "offloadkit_version": offloadkit.__version__,
        "git": git_commit(),
        "command": shlex.join(["python", "benchmarks/paper.py", *shown_argv]),
        "source": "simulated",
        "cost_model_note": COST_MODEL_NOTE,
        "quick": args.quick,
        "workload": {"label": WORKLOAD.label, "prompt_tokens": WORKLOAD.prompt_tokens,
                     "gen_tokens": WORKLOAD.gen_tokens, "batch": WORKLOAD.batch},
        "policies": list(POLICIES),
        "profiles": {name: profile_info(p) for name, p in profiles.items()},
        "models": sorted(specs),
        "trace": TRACE,
        "paper": {**PAPER, "ranges": {k: list(v) for k, v in PAPER["ranges"].items()},
                  "source": "the paper's own measurements, quoted from its abstract (not simulated by offloadkit)"},
        "wall_s": wall_s, "machine": machine_label(), "jobs": args.jobs,
        "wall_s_note": "measured wall time of this script on the machine named (planning and simulating)",
    }
    doc = {
        "metadata": meta,
        "cases": [{"profile": c.profile, "model": c.model,
                   "routing": c.comparison.routing if c.comparison else c.routing,
                   "status": "skipped" if c.skipped else "simulated", "reason": c.skipped,
                   "wall_s_measured": round(c.wall_s, 4)} for c in cases],
        "speedups": summary,
        "bound_fractions": fractions,
        "scheinfer_slower": slower,
        "faster_than_bound": violations,
        "rows": rows,
    }
    (out / "paper_experiment.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    (out / "paper_experiment.md").write_text(markdown(meta, cases, rows, summary, fractions, slower, violations))

    print("\nspeedup of scheinfer (simulated; min / median / max over cases) beside the paper's range "
          "(arXiv 2411.15715 abstract):")
    for s in summary:
        lo, hi = s["paper_range"]
        print(f"  over {s['over']:<17} {s['phase']:<8} n={s['n']:<3} {_f(s['min'])}× / {_f(s['median'])}× / "
              f"{_f(s['max'])}×   paper's: {lo:.2f}–{hi:.2f}×")
    if slower:
        print(f"\n{len(slower)} (case, policy, phase) where scheinfer is slower (simulated): see the markdown")
    print(f"\nwrote {out / 'paper_experiment.json'} and {out / 'paper_experiment.md'}")
    print(f"total time {wall_s:.1f} s for {len(cases)} cases (measured on {machine_label()}; figures simulated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
