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
