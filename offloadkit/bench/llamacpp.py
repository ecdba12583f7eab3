"""Run the real llama.cpp: ``llama-bench`` for speed, ``llama-simple`` for greedy text, parsed.

The binaries are the ones ``make llamacpp`` builds (:mod:`offloadkit.bench.llamacpp_build`), or those
in the folder ``$OFFLOADKIT_LLAMACPP`` names. Missing ones raise :class:`BenchError` saying how to build
them; a llama-bench that fails raises one showing the last lines it printed.

``run_llama_bench(gguf, n_prompt=[512], n_gen=[128], threads=[2])`` runs
``llama-bench -m F -p 512 -n 128 -t 2 -r 5 -ngl 0 -o json`` and returns one :class:`LlamaBenchRecord`
per test (pp512, tg128), with llama-bench's own fields (``avg_ts``, ``stddev_ts``, ``samples_ts``,
``model_size``, ``model_n_params``, ``n_threads``, ``type_k``, ``build_commit``...). ``-ngl 0`` keeps
every layer on the CPU (a no-op in a CPU-only build, and the fair setting against a CPU engine);
everything else is llama-bench's default, i.e. what its users measure.

Greedy decoding goes through ``llama-simple`` (examples/simple/simple.cpp): it tokenizes a text prompt
(adding BOS when the GGUF says so), samples with llama.cpp's greedy sampler only, stops at an
end-of-generation token, and prints the prompt's and the new tokens' pieces as raw bytes. So
:func:`greedy_text` returns *bytes*, which :func:`greedy_tokens` maps back to token ids when the
vocabulary has no merges (every piece then is one byte or one special token's text, so the split is
unique: offloadkit's byte-level tokenizer). It cannot set threads (llama.cpp's default, 4) and a byte
0 is lost (printed with ``%s``); it is meant for correctness checks, not timing.

llama-bench's protocol (tools/llama-bench/llama-bench.cpp of the build, llama.cpp 0c1e57098)
----------------------------------------------------------------------------------------------
- Defaults (lines 381-424): ``-p 512 -n 128 -r 5``, batch 2048, ubatch 512, KV cache **f16** for K and V
  (393-394), threads = physical cores (395), ``--poll 50`` (398), flash attention ``auto`` (406; on
  the CPU it resolves to on by probing, src/llama-context.cpp:557), load mode ``auto`` = mmap on a CPU
  (402; src/llama-model-loader.cpp:559), warm-up on (422).
- ``-p`` and ``-n`` are separate tests: pp512 has n_gen 0, tg128 has n_prompt 0 (1324-1470). Each test
  gets a fresh context of ``n_prompt + n_gen`` positions (1308, 2376); the model is loaded once (2362).
- Warm-up, untimed (2412-2439): one whole prompt run for a pp test, one generated token for a tg test.
- Each repetition (2441-2512) first clears the KV cache (2442): **tg starts from an empty context**
  at position 0 (no prompt before it unless ``-d``). Only the decode calls are timed (2481 to 2510,
  ``high_resolution_clock``, line 40): no tokenization, no sampling, no model loading.
- Tokens are random, ``std::rand() % n_vocab``, except that the first token of a prompt run and of a
  generation run is BOS when the vocabulary adds one (2181, 2205, 2219).
- Prompt (``test_prompt``, 2168-2196): chunks of ``n_batch`` tokens, each one ``llama_process`` call
  with a batch from ``common_batch_get_one``, which asks logits for the **last token only**
  (common/common.cpp:2193); in the graph the last layer then keeps only the output rows after its
  attention (src/models/llama.cpp:174, qwen2moe.cpp:118), so the last layer's FFN / MoE and the
  lm_head run on one token. Internally llama.cpp splits the batch into ubatches of 512.
- Generation (``test_gen``, 2198-2222): one token per ``llama_process`` call with logits for it,
  ``llama_synchronize`` after each token, the next token random (not sampled).
- Rates (1564-1574): each repetition gives ``(n_prompt + n_gen) / seconds``; ``avg_ts`` is the mean of
  those rates and ``stddev_ts`` their sample standard deviation (n - 1; line 110) -- the mean of rates,
  not the rate of the mean time.
- Threads (2169, 2199, 2391-2410): ``llama_set_n_threads(ctx, t, t)`` on a ggml threadpool whose
  workers poll (busy-wait, level 50) between graph computations.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offloadkit.errors import BenchError

ENV_DIR = "OFFLOADKIT_LLAMACPP"  # a folder holding llama-bench and llama-simple
NOT_BUILT = "llama.cpp is not built here: run `make bench` (or `make llamacpp`)"
TAIL_LINES = 20


# ---- finding the binaries ------------------------------------------------------------------------


def llamacpp_dir() -> Path:
    """Where the llama.cpp binaries are: ``$OFFLOADKIT_LLAMACPP`` or the folder ``make llamacpp`` fills."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    from offloadkit.bench.llamacpp_build import default_bin_dir

    return default_bin_dir()


def find_binary(name: str) -> Path:
    """The path of llama.cpp's ``name`` (``llama-bench``, ``llama-simple``); BenchError if it is not there."""
    from offloadkit.bench.llamacpp_build import build_info, cpu_signature

    where = llamacpp_dir()
    path = where / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        set_by = f" (${ENV_DIR} points there)" if os.environ.get(ENV_DIR) else ""
        raise BenchError(f"{NOT_BUILT}; no executable {name} in {where}{set_by}")
    built_for = build_info(where).get("cpu")
    if built_for and built_for != cpu_signature():  # a native build may not run here, or not at its best
        raise BenchError(f"llama.cpp in {where} was built natively for another CPU ({built_for}; this one is "
                         f"{cpu_signature()}): run `make llamacpp` to rebuild it for this one")
    return path


def build_id() -> str:
    """Which llama.cpp runs: ``"llama.cpp 0c1e57098 (llama-cpp-python 0.3.36, native build for AMD EPYC [..])"``."""
    from offloadkit.bench.llamacpp_build import build_info

    info = build_info(llamacpp_dir())
    if info:
        return (f"llama.cpp {info['llama_cpp_commit']} (llama-cpp-python {info['llama_cpp_python']}, native build "
                f"for {info['cpu']})")
    proc = _run([str(find_binary("llama-bench")), "--version"], "llama-bench --version", 60)
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    commit = re.search(r"commit ([0-9a-zA-Z]+)", text)
    return f"llama.cpp {commit.group(1) if commit else 'of unknown commit'} (from {llamacpp_dir()})"


def find_llamacpp() -> Path:
    """The folder holding llama-bench and llama-simple, both runnable here; BenchError saying how to build them."""
    for name in ("llama-bench", "llama-simple"):
        find_binary(name)
    return llamacpp_dir()


def is_built() -> bool:
    """True when llama-bench and llama-simple are both found (and built for this CPU)."""
    try:
        find_llamacpp()
    except BenchError:
        return False
    return True


def _tail(text: str, n: int = TAIL_LINES) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-n:]) if lines else "(it printed nothing)"


def _run(cmd: list[str], what: str, timeout_s: float | None) -> subprocess.CompletedProcess[bytes]:
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        err = (e.stderr or b"").decode(errors="replace")
        raise BenchError(f"{what} did not finish within {timeout_s:.0f} s; its last lines:\n{_tail(err)}") from e
    except OSError as e:
        raise BenchError(f"cannot run {cmd[0]}: {e}") from e
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace") + proc.stdout.decode(errors="replace")
        raise BenchError(f"{what} failed (exit status {proc.returncode}): {' '.join(cmd)}\n"
                         f"its last lines:\n{_tail(err)}")
    return proc


# ---- llama-bench ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaBenchRecord:
    """One test of llama-bench's JSON output (``pp512`` or ``tg128``), measured on this machine."""

    test: str  # "pp512", "tg128", or "pp512+tg128" for -pg
    n_prompt: int
    n_gen: int
    n_threads: int
    avg_ts: float  # tokens/s, mean over repetitions
    stddev_ts: float
    samples_ts: tuple[float, ...]
    samples_ns: tuple[int, ...]
    model_type: str
    model_size: int  # bytes of the weights
    model_n_params: int
    type_k: str
    type_v: str
    n_batch: int
    n_ubatch: int
    flash_attn: int
    build_commit: str
    build_number: int
    cpu_info: str
    backends: str
    raw: dict[str, Any] = field(repr=False, compare=False, hash=False)


def _test_name(n_prompt: int, n_gen: int) -> str:
    """llama-bench's names: ``(512, 0) -> "pp512"``, ``(0, 128) -> "tg128"``, ``(512, 128) -> "pp512+tg128"``."""
    parts = ([f"pp{n_prompt}"] if n_prompt else []) + ([f"tg{n_gen}"] if n_gen else [])
    return "+".join(parts)


def parse_llama_bench_json(text: str) -> list[LlamaBenchRecord]:
    """The records of ``llama-bench -o json`` output; BenchError if it is not that."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise BenchError(f"llama-bench printed something that is not JSON ({e}); the start of it:\n{text[:400]}") from e
    if not isinstance(data, list):
        raise BenchError("llama-bench's JSON is not a list of tests")
    out = []
    for d in data:
        try:
            out.append(LlamaBenchRecord(
                test=_test_name(int(d["n_prompt"]), int(d["n_gen"])), n_prompt=int(d["n_prompt"]),
                n_gen=int(d["n_gen"]), n_threads=int(d["n_threads"]), avg_ts=float(d["avg_ts"]),
                stddev_ts=float(d["stddev_ts"]), samples_ts=tuple(float(x) for x in d["samples_ts"]),
                samples_ns=tuple(int(x) for x in d["samples_ns"]), model_type=str(d["model_type"]),
                model_size=int(d["model_size"]), model_n_params=int(d["model_n_params"]),
                type_k=str(d["type_k"]), type_v=str(d["type_v"]), n_batch=int(d["n_batch"]),
                n_ubatch=int(d["n_ubatch"]), flash_attn=int(d["flash_attn"]),
                build_commit=str(d["build_commit"]), build_number=int(d["build_number"]),
                cpu_info=str(d["cpu_info"]), backends=str(d["backends"]), raw=d))
        except (KeyError, TypeError, ValueError) as e:
            raise BenchError(f"llama-bench's JSON lacks or garbles the field {e} (a different llama-bench "
                             f"version?)") from e
    return out


def _csv(values: int | Sequence[int]) -> str:
    return ",".join(str(int(v)) for v in ([values] if isinstance(values, int) else values))


def llama_bench_command(gguf: str | os.PathLike[str], n_prompt: int | Sequence[int] = 512,
                        n_gen: int | Sequence[int] = 128, threads: int | Sequence[int] = 2,
                        repetitions: int = 5, extra_args: Sequence[str] = ()) -> list[str]:
    """The llama-bench command line :func:`run_llama_bench` runs."""
    return [str(find_binary("llama-bench")), "-m", os.fspath(gguf), "-p", _csv(n_prompt), "-n", _csv(n_gen),
            "-t", _csv(threads), "-r", str(int(repetitions)), "-ngl", "0", "-o", "json", *extra_args]


def run_llama_bench(gguf: str | os.PathLike[str], n_prompt: int | Sequence[int] = 512,
                    n_gen: int | Sequence[int] = 128, threads: int | Sequence[int] = 2, repetitions: int = 5,
                    *, extra_args: Sequence[str] = (), timeout_s: float | None = None) -> list[LlamaBenchRecord]:
    """Run llama-bench on ``gguf`` (measured on this machine) and parse its records, one per test.

    ``n_prompt``, ``n_gen`` and ``threads`` take a number or a list (llama-bench's comma lists); a 0
    skips that kind of test. ``extra_args`` go through unchanged (e.g. ``["-fa", "off"]``).
    """
    if not Path(gguf).is_file():
        raise BenchError(f"no GGUF file {gguf}: export one with `offloadkit bench export-gguf`")
    cmd = llama_bench_command(gguf, n_prompt, n_gen, threads, repetitions, extra_args)
    proc = _run(cmd, "llama-bench", timeout_s)
    return parse_llama_bench_json(proc.stdout.decode(errors="replace"))


# ---- greedy decoding through llama-simple --------------------------------------------------------


def _read_vocab(gguf: str | os.PathLike[str]) -> tuple[list[str], list[int], list[str]]:
    """(token texts, token types, merges) of ``gguf``'s tokenizer metadata."""
    import gguf as gg

    fields = gg.GGUFReader(os.fspath(gguf)).fields
    tokens, types = fields.get("tokenizer.ggml.tokens"), fields.get("tokenizer.ggml.token_type")
    if tokens is None or types is None:
        raise BenchError(f"{gguf} has no tokenizer.ggml.tokens / token_type metadata")
    merges = fields.get("tokenizer.ggml.merges")
    text = lambda f, i: bytes(f.parts[i]).decode("utf-8")
    return ([text(tokens, i) for i in tokens.data], [int(types.parts[i][0]) for i in types.data],
            [text(merges, i) for i in merges.data] if merges is not None else [])


def token_pieces(gguf: str | os.PathLike[str]) -> list[bytes]:
    """What llama.cpp prints for each token id of ``gguf``'s ``gpt2`` vocabulary (``token_to_piece``).

    NORMAL tokens: their GPT-2 characters mapped back to bytes; CONTROL and USER_DEFINED: their text;
    UNUSED: nothing (src/llama-vocab.cpp, ``token_to_piece``, BPE branch).
    """
    from gguf import TokenType

    from offloadkit.model.tokenizer import bytes_to_unicode

    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    texts, types, _ = _read_vocab(gguf)
    pieces = []
    for text, kind in zip(texts, types, strict=True):
        if kind == TokenType.NORMAL:
            pieces.append(bytes(char_byte[c] for c in text))
        elif kind in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN):
            pieces.append(text.encode("utf-8"))
        else:
            pieces.append(b"")
    return pieces


def greedy_text(gguf: str | os.PathLike[str], prompt: str, n_new: int, *, timeout_s: float | None = 300) -> bytes:
    """The bytes llama.cpp's greedy decoding appends to ``prompt`` (at most ``n_new`` tokens; it stops at EOS)."""
    cmd = [str(find_binary("llama-simple")), "-m", os.fspath(gguf), "-n", str(int(n_new)), "-ngl", "0", prompt]
    out = _run(cmd, "llama-simple", timeout_s).stdout
    if out.endswith(b"\n"):
        out = out[:-1]  # simple.cpp ends with printf("\n")
    at = out.find(prompt.encode("utf-8"))
    if at < 0:
        raise BenchError(f"llama-simple did not echo the prompt; it printed {out[:200]!r}")
    return out[at + len(prompt.encode("utf-8")):]


def split_pieces(text: bytes, pieces: Sequence[bytes]) -> list[int]:
    """Token ids whose pieces concatenate to ``text``, for a vocabulary where that split is unique.

    Multi-byte pieces (special tokens' texts) are matched first, longest first; every other byte is
    the token whose piece is that byte. BenchError when a byte has no token or two tokens share a piece.
    """
    by_piece: dict[bytes, int] = {}
    for i, p in enumerate(pieces):
        if p:
            if p in by_piece:
                raise BenchError(f"tokens {by_piece[p]} and {i} print the same bytes {p!r}: ids cannot be recovered")
            by_piece[p] = i
    long_pieces = sorted((p for p in by_piece if len(p) > 1), key=len, reverse=True)
    ids, at = [], 0
    while at < len(text):
        match = next((p for p in long_pieces if text.startswith(p, at)), None) or text[at:at + 1]
        if match not in by_piece:
            raise BenchError(f"no token prints {match!r}")
        ids.append(by_piece[match])
        at += len(match)
    return ids


def greedy_tokens(gguf: str | os.PathLike[str], prompt: str, n_new: int, *, timeout_s: float | None = 300) -> list[int]:
    """llama.cpp's greedy token ids after ``prompt`` (via :func:`greedy_text`), for merge-free vocabularies.

    A vocabulary with merges prints some texts through several token sequences, so the ids cannot be
    read back from the text: that raises BenchError (compare :func:`greedy_text` instead).
    """
    from gguf import TokenType

    texts, types, merges = _read_vocab(gguf)
    control = {t for t, k in zip(texts, types, strict=True) if k == TokenType.CONTROL}
    if any(not set(m.split(" ", 1)) <= control for m in merges):  # offloadkit's never-applying merge pairs controls
        raise BenchError(f"{gguf}'s vocabulary has merges: token ids cannot be read back from llama-simple's "
                         f"text; compare greedy_text() instead")
    return split_pieces(greedy_text(gguf, prompt, n_new, timeout_s=timeout_s), token_pieces(gguf))


__all__ = ["ENV_DIR", "NOT_BUILT", "LlamaBenchRecord", "build_id", "find_binary", "find_llamacpp", "greedy_text",
           "greedy_tokens", "is_built", "llama_bench_command", "llamacpp_dir", "parse_llama_bench_json",
           "run_llama_bench", "split_pieces", "token_pieces"]
