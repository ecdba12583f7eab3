"""offloadkit.course.engine_tour: the calls notebooks 00 and 08 make, on a small random model (no probe)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from offloadkit.course import engine_tour as et
from offloadkit.errors import ProfileError
from offloadkit.hardware.catalog import load_profile
from offloadkit.hardware.whatif import what_if
from offloadkit.model.spec import ModelSpec
from offloadkit.model.writer import make_config, random_weights


@pytest.fixture(scope="module")
def small():
    spec = ModelSpec.from_config(make_config("mixtral", layers=2, hidden=64, experts=4, vocab=128, dtype="float32"),
                                 "tour-mixtral")
    return spec, random_weights(spec, seed=0)


@pytest.fixture(scope="module")
def cpu_only():
    base = load_profile("rtx4090-desktop")
    return replace(base, name="measured-test", gpu=None, link=None, description="a CPU-only test machine")


def test_hybrid_profile_lends_a_catalog_gpu_and_says_so(cpu_only):
    p = et.hybrid_profile(cpu_only, "rtx4090-desktop", gpu_gib=0.004)
    assert p.gpu is not None and p.link is not None
    assert p.gpu.usable_memory_gib == pytest.approx(0.004)
    assert p.name.startswith("measured-test + ") and "(catalog)" in p.name and "what-if: 0.004 GiB GPU" in p.name
    assert p.cpu == cpu_only.cpu
    gpu_sources = [v for k, v in p.sources.items() if k.startswith(("gpu.", "link."))]
    assert gpu_sources and all("rtx4090-desktop (catalog)" in v or "what-if" in v for v in gpu_sources)
    assert et.hybrid_profile(cpu_only).gpu.usable_memory_gib == load_profile("rtx4090-desktop").gpu.usable_memory_gib


def test_hybrid_profile_refuses_a_machine_with_its_own_gpu_and_a_lender_without_one(cpu_only):
    with pytest.raises(ProfileError, match="its own GPU"):
        et.hybrid_profile(load_profile("rtx4090-desktop"))
    with pytest.raises(ProfileError, match="no GPU to lend"):
        et.hybrid_profile(cpu_only, cpu_only)


@pytest.fixture(scope="module")
def runs(small):
    spec, weights = small
    profile = what_if(load_profile("rtx4090-desktop"), gpu_gib=0.0005)
    prompt = torch.randint(0, spec.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))
    return {policy: et.run_hybrid(spec, weights, profile, prompt, 3, policy=policy, device="loopback")
            for policy in et.TOUR_POLICIES}


def test_run_hybrid_gives_the_reference_tokens_a_measured_and_a_simulated_timeline(runs):
    for policy, r in runs.items():
        assert r.tokens == r.reference_tokens == r.simulated_tokens, policy
        assert r.measured.timeline.source == "measured" and r.simulated.timeline.source == "simulated"
        m, s = r.step(0)
        assert min(x.start_s for x in m.records) == pytest.approx(0, abs=1e-9)
        assert sorted(x.name for x in m.records) == sorted(x.name for x in s.records)
        assert r.device_kind == "loopback" and r.measured_s > 0 and r.simulated_s > 0


def test_speedup_rows_are_labelled_measured_and_simulated(runs):
    rows = et.rows_from_runs(runs, "tour-mixtral")
    assert {r.source for r in rows} == {"measured", "simulated"}
    assert {r.baseline for r in rows} == {"llamacpp", "fiddler", "ktransformers"}
    assert all(r.speedup and r.speedup > 0 for r in rows)
    assert all("CPU threads" in r.where for r in rows if r.source == "measured")
    table = et.speedup_table(rows)
    assert table.count("measured ") == 6 and table.count("simulated ") == 6
    fig = et.speedup_figure(rows)
    titles = [a.text for a in fig.layout.annotations]
    assert any("<b>measured</b>" in t for t in titles) and any("<b>simulated</b>" in t for t in titles)


def test_engine_parts_name_every_chapter_and_each_module_imports(small):
    from offloadkit.plan.plans import Workload
    from offloadkit.plan.policies import make_plan
    from offloadkit.runtime.engine import HybridEngine

    assert [p.chapter[:2] for p in et.ENGINE_PARTS] == ["03", "04", "05", "06", "07", "08"]
    spec, weights = small
    profile = what_if(load_profile("rtx4090-desktop"), gpu_gib=0.0005)
    w = Workload(4, 2)
    plan = make_plan("scheinfer", spec, profile, w)
    with HybridEngine(spec, weights, plan, profile, et.open_device(profile, "loopback"), workload=w) as engine:
        found = et.engine_parts(engine)
    assert [p for p, _ in found] == list(et.ENGINE_PARTS)
    for part, what in found:
        assert part.load().__name__ == part.module and what
    assert "twins" in found[0][1]


def test_prompt_sweep_and_explorer(small):
    spec, _ = small
    profile = what_if(load_profile("rtx4090-desktop"), gpu_gib=0.0005)
    ex = et.PromptExplorer(spec, what_if(profile, gpu_gib=0.004), (16, 64, 256), prompt=64, gen=8)
    assert [p.prompt for p in ex.points] == [16, 64, 256] and ex.values() == {"prompt": 64}
    assert "simulated" in ex.sweep.layout.title.text and ex.sweep.layout.xaxis.type == "log"
    ex.set(prompt=256)
    assert ex.values() == {"prompt": 256}
    assert [s.x0 for s in ex.sweep.layout.shapes if s.type == "line"] == [256, 256]
    assert "256 tokens" in ex.timeline.layout.title.text and "simulated" in ex.timeline.layout.title.text
    assert "simulated" in ex.status.value
