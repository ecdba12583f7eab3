"""The committed demo checkpoint: a small trained Mixtral that writes English and routes non-uniformly."""

import io
import json
import pydoc_data.topics
import re
import time

import pytest
import torch

from offloadkit.demo import run_demo
from offloadkit.hardware.machine import cpu_model
from offloadkit.model.checkpoint import open_checkpoint
from offloadkit.model.expert_usage import expert_counts, normalized_entropy
from offloadkit.paths import demo_model_dir
from offloadkit.runtime.engines import load_engine

WORD = re.compile(r"[A-Za-z]{2,}")


@pytest.fixture(scope="module")
def demo():
    return load_engine("reference", "demo")


def test_demo_checkpoint_is_a_small_bf16_mixtral():
    folder = demo_model_dir()
    ckpt = open_checkpoint(folder)
    spec = ckpt.spec
    assert (spec.arch, spec.n_experts, spec.top_k) == ("mixtral", 8, 2)
    assert ckpt.dtype == "bfloat16"
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert size <= 21 * 2**20, f"demo folder is {size / 2**20:.1f} MiB"
    log = json.loads((folder / "training_log.json").read_text())
    assert log["wall_s"] < 30 * 60, "training must finish within 30 minutes on 2 cores"
    assert (folder / "train.py").is_file() and (folder / "tokenizer.json").is_file()


def test_demo_writes_recognizable_english(demo):
    model, tok = demo
    vocabulary = {w.lower() for text in pydoc_data.topics.topics.values() for w in WORD.findall(text)}
    for prompt in ('The "return" statement', "A module is"):
        ids = model.greedy(torch.tensor([tok.encode(prompt)]), 40)[0].tolist()
        words = WORD.findall(tok.decode(ids))
        assert len(words) >= 10, f"too few words in {tok.decode(ids)!r}"
        known = sum(w.lower() in vocabulary for w in words) / len(words)
        assert known >= 0.9, f"only {known:.0%} of the words are English words of the corpus: {words}"


def test_demo_routers_learned_non_uniform_choices(demo):
    model, tok = demo
    text = "The \"for\" statement is used to iterate over the elements of a sequence. " * 4
    counts = expert_counts(model, tok.encode(text))
    assert len(counts) == model.spec.n_layers
    entropies = [normalized_entropy(c) for c in counts.values()]
    assert min(entropies) < 0.95, f"routing is close to uniform in every layer: {entropies}"
    # a trained router is skewed: in some layer one expert takes twice its uniform share
    assert any(c.max() / c.sum() >= 2 / model.spec.n_experts for c in counts.values())
    assert all((c > 0).sum() >= 3 for c in counts.values()), "routing collapsed onto one or two experts"


def test_run_demo_prints_breakdown_text_and_routing():
    out = io.StringIO()
    run_demo(max_new_tokens=8, out=out)
    text = out.getvalue()
    assert "mixtral-8x7b" in text and "routed experts" in text
    assert "demo-mixtral" in text and f"measured on {cpu_model()}" in text
    assert "normalized entropy" in text
    assert "simulated on rtx4090-desktop" in text and "pp512+tg128" in text
    table = text.split("x overall")[1].split("x phase:")[0]
    for policy in ("scheinfer", "llamacpp", "fiddler", "ktransformers"):  # ScheInfer beside the three baselines
        assert re.search(rf"^{policy} ", table, re.MULTILINE), policy
    assert re.search(r"^llamacpp +llamacpp \(ngl:\d+\)", table, re.MULTILINE)
    assert "What each plan keeps resident on the GPU" in text


def test_demo_simulation_is_compare_policies_and_quick():
    from offloadkit.demo import DEMO_POLICIES, run_simulation
    from offloadkit.hardware.catalog import load_profile
    from offloadkit.model.zoo import load_spec
    from offloadkit.plan.plans import Workload
    from offloadkit.runtime.compare import compare_policies

    spec = load_spec("mixtral-8x7b")
    out = io.StringIO()
    start = time.perf_counter()
    run_simulation(spec, out)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"the demo's simulated section took {elapsed:.1f} s"
    c = compare_policies(spec, load_profile("rtx4090-desktop"), Workload(512, 128), "zipf:1.2",
                         policies=DEMO_POLICIES)
    for name in ("llamacpp", "fiddler", "ktransformers"):  # deterministic plans: the same figures as printed
        run = c.runs[name]
        line = next(x for x in out.getvalue().splitlines() if x.startswith(f"{name} "))
        assert f"{c.tokens('decode') / run.seconds('decode'):.2f}" in line, name
