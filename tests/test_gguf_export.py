"""GGUF export: every tensor and metadata value read back with gguf.GGUFReader and held against the source.

The expectations are written here independently of offloadkit/bench/gguf_export.py: the tensor names as
llama.cpp spells them (src/llama-arch.cpp), the Q/K row order of llama.cpp's RoPE computed index by index
(GGUF row h*D + 2*i + j holds HF row h*D + j*D/2 + i), the llama3 rope factors by the converter's formula.
Whether llama.cpp then computes the same function is tests/test_llamacpp.py's cross-check.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from offloadkit.bench import gguf_export
from offloadkit.bench.gguf_export import export_gguf, gguf_for, gguf_path
from offloadkit.bench.models import BENCH_MODELS
from offloadkit.errors import (
    CheckpointError,
    ConfigError,
    DTypeError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)
from offloadkit.model.checkpoint import open_checkpoint
from offloadkit.model.writer import make_config, write_checkpoint
from offloadkit.paths import demo_model_dir

TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, vocab=300)
ARCHS = {"mixtral": dict(experts=4, top_k=2), "llama": {}, "qwen2_moe": dict(experts=4, top_k=2)}
GGUF_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-src")
    return {arch: write_checkpoint(root / arch, make_config(arch, dtype="float32", **TINY, **kw), seed=7)
            for arch, kw in ARCHS.items()}


def read_tensors(path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (GGML type name, tensor in HF order [outer, ..., inner])."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        raw = np.ascontiguousarray(t.data)
        if t.tensor_type.name == "BF16":
            data = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
        else:
            data = torch.from_numpy(raw.copy())
        out[t.name] = (t.tensor_type.name, data.reshape(shape))
    return out


def fields(path: Path) -> dict[str, object]:
    return {name: f.contents() for name, f in gguf.GGUFReader(path).fields.items()}


def hf_rows(n_heads: int, head_dim: int) -> list[int]:
    """For each GGUF row of a Q or K projection, the HF row it holds (llama.cpp pairs adjacent dimensions)."""
    rows = []
    for h in range(n_heads):
        for i in range(head_dim // 2):
            for j in range(2):
                rows.append(h * head_dim + j * (head_dim // 2) + i)
    return rows


def expected(arch: str, ckpt) -> dict[str, tuple[torch.Tensor, bool]]:
    """GGUF name -> (the HF weight it must equal, whether it is kept in f32), for layer-level tensors."""
    spec = ckpt.spec
    rope_pairs = arch in ("mixtral", "llama")
    exp: dict[str, tuple[torch.Tensor, bool]] = {
        "token_embd.weight": (ckpt["model.embed_tokens.weight"], False),
        "output_norm.weight": (ckpt["model.norm.weight"], True),
        "output.weight": (ckpt["lm_head.weight"], False),
    }
    for b in range(spec.n_layers):
        p = f"model.layers.{b}"
        q, k = ckpt[f"{p}.self_attn.q_proj.weight"], ckpt[f"{p}.self_attn.k_proj.weight"]
        if rope_pairs:
            q, k = q[hf_rows(spec.n_heads, spec.head_dim)], k[hf_rows(spec.n_kv_heads, spec.head_dim)]
        exp.update({f"blk.{b}.attn_norm.weight": (ckpt[f"{p}.input_layernorm.weight"], True),
                    f"blk.{b}.attn_q.weight": (q, False), f"blk.{b}.attn_k.weight": (k, False),
                    f"blk.{b}.attn_v.weight": (ckpt[f"{p}.self_attn.v_proj.weight"], False),
                    f"blk.{b}.attn_output.weight": (ckpt[f"{p}.self_attn.o_proj.weight"], False),
                    f"blk.{b}.ffn_norm.weight": (ckpt[f"{p}.post_attention_layernorm.weight"], True)})
        if arch == "llama":
            for proj in ("gate", "up", "down"):
                exp[f"blk.{b}.ffn_{proj}.weight"] = (ckpt[f"{p}.mlp.{proj}_proj.weight"], False)
            continue
        moe = f"{p}.block_sparse_moe" if arch == "mixtral" else f"{p}.mlp"
        names = {"gate": "w1", "up": "w3", "down": "w2"} if arch == "mixtral" else \
            {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        exp[f"blk.{b}.ffn_gate_inp.weight"] = (ckpt[f"{moe}.gate.weight"], True)
        for proj, hf in names.items():
            stacked = torch.stack([ckpt[f"{moe}.experts.{e}.{hf}.weight"] for e in range(spec.n_experts)])
            exp[f"blk.{b}.ffn_{proj}_exps.weight"] = (stacked, False)
        if arch == "qwen2_moe":
            for short in ("q", "k", "v"):
                exp[f"blk.{b}.attn_{short}.bias"] = (ckpt[f"{p}.self_attn.{short}_proj.bias"], True)
            for proj in ("gate", "up", "down"):
                exp[f"blk.{b}.ffn_{proj}_shexp.weight"] = (ckpt[f"{moe}.shared_expert.{proj}_proj.weight"], False)
            exp[f"blk.{b}.ffn_gate_inp_shexp.weight"] = (ckpt[f"{moe}.shared_expert_gate.weight"].reshape(-1), True)
    return exp


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_tensors_equal_the_source(models: dict[str, Path], tmp_path: Path, arch: str, dtype: str) -> None:
    out = export_gguf(models[arch], tmp_path / "m.gguf", dtype, progress=False)
    got = read_tensors(out)
    with open_checkpoint(models[arch]) as ckpt:
        exp = expected(arch, ckpt)
        assert set(got) == set(exp)
        for name, (want, keep_f32) in exp.items():
            kind, data = got[name]
            assert kind == ("F32" if keep_f32 else GGUF_DTYPE[dtype]), name
            want = want.to(torch.float32 if keep_f32 else TORCH[dtype])
            assert data.shape == want.shape, name
            assert torch.equal(data, want), name


def test_bf16_checkpoint_keeps_its_bits(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "m", make_config("mixtral", dtype="bfloat16", **TINY), seed=1)
    got = read_tensors(export_gguf(src, tmp_path / "m.gguf", "bf16", progress=False))
    with open_checkpoint(src) as ckpt:
        assert torch.equal(got["blk.1.attn_v.weight"][1].view(torch.int16),
                           ckpt["model.layers.1.self_attn.v_proj.weight"].view(torch.int16))
        router = ckpt["model.layers.0.block_sparse_moe.gate.weight"]
        assert torch.equal(got["blk.0.ffn_gate_inp.weight"][1], router.float())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_metadata_matches_the_config(models: dict[str, Path], tmp_path: Path, arch: str) -> None:
    cfg = json.loads((models[arch] / "config.json").read_text())
    f = fields(export_gguf(models[arch], tmp_path / "m.gguf", "bf16", progress=False))
    a = {"mixtral": "llama", "llama": "llama", "qwen2_moe": "qwen2moe"}[arch]
    assert f["general.architecture"] == a
    assert f["general.file_type"] == 32  # MOSTLY_BF16
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    want = {"block_count": cfg["num_hidden_layers"], "embedding_length": cfg["hidden_size"],
            "feed_forward_length": cfg["intermediate_size"], "attention.head_count": cfg["num_attention_heads"],
            "attention.head_count_kv": cfg["num_key_value_heads"], "context_length": cfg["max_position_embeddings"],
            "rope.dimension_count": head_dim, "attention.key_length": head_dim, "vocab_size": cfg["vocab_size"]}
    for key, value in want.items():
        assert f[f"{a}.{key}"] == value, key
    assert f[f"{a}.rope.freq_base"] == pytest.approx(cfg["rope_theta"])
    assert f[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    if arch != "llama":
        assert f[f"{a}.expert_count"] == cfg.get("num_local_experts", cfg.get("num_experts"))
        assert f[f"{a}.expert_used_count"] == cfg["num_experts_per_tok"]
    else:
        assert f"{a}.expert_count" not in f
    if arch == "qwen2_moe":
        assert f[f"{a}.expert_feed_forward_length"] == cfg["moe_intermediate_size"]
        assert f[f"{a}.expert_shared_feed_forward_length"] == cfg["shared_expert_intermediate_size"]


def test_byte_level_tokenizer_metadata(models: dict[str, Path], tmp_path: Path) -> None:
    f = fields(export_gguf(models["mixtral"], tmp_path / "m.gguf", "f32", progress=False))
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == TINY["vocab"]
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [3, 3, 3]  # CONTROL
    assert tokens[3 + ord("A")] == "A" and tokens[3 + ord(" ")] == "\u0120"  # GPT-2's byte characters
    assert types[3:259] == [1] * 256  # NORMAL
    assert tokens[259] == "<|reserved_259|>" and types[259] == 3
    assert f["tokenizer.ggml.merges"] == ["<unk> <unk>"]  # never applies: BPE starts from single characters
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.ggml.add_bos_token"] is True


def test_trained_tokenizer_keeps_its_merges(tmp_path: Path) -> None:
    tok = json.loads((demo_model_dir() / "tokenizer.json").read_text())
    f = fields(export_gguf(demo_model_dir(), tmp_path / "demo.gguf", "bf16", progress=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    assert f["tokenizer.ggml.merges"] == merges
    vocab = {i: t for t, i in tok["model"]["vocab"].items()}
    assert [f["tokenizer.ggml.tokens"][i] for i in (5, 300, 2047)] == [vocab[5], vocab[300], vocab[2047]]


def test_tied_embeddings(tmp_path: Path) -> None:
    llama = write_checkpoint(tmp_path / "l", make_config("llama", dtype="float32", tie_word_embeddings=True, **TINY))
    assert "output.weight" not in read_tensors(export_gguf(llama, tmp_path / "l.gguf", "f32", progress=False))
    qwen = write_checkpoint(tmp_path / "q", make_config("qwen2_moe", dtype="float32", tie_word_embeddings=True,
                                                        **TINY, experts=4))
    got = read_tensors(export_gguf(qwen, tmp_path / "q.gguf", "f32", progress=False))  # qwen2moe requires output
    assert torch.equal(got["output.weight"][1], got["token_embd.weight"][1])


def test_llama3_rope_factors(tmp_path: Path) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    src = write_checkpoint(tmp_path / "m", make_config("llama", dtype="float32", rope_parameters=rope, **TINY))
    got = read_tensors(export_gguf(src, tmp_path / "m.gguf", "f32", progress=False))["rope_freqs.weight"][1]
    dim = TINY["hidden"] // TINY["heads"]
    want = []
    for k in range(0, dim, 2):  # conversion/llama.py's formula, written out
        wavelen = 2 * math.pi * 10000.0 ** (k / dim)
        if wavelen < 64 / 4.0:
            want.append(1.0)
        elif wavelen > 64 / 1.0:
            want.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert got.tolist() == pytest.approx(want, rel=1e-5)


# ---- refusals --------------------------------------------------------------------------------------


def test_refuses_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        export_gguf(tmp_path / "nowhere", tmp_path / "x.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a model checkpoint"):
        export_gguf(tmp_path / "empty", tmp_path / "x.gguf")
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="is not a model checkpoint"):
        export_gguf(tmp_path / "file.txt", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_refuses_phimoe_by_name(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "p", make_config("phimoe", dtype="float32", **TINY))
    with pytest.raises(UnsupportedArchitectureError, match="phimoe.*LayerNorm.*sparsemixer"):
        export_gguf(src, tmp_path / "p.gguf")
    assert not (tmp_path / "p.gguf").exists()


@pytest.mark.parametrize(("overrides", "match"), [({"norm_topk_prob": True}, "norm_topk_prob"),
                                                  ({"mlp_only_layers": [0]}, "dense layers")])
def test_refuses_qwen_configs_llamacpp_computes_differently(tmp_path: Path, overrides: dict, match: str) -> None:
    src = write_checkpoint(tmp_path / "q", make_config("qwen2_moe", dtype="float32", **TINY, experts=4, **overrides))
    with pytest.raises(UnsupportedArchitectureError, match=match):
        export_gguf(src, tmp_path / "q.gguf")


def test_refuses_sliding_window_and_bad_dtype(models: dict[str, Path], tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "w", make_config("mixtral", dtype="float32", sliding_window=16, **TINY))
    with pytest.raises(ConfigError, match="sliding window"):
        export_gguf(src, tmp_path / "w.gguf")
    with pytest.raises(DTypeError, match="int8"):
        export_gguf(models["llama"], tmp_path / "x.gguf", "int8")


def test_refuses_a_tokenizer_llamacpp_would_split_differently(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"\u2581{c}": 3 + i for i, c in enumerate("abcdefgh")}}
    sp = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    src = write_checkpoint(tmp_path / "m", make_config("mixtral", dtype="float32", **TINY), tokenizer=sp)
    with pytest.raises(CheckpointError, match="not a GPT-2 style byte-level BPE.*byte_tokenizer=True"):
        export_gguf(src, tmp_path / "m.gguf")
    f = fields(export_gguf(src, tmp_path / "m.gguf", "f32", byte_tokenizer=True, progress=False))
    assert f["tokenizer.ggml.tokens"][3 + ord("a")] == "a"


def test_an_interrupted_export_leaves_no_file(models: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_export, "rope_permute", broken)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(models["mixtral"], tmp_path / "m.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_gguf_path_exports_a_bench_model_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOADKIT_CACHE", str(tmp_path))
    monkeypatch.setitem(BENCH_MODELS, "bench-test-tiny", ("mixtral", dict(TINY)))
    first = gguf_path("bench-test-tiny", "f32", progress=False)
    assert first == tmp_path / "models" / "bench-test-tiny-float32.gguf"
    stamp = first.stat().st_mtime_ns
    assert gguf_path("bench-test-tiny", "float32", progress=False) == first
    assert first.stat().st_mtime_ns == stamp  # reused, not written again
    assert fields(first)["general.file_type"] == 0  # ALL_F32
    later = first.stat().st_mtime + 10
    os.utime(first.parent / "bench-test-tiny-float32" / "config.json", (later, later))  # newer than its export
    assert gguf_path("bench-test-tiny", "f32", progress=False) == first
    assert first.stat().st_mtime_ns > stamp  # exported again


def test_gguf_for_any_folder_caches_by_path(models: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOADKIT_CACHE", str(tmp_path))
    first = gguf_for(models["llama"], "f16", progress=False)
    assert first.parent == tmp_path / "gguf"
    assert first.name.startswith("llama-") and first.name.endswith("-float16.gguf")
    assert gguf_for(models["llama"], "float16", progress=False) == first
    assert gguf_for(models["mixtral"], "f16", progress=False) != first


# ---- the command line --------------------------------------------------------------------------------


def test_cli_export_gguf(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    from offloadkit.cli import main

    out = tmp_path / "m.gguf"
    assert main(["bench", "export-gguf", "--model", str(models["llama"]), "--dtype", "f16", "--out", str(out)]) == 0
    assert fields(out)["general.file_type"] == 1  # MOSTLY_F16
    assert str(out) in capsys.readouterr().out
    monkeypatch.setenv("OFFLOADKIT_CACHE", str(tmp_path / "cache"))
    assert main(["bench", "export-gguf", "--model", "demo", "--dtype", "bf16"]) == 0
    assert len(list((tmp_path / "cache" / "gguf").glob("demo-mixtral-*-bfloat16.gguf"))) == 1
    capsys.readouterr()
    assert main(["bench", "export-gguf", "--model", str(tmp_path / "nowhere")]) == 2
    assert "offloadkit: error: no model named" in capsys.readouterr().err
    phimoe = write_checkpoint(tmp_path / "p", make_config("phimoe", dtype="float32", **TINY))
    assert main(["bench", "export-gguf", "--model", str(phimoe), "--out", str(tmp_path / "p.gguf")]) == 2
    assert "architecture 'phimoe' is not exported" in capsys.readouterr().err
