"""A checkpoint's tokenizer as llama.cpp's GGUF ``tokenizer.ggml.*`` metadata, written directly.

llama.cpp's own converter (``convert_hf_to_gguf.py``) recognises a BPE pre-tokenizer by hashing the
token ids of a test string and refuses hashes it does not know; offloadkit's tokenizers (the
byte-level one of random checkpoints and the demo's trained one) are unknown to it, and the untrained
one has no merges, which it refuses too. Both are plain GPT-2 byte-level BPE: split by the GPT-2
regex (``tokenizers``' ``ByteLevel`` pre-tokenizer with ``use_regex``), bytes mapped to printable
characters, merges applied by rank. llama.cpp implements exactly that as tokenizer model ``gpt2`` with
pre-tokenizer ``gpt-2`` (src/llama-vocab.cpp: the ``"gpt-2"`` branch sets LLAMA_VOCAB_PRE_TYPE_GPT2,
whose regex is GPT-2's), so this module writes those keys itself from ``tokenizer.json``:

- ``tokens``: every id below the model's ``vocab_size`` (ids the tokenizer lacks become ``[PAD<i>]``),
  in the tokenizer's own spelling (bytes as GPT-2 characters, as llama.cpp's ``gpt2`` model expects);
- ``token_type``: NORMAL for the BPE vocabulary, CONTROL for special added tokens and ones that look
  special (``<|...|>``, the converter's rule), USER_DEFINED for other added tokens, UNUSED for padding;
- ``merges``: ``"a b"`` strings by rank. The ``gguf`` writer refuses an empty array, so a tokenizer
  without merges gets one that can never apply (two multi-character special tokens: BPE starts from
  single characters and only merges pairs it has a rank for, so the pair never forms);
- ``bos``/``eos``/``unk`` ids and ``add_bos_token`` as offloadkit's tokenizer reads them
  (:func:`offloadkit.model.tokenizer.special_ids`).

It refuses tokenizers that are not GPT-2 byte-level BPE (sentencepiece-style ones with ``Metaspace``
and byte fallback need per-token scores that ``tokenizer.json`` does not carry): pass
``byte_tokenizer=True`` to write offloadkit's byte-level tokenizer for the model's vocabulary instead,
which is all a speed benchmark needs (llama-bench feeds random token ids).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers

from offloadkit.errors import BenchError, CheckpointError

try:
    import gguf
except ImportError as e:  # an optional dependency: the CLI prints this instead of a traceback
    raise BenchError("GGUF export needs the gguf package: pip install 'offloadkit[bench]' (make bench "
                     "installs it)") from e
from offloadkit.model.tokenizer import byte_level_tokenizer, special_ids

PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for the GPT-2 regex split (src/llama-vocab.cpp)
BYTE_TOKENIZER_HINT = ("pass byte_tokenizer=True (offloadkit bench export-gguf --byte-tokenizer) to write "
                       "offloadkit's byte-level tokenizer instead: the weights are exported unchanged, which is "
                       "what a speed benchmark needs, but text is then tokenized byte by byte")


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer metadata of one GGUF file (``tokenizer.ggml.*``)."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    add_bos: bool

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(PRE_TOKENIZER)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        if self.bos_id is not None:
            writer.add_bos_token_id(self.bos_id)
        if self.eos_id is not None:
            writer.add_eos_token_id(self.eos_id)
        if self.unk_id is not None:
            writer.add_unk_token_id(self.unk_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(False)


def _looks_special(text: str) -> bool:
    """The converter's rule (conversion/base.py, does_token_look_special): ``<|...|>`` is a control token."""
    return text.startswith("<|") and text.endswith("|>")


def _check_byte_level(data: dict[str, Any], where: Path) -> None:
    """Refuse a ``tokenizer.json`` that llama.cpp's ``gpt2`` / ``gpt-2`` tokenizer would split differently."""
    model = data.get("model") or {}
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model {model.get('type')!r} (not BPE)")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problems.append("a BPE with byte fallback or subword affixes")
    if model.get("ignore_merges"):
        problems.append("ignore_merges=true")
    if data.get("normalizer") is not None:
        problems.append(f"a normalizer ({(data['normalizer'] or {}).get('type')})")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        problems.append(f"pre-tokenizer {pre.get('type')!r} (not ByteLevel with the GPT-2 regex and no prefix space)")
    if problems:
        raise CheckpointError(f"the tokenizer in {where} is not a GPT-2 style byte-level BPE, the one kind offloadkit "
                              f"writes into GGUF: it has {'; '.join(problems)}; {BYTE_TOKENIZER_HINT}")


def _merges(model: dict[str, Any]) -> list[str]:
    """``[["a", "b"], ...]`` or ``["a b", ...]`` (both spellings of tokenizer.json) -> ``["a b", ...]``."""
    out = []
    for m in model.get("merges") or []:
        pair = m if isinstance(m, list) else str(m).split(" ", 1)
        if len(pair) != 2 or " " in pair[0] or " " in pair[1]:
            raise CheckpointError(f"merge {m!r} cannot be written as llama.cpp's 'left right' string")
        out.append(f"{pair[0]} {pair[1]}")
    return out


def _vocab_from_json(data: dict[str, Any], vocab_size: int, where: Path) -> tuple[list[str], list[int]]:
    gt = gguf.TokenType
    by_id: dict[int, tuple[str, int]] = {i: (t, gt.NORMAL) for t, i in (data["model"].get("vocab") or {}).items()}
    for added in data.get("added_tokens") or []:
        text = added["content"]
        kind = gt.CONTROL if added.get("special") or _looks_special(text) else gt.USER_DEFINED
        by_id[int(added["id"])] = (text, kind)
    too_big = sorted(i for i in by_id if i >= vocab_size)
    if too_big:
        raise CheckpointError(f"the tokenizer in {where} has ids up to {too_big[-1]}, beyond the model's "
                              f"vocab_size {vocab_size}")
    tokens = [by_id[i][0] if i in by_id else f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(by_id[i][1]) if i in by_id else int(gt.UNUSED) for i in range(vocab_size)]
    return tokens, types


def _never_merge(tokens: list[str], types: list[int]) -> str:
    """A merge that can never apply: two copies of a control token of more than one character."""
    for text, kind in zip(tokens, types, strict=True):
        if kind == gguf.TokenType.CONTROL and len(text) > 1 and " " not in text:
            return f"{text} {text}"
    raise CheckpointError("the tokenizer has no merges and no multi-character control token to write a "
                          "never-applying merge with (the gguf writer refuses an empty merges list)")


def build_vocab(backend: tokenizers.Tokenizer, vocab_size: int, bos_id: int | None, add_bos: bool,
                eos_id: int | None, where: Path) -> GGUFVocab:
    """The GGUF vocabulary of a byte-level BPE ``backend`` for a model of ``vocab_size`` ids."""
    data = json.loads(backend.to_str())
    _check_byte_level(data, where)
    tokens, types = _vocab_from_json(data, vocab_size, where)
    merges = _merges(data["model"]) or [_never_merge(tokens, types)]
    unk = data["model"].get("unk_token")
    unk_id = backend.token_to_id(unk) if isinstance(unk, str) else None
    return GGUFVocab(tokens, types, merges, bos_id, eos_id, unk_id, add_bos)


def checkpoint_vocab(folder: Path, vocab_size: int, config: dict[str, Any], *,
                     byte_tokenizer: bool = False) -> GGUFVocab:
    """The GGUF vocabulary of the checkpoint in ``folder`` (or offloadkit's byte-level one, if asked)."""
    bos_cfg = config.get("bos_token_id")
    eos_cfg = config.get("eos_token_id")
    eos_cfg = eos_cfg[0] if isinstance(eos_cfg, list) and eos_cfg else eos_cfg
    if byte_tokenizer:
        return build_vocab(byte_level_tokenizer(vocab_size), vocab_size, bos_cfg, bos_cfg is not None,
                           eos_cfg, folder)
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"no tokenizer.json in {folder}; {BYTE_TOKENIZER_HINT}")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"cannot read the tokenizer {file}: {e}") from e
    bos, eos = special_ids(folder, backend)
    return build_vocab(backend, vocab_size, bos if bos is not None else bos_cfg, bos is not None,
                       eos[0] if eos else eos_cfg, folder)


__all__ = ["BYTE_TOKENIZER_HINT", "PRE_TOKENIZER", "GGUFVocab", "build_vocab", "checkpoint_vocab"]
