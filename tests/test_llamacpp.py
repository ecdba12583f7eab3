"""The llama.cpp runner: llama-bench's JSON, the errors a user meets, and the cross-check of correctness.

``tests/data/llama_bench_tiny_mixtral.json`` is real llama-bench output (llama.cpp 0c1e57098, built by
``make llamacpp`` on a 2-core AMD EPYC, measured), captured once with

    llama-bench -m tiny.gguf -p 16 -n 4 -t 1 -r 3 -ngl 0 -o json

where tiny.gguf is ``export_gguf`` (f32) of ``make_config("mixtral", layers=2, hidden=64, heads=4,
kv_heads=2, vocab=512, experts=4, top_k=2)``. Fake binaries (shell scripts in a folder named by
``$OFFLOADKIT_LLAMACPP``) stand in for llama.cpp where a test is about offloadkit's side.

The cross-check runs where llama.cpp is built (skipped with the reason elsewhere): on small f32 models
the greedy tokens llama.cpp computes from the exported GGUF equal those of offloadkit's reference
forward. llama.cpp keeps its KV cache in f16 and sums in another order, so the comparison stops at the
first step whose reference top-2 logit margin is below ``MARGIN`` (a near tie either engine may break
either way), and at least ``MIN_COMPARED`` tokens must be compared.
"""

from __future__ import annotations

import json
import os
import stat
import statistics
from pathlib import Path

import pytest
import torch

from offloadkit.bench import llamacpp_build
from offloadkit.bench.gguf_export import export_gguf
from offloadkit.bench.llamacpp import (
    find_binary,
    find_llamacpp,
    greedy_text,
    greedy_tokens,
    is_built,
    parse_llama_bench_json,
    run_llama_bench,
    split_pieces,
    token_pieces,
)
from offloadkit.bench.llamacpp_build import BUILD_STAMP, SOURCE_STAMP
from offloadkit.errors import BenchError
from offloadkit.model.checkpoint import open_checkpoint
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.spec import ModelSpec
from offloadkit.model.tokenizer import load_tokenizer
from offloadkit.model.writer import make_config, write_checkpoint
from offloadkit.paths import demo_model_dir

DATA = Path(__file__).parent / "data"
CAPTURED = DATA / "llama_bench_tiny_mixtral.json"
CAPTURED_CONFIG = dict(layers=2, hidden=64, heads=4, kv_heads=2, vocab=512, experts=4, top_k=2)
MARGIN = 1e-3
MIN_COMPARED = 16
PROMPT = "Hello world, this is"


def fake_bin(folder: Path, name: str, script: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# ---- llama-bench's JSON ------------------------------------------------------------------------------


def test_parses_captured_llama_bench_json() -> None:
    pp, tg = parse_llama_bench_json(CAPTURED.read_text())
    assert (pp.test, pp.n_prompt, pp.n_gen, tg.test, tg.n_prompt, tg.n_gen) == ("pp16", 16, 0, "tg4", 0, 4)
    for r in (pp, tg):
        assert r.n_threads == 1 and r.type_k == r.type_v == "f16" and r.build_commit == "0c1e57098"
        assert len(r.samples_ts) == len(r.samples_ns) == 3
        n_tokens = r.n_prompt + r.n_gen  # llama-bench's rate: tokens of the test / seconds of one repetition
        assert r.samples_ts == pytest.approx([n_tokens * 1e9 / ns for ns in r.samples_ns], rel=1e-5)
        assert r.avg_ts == pytest.approx(statistics.mean(r.samples_ts), rel=1e-5)
        assert r.stddev_ts == pytest.approx(statistics.stdev(r.samples_ts), rel=1e-3)
    # llama.cpp counted the parameters of offloadkit's export: the same model, every tensor, f32
    params = ModelSpec.from_config(make_config("mixtral", **CAPTURED_CONFIG)).total_params
    assert pp.model_n_params == params and pp.model_size == 4 * params


def test_parse_errors_are_bench_errors() -> None:
    with pytest.raises(BenchError, match="not JSON"):
        parse_llama_bench_json("llama-bench: error: failed to load model\n")
    broken = json.loads(CAPTURED.read_text())
    del broken[0]["avg_ts"]
    with pytest.raises(BenchError, match="avg_ts"):
        parse_llama_bench_json(json.dumps(broken))


# ---- finding and running the binaries ----------------------------------------------------------------


def test_missing_build_says_how_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOADKIT_LLAMACPP", str(tmp_path))
    assert not is_built()
    with pytest.raises(BenchError, match=r"llama.cpp is not built here: run `make bench` \(or `make llamacpp`\)"):
        find_binary("llama-bench")
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(BenchError, match="make bench"):
        run_llama_bench(tmp_path / "m.gguf")


def test_runs_llama_bench_with_its_protocol_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bins = tmp_path / "bin"
    fake_bin(bins, "llama-bench", f'echo "$@" > "{bins}/argv.txt"\ncat "{CAPTURED}"\n')
    monkeypatch.setenv("OFFLOADKIT_LLAMACPP", str(bins))
    (tmp_path / "m.gguf").write_bytes(b"")
    records = run_llama_bench(tmp_path / "m.gguf", n_prompt=512, n_gen=[128], threads=[1, 2], repetitions=5)
    assert [r.test for r in records] == ["pp16", "tg4"]  # what the fake printed
    argv = (bins / "argv.txt").read_text().split()
    assert argv == ["-m", str(tmp_path / "m.gguf"), "-p", "512", "-n", "128", "-t", "1,2", "-r", "5",
                    "-ngl", "0", "-o", "json"]


def test_a_failing_llama_bench_shows_its_last_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bins = tmp_path / "bin"
    fake_bin(bins, "llama-bench", 'for i in $(seq 1 30); do echo "stderr line $i" >&2; done\nexit 3\n')
    monkeypatch.setenv("OFFLOADKIT_LLAMACPP", str(bins))
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(BenchError, match="exit status 3") as err:
        run_llama_bench(tmp_path / "m.gguf")
    msg = str(err.value)
    assert msg.endswith("stderr line 30") and "stderr line 11\n" in msg and "stderr line 10\n" not in msg


def test_greedy_tokens_read_back_from_llama_simple_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_checkpoint(tmp_path / "m", make_config("mixtral", dtype="float32", **CAPTURED_CONFIG))
    gguf = export_gguf(src, tmp_path / "m.gguf", "f32", progress=False)
    bins = tmp_path / "bin"  # prints what simple.cpp prints: BOS, the prompt, the new pieces, a newline
    fake_bin(bins, "llama-simple", 'for a; do last="$a"; done\nprintf "<s>%s\\303A<|reserved_300|> \\n" "$last"\n')
    monkeypatch.setenv("OFFLOADKIT_LLAMACPP", str(bins))
    assert greedy_text(gguf, PROMPT, 4) == b"\xc3A<|reserved_300|> "
    assert greedy_tokens(gguf, PROMPT, 4) == [3 + 0xC3, 3 + ord("A"), 300, 3 + ord(" ")]


def test_split_pieces() -> None:
    pieces = [b"<unk>", b"<s>", b"</s>", *(bytes([b]) for b in range(256)), b"<|reserved_259|>", b""]
    assert split_pieces(b"a</s><|reserved_259|>\x00", pieces) == [3 + ord("a"), 2, 259, 3]
    with pytest.raises(BenchError, match="same bytes"):
        split_pieces(b"a", [b"a", b"a"])
    with pytest.raises(BenchError, match="no token prints"):
        split_pieces(b"b", [b"a"])


# ---- the cross-check of correctness (real llama.cpp) ---------------------------------------------------



def why_not_built() -> str | None:
    """None where llama.cpp can run here, else BenchError's reason (not built, or built for another CPU)."""
    try:
        find_llamacpp()
    except BenchError as e:
        return str(e)
    return None


WHY_NOT = why_not_built()
needs_llamacpp = pytest.mark.skipif(WHY_NOT is not None, reason=f"{WHY_NOT} (the cross-check runs llama-simple)")


def reference_greedy(folder: Path, prompt_ids: list[int], n_new: int) -> tuple[list[int], list[float]]:
    """offloadkit's reference greedy tokens and, per step, the margin between the two largest logits."""
    with open_checkpoint(folder) as ckpt:
        model = ReferenceModel(ckpt.spec, ckpt)
        logits, cache = model.prefill(torch.tensor([prompt_ids]), len(prompt_ids) + n_new)
        ids, margins = [], []
        for _ in range(n_new):
            top = logits[0].topk(2)
            ids.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            logits = model.decode(torch.tensor([ids[-1]]), cache)
    return ids, margins


def comparable(ids: list[int], margins: list[float], eos: tuple[int, ...]) -> list[int]:
    """The reference tokens before a near tie and before EOS (llama-simple stops there, unprinted)."""
    n = next((i for i, m in enumerate(margins) if m < MARGIN), len(ids))
    n = next((i for i, t in enumerate(ids[:n]) if t in eos), n)
    return ids[:n]


@needs_llamacpp
@pytest.mark.parametrize("arch", ["mixtral", "llama", "qwen2_moe"])
def test_llamacpp_greedy_tokens_equal_the_reference(tmp_path: Path, arch: str) -> None:
    kw = {} if arch == "llama" else dict(experts=4, top_k=2)
    src = write_checkpoint(tmp_path / arch, make_config(arch, layers=3, hidden=64, heads=4, kv_heads=2, vocab=512,
                                                        dtype="float32", **kw), seed=1)
    gguf = export_gguf(src, tmp_path / f"{arch}.gguf", "f32", progress=False)
    tok = load_tokenizer(src)
    n_new = 24
    ids, margins = reference_greedy(src, tok.encode(PROMPT), n_new)
    want = comparable(ids, margins, tok.eos_ids)
    assert len(want) >= MIN_COMPARED, f"only {len(want)} comparable tokens (margins {margins}); pick another seed"
    got = greedy_tokens(gguf, PROMPT, n_new)
    assert got[:len(want)] == want


@needs_llamacpp
def test_llamacpp_greedy_text_equals_the_reference_on_the_demo(tmp_path: Path) -> None:
    """The trained demo (bf16, a tokenizer with merges) exported in f32: text compared, byte for byte."""
    gguf = export_gguf(demo_model_dir(), tmp_path / "demo.gguf", "f32", progress=False)
    tok = load_tokenizer(demo_model_dir())
    ids, margins = reference_greedy(demo_model_dir(), tok.encode("Once upon a time"), 24)
    want = comparable(ids, margins, tok.eos_ids)
    assert len(want) >= MIN_COMPARED, f"only {len(want)} comparable tokens (margins {margins})"
    pieces = token_pieces(gguf)
    got = greedy_text(gguf, "Once upon a time", 24)
    assert got.startswith(b"".join(pieces[i] for i in want))



def test_a_build_for_another_cpu_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_bin(tmp_path, "llama-bench", "exit 0\n")
    (tmp_path / BUILD_STAMP).write_text(json.dumps({"cpu": "Some Other CPU [0123456789ab]"}))
    monkeypatch.setenv("OFFLOADKIT_LLAMACPP", str(tmp_path))
    with pytest.raises(BenchError, match=r"another CPU \(Some Other CPU.*make llamacpp"):
        find_binary("llama-bench")


# ---- building llama.cpp (offloadkit/bench/llamacpp_build.py), with fake cmake ------------------------------


@pytest.fixture
def fake_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A build root whose source is 'extracted' already, so that no download happens."""
    root = tmp_path / "llamacpp"
    (root / "src").mkdir(parents=True)
    (root / "src" / SOURCE_STAMP).write_text("{}")
    monkeypatch.delenv("OFFLOADKIT_LLAMACPP", raising=False)
    monkeypatch.setattr(llamacpp_build, "build_root", lambda: root)
    monkeypatch.setattr(llamacpp_build, "ensure_source",
                        lambda r: (r / "src", {"llama_cpp_commit": "0c1e57098", "llama_cpp_python": "0.3.36"}))
    return root


def test_build_without_cmake_says_what_to_install(fake_source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llamacpp_build.shutil, "which", lambda name: None)
    with pytest.raises(BenchError, match="cmake and a C\\+\\+ compiler not found.*apt-get install cmake g\\+\\+"):
        llamacpp_build.build_llamacpp()


def test_a_failed_build_shows_the_end_of_its_log(fake_source: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    tools = tmp_path / "tools"
    fake_bin(tools, "cmake", 'for i in $(seq 1 40); do echo "cmake says $i"; done\nexit 2\n')
    fake_bin(tools, "c++", "exit 0\n")
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(BenchError, match="configuring llama.cpp \\(cmake\\) failed \\(exit status 2\\)") as err:
        llamacpp_build.build_llamacpp()
    assert str(err.value).endswith("cmake says 40") and "cmake says 15\n" not in str(err.value)


def test_a_matching_build_is_not_rebuilt(fake_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tools = tmp_path / "tools"
    fake_bin(tools, "cmake", "exit 9\n")  # any cmake run would fail the test
    fake_bin(tools, "c++", "exit 0\n")
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    bins = fake_source / "out" / "bin"
    for name in llamacpp_build.TARGETS:
        fake_bin(bins, name, "exit 0\n")
    flags = [*llamacpp_build.CMAKE_FLAGS, "-DLLAMA_BUILD_COMMIT=0c1e57098", "-DLLAMA_BUILD_NUMBER=0"]
    stamp = {"llama_cpp_python": llamacpp_build.LLAMA_CPP_PYTHON, "llama_cpp_commit": "0c1e57098",
             "cmake_flags": " ".join(flags), "cpu": llamacpp_build.cpu_signature()}
    (bins / BUILD_STAMP).write_text(json.dumps(stamp))
    assert llamacpp_build.build_llamacpp() == bins
    (bins / BUILD_STAMP).write_text(json.dumps({**stamp, "cpu": "another CPU"}))  # now it must rebuild
    with pytest.raises(BenchError, match="exit status 9"):
        llamacpp_build.build_llamacpp()
