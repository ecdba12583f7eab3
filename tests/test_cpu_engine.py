"""The real CPU engine: the reference forward's greedy tokens, and a measured Timeline of every layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offloadkit.cli import main
from offloadkit.errors import OffloadkitError
from offloadkit.hardware.machine import cpu_model
from offloadkit.model.checkpoint import open_checkpoint
from offloadkit.model.generate import generate_ids
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.writer import make_config, write_checkpoint
from offloadkit.paths import demo_model_dir
from offloadkit.runtime.cpu_engine import CpuEngine
from offloadkit.runtime.engines import ENGINES, load_engine
from offloadkit.runtime.timeline import Timeline

ARCHS = ("mixtral", "llama", "qwen2_moe", "phimoe")


def greedy(model, prompt: list[int], n: int) -> list[int]:
    return list(generate_ids(model, prompt, n))


def check_timeline(tl: Timeline, engine: CpuEngine, steps: int) -> None:
    spec = engine.spec
    assert tl.source == "measured" and "threads" in tl.machine and tl.lanes() == ["cpu"]
    assert tl.steps() == list(range(steps))
    for step in range(steps):
        for layer in range(spec.n_layers):
            kinds = [r.kind for r in tl.select(step=step, layer=layer)]
            want = ["attn_norm", "attn_qkv", "attention", "attn_o", "ffn_norm"]  # the simulator's task kinds
            want += ["router", "expert"] if spec.is_moe_layer(layer) else ["ffn"]
            assert all(k in kinds for k in want), (step, layer, kinds)
            if spec.is_moe_layer(layer):
                assert kinds.count("expert") >= spec.top_k or step == 0
        names = {r.name for r in tl.select(step=step) if r.layer is None}
        assert {"embed", "final_norm", "lm_head"} <= names
    records = sorted(tl, key=lambda r: r.start_s)
    assert all(a.end_s <= b.start_s + 1e-9 for a, b in zip(records, records[1:], strict=False))  # one lane
    assert all(r.bytes_ > 0 for r in tl if r.kind in ("attn_qkv", "attention", "attn_o", "expert", "ffn", "lm_head"))


@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_engine_matches_the_reference_on_random_models(arch: str, tmp_path: Path) -> None:
    dtype = "float16" if arch == "llama" else "bfloat16"
    folder = write_checkpoint(tmp_path / arch, make_config(arch, layers=2, hidden=64, dtype=dtype), seed=3)
    ckpt = open_checkpoint(folder)
    ref, eng = ReferenceModel(ckpt.spec, ckpt), CpuEngine(ckpt.spec, ckpt)
    # llama and qwen2_moe get a prompt long enough for the prefill kernels (dense FFN, shared expert, projections)
    length = 70 if arch in ("llama", "qwen2_moe") else 9
    prompt = torch.randint(3, ckpt.spec.vocab_size, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    assert greedy(eng, prompt, 6) == greedy(ref, prompt, 6)
    check_timeline(eng.timeline, eng, steps=6)
    ids = torch.tensor([prompt])
    a, b = ref.forward(ids), eng.forward(ids)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-4


def test_cpu_engine_on_the_demo_model() -> None:
    if not (demo_model_dir() / "model.safetensors").exists():
        pytest.skip("the demo checkpoint is not there yet (make demo-model trains it)")
    eng, tok = load_engine("cpu", "demo")
    ref, _ = load_engine("reference", "demo")
    for prompt in ("The \"for\" statement is used to", "A class definition"):
        ids = tok.encode(prompt)
        assert greedy(eng, ids, 12) == greedy(ref, ids, 12)
    check_timeline(eng.timeline, eng, steps=12)


def test_generate_with_the_cpu_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = write_checkpoint(tmp_path / "m", make_config("mixtral"), seed=0)
    assert main(["generate", "--model", str(out), "--prompt", "hi", "--max-new-tokens", "5", "--engine", "cpu"]) == 0
    cpu_text = capsys.readouterr().out
    assert "engine: cpu" in cpu_text and f"measured on {cpu_model()}" in cpu_text
    assert main(["generate", "--model", str(out), "--prompt", "hi", "--max-new-tokens", "5"]) == 0
    ref_text = capsys.readouterr().out
    assert cpu_text.split("\n[measured")[0] == ref_text.split("\n[measured")[0]
    assert ENGINES == ("reference", "cpu")
    with pytest.raises(OffloadkitError, match="unknown engine 'gpu'; choose one of reference, cpu"):
        load_engine("gpu", out)


# ---- the decode path of issue 10: one compiled call per layer, logits of the last position only --------


def task_keys(tl: Timeline) -> list[tuple]:
    return [(r.name, r.kind, r.layer, r.step) for r in tl]


@pytest.mark.parametrize(("arch", "dtype"), [("mixtral", "bfloat16"), ("qwen2_moe", "bfloat16"), ("llama", "float16")])
def test_one_call_per_step_per_layer_and_the_separate_path_agree(arch: str, dtype: str, tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / arch, make_config(arch, layers=2, hidden=64, dtype=dtype), seed=5)
    ckpt = open_checkpoint(folder)
    ref = ReferenceModel(ckpt.spec, ckpt)
    step_, layer_, separate = (CpuEngine(ckpt.spec, ckpt) for _ in range(3))
    if step_._clock is None:
        pytest.skip("this CPU has no steady cycle counter: the engine times every task from Python")
    layer_.whole_step = False  # one decode_layer call per layer
    separate._clock = None  # before its first forward: every layer takes the separate path
    engines = {"whole step": step_, "per layer": layer_, "separate": separate}
    ids = torch.randint(3, ckpt.spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    caches = {name: m.new_cache(2, 16) for name, m in engines.items()}
    ref_cache = ref.new_cache(2, 16)
    for step in range(4):  # a 9-token prompt (grouped by expert), then 3 steps of a batch of 2
        part = ids if step == 0 else ids[:, step - 1:step]
        want = ref.forward(part, ref_cache)
        for name, eng in engines.items():
            got = eng.forward(part, caches[name])
            assert float((got - want).abs().max() / want.abs().max()) < 1e-4, (name, step)
    assert step_._step_lists and layer_._step_lists is None and separate._step_lists is False
    assert all(layer.fused is None for layer in separate._layers.values())
    keys = task_keys(separate.timeline)
    assert task_keys(step_.timeline) == keys and task_keys(layer_.timeline) == keys
    check_timeline(step_.timeline, step_, steps=4)
    check_timeline(layer_.timeline, layer_, steps=4)
    prompt = ids[0].tolist()
    want_tokens = greedy(ref, prompt, 5)
    assert all(greedy(eng, prompt, 5) == want_tokens for eng in engines.values())


def test_logits_of_the_last_position_only(tmp_path: Path) -> None:
    ckpt = open_checkpoint(write_checkpoint(tmp_path / "m", make_config("mixtral", layers=2, hidden=64), seed=1))
    ref, eng = ReferenceModel(ckpt.spec, ckpt), CpuEngine(ckpt.spec, ckpt)
    ids = torch.randint(3, ckpt.spec.vocab_size, (2, 70), generator=torch.Generator().manual_seed(3))
    want = ref.forward(ids)[:, -1:]
    got = eng.forward(ids, eng.new_cache(2, 80), logits="last")
    assert got.shape == (2, 1, ckpt.spec.vocab_size)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    head = [r for r in eng.timeline if r.kind == "lm_head"]
    assert len(head) == 1 and head[0].flops == 2 * 2 * ckpt.spec.hidden_size * ckpt.spec.vocab_size
    assert eng.forward(ids).shape == (2, 70, ckpt.spec.vocab_size)  # the default: every position
    with pytest.raises(OffloadkitError, match="logits must be one of all, last"):
        eng.forward(ids, logits="first")


def test_generation_asks_the_cpu_engine_for_the_last_logits_only(tmp_path: Path) -> None:
    ckpt = open_checkpoint(write_checkpoint(tmp_path / "m", make_config("mixtral", layers=1, hidden=64), seed=1))
    eng = CpuEngine(ckpt.spec, ckpt)
    shapes = []
    forward = eng.forward

    def spy(ids, cache=None, **kw):
        out = forward(ids, cache, **kw)
        shapes.append((ids.shape[1], kw.get("logits"), out.shape[1]))
        return out

    eng.forward = spy
    assert len(greedy(eng, list(range(3, 15)), 3)) == 3
    assert shapes == [(12, "last", 1), (1, "last", 1), (1, "last", 1)]


def test_the_engine_runs_on_the_threads_it_is_given(tmp_path: Path) -> None:
    import numba

    ckpt = open_checkpoint(write_checkpoint(tmp_path / "m", make_config("mixtral", layers=2, hidden=256), seed=4))
    eng, ref = CpuEngine(ckpt.spec, ckpt), ReferenceModel(ckpt.spec, ckpt)
    prompt = list(range(5, 20))
    before = numba.get_num_threads()
    tokens = {}
    try:
        for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(n)
            tokens[n] = greedy(eng, prompt, 6)
            assert eng.timeline.machine.endswith(f", {n} threads")
    finally:
        numba.set_num_threads(before)
    assert all(t == greedy(ref, prompt, 6) for t in tokens.values())
