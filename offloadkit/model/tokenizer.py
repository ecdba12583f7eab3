"""Text in, token ids out, and back again as the tokens stream from the engine.

A thin wrapper over a Hugging Face ``tokenizers.Tokenizer`` (``tokenizer.json``, the "fast" format
every model on the Hub ships) that knows the model's BOS and EOS ids, and an incremental decoder:
byte-level BPE splits one character over several tokens ("東" is three byte tokens), so decoding
token by token would print replacement characters. :class:`TokenStream` holds text back until it is
whole, and what it prints, joined, equals ``decode`` of all the ids (always with byte-level BPE, even
for ids that are not valid UTF-8; with byte fallback, whenever the bytes are). It is ``tokenizers``'
own ``decoders.DecodeStream`` plus the two things that class lacks (see :class:`TokenStream`).

It also builds :func:`byte_level_tokenizer`, the tokenizer offloadkit writes beside random
checkpoints: ids 0-2 are ``<unk> <s> </s>``, ids 3-258 the 256 bytes (like LLaMA's byte fallback),
so any text round-trips. A vocabulary larger than 259 is filled with ``<|reserved_ID|>`` tokens so
that every id a random model can emit decodes to something; smaller than 259 is refused.

It refuses folders without ``tokenizer.json`` (a sentencepiece ``tokenizer.model`` alone must first be
converted) and does no chat templating.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from offloadkit.errors import CheckpointError, ConfigError, ModelNotFoundError

BYTE_VOCAB_MIN = 259  # 3 special tokens + 256 bytes
SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
INVALID_PREFIX = "Invalid prefix encountered"  # how the message of DecodeStream's refusal starts


class TokenStream:
    """Incremental decoding: ``push(id)`` returns the text that is now certain ("" if none yet).

    The work is done by ``tokenizers.decoders.DecodeStream``: it decodes a short window of recent ids
    twice, without and with the new one, and hands out the difference once it does not end in an
    incomplete character (U+FFFD); decoding a window rather than one token also keeps decoders that
    strip a leading space (sentencepiece's) correct. On the cases tests/test_tokenizer.py checks
    (byte-level BPE, trained merges across characters, sentencepiece-style byte fallback, special
    tokens skipped) and on thousands of random id sequences it gives exactly the pieces offloadkit's
    former hand-written decoder gave. This class mirrors the window's bounds to add what it lacks:

    - :meth:`flush`: DecodeStream has no end; an incomplete character at the very end of a stream
      stays held back forever. ``flush`` prints it (as U+FFFD), as ``decode`` of all the ids does.
    - Recovery from ``Invalid prefix``: DecodeStream raises when the window's text, grown by a token,
      no longer starts with the text already printed. That happens with byte-fallback decoders
      (LLaMA's, Mistral's): ``ByteFallback`` turns every byte of an invalid UTF-8 run into U+FFFD, so
      ``<0x41>`` prints "A" and ``<0x41> <0xE6> ▁hello`` later decodes as "�� hello" (vLLM resets its
      stream on the same error: vllm-project/vllm#17448). Text already printed cannot be taken back,
      so this prints the rest of the window past the printed length, as the hand-written decoder did,
      and restarts the stream there (``DecodeStream(ids=...)``, tokenizers >= 0.22).
    """

    def __init__(self, backend: tokenizers.Tokenizer, skip_special_tokens: bool = True) -> None:
        self._backend = backend
        self._skip = skip_special_tokens
        self._stream = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)
        self.ids: list[int] = []
        self._prefix = 0  # DecodeStream's window start: ids[_prefix:_read] have been printed already
        self._read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        try:
            text = self._stream.step(self._backend, int(token_id))
        except Exception as e:  # tokenizers raises a bare Exception
            if not str(e).startswith(INVALID_PREFIX):
                raise
            before = self._decode(self.ids[self._prefix:self._read])
            now = self._decode(self.ids[self._prefix:])
            if now.endswith("\ufffd") or len(now) <= len(before):
                return ""  # nothing certain yet; the stream resumes from the same window
            text = now[len(before):]
            self._stream = decoders.DecodeStream(ids=self.ids[self._read:], skip_special_tokens=self._skip)
        if text is None:
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end); call once at the end."""
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        self._stream = decoders.DecodeStream(skip_special_tokens=self._skip)
        return now[len(before):]


class Tokenizer:
    """A model's tokenizer: ``encode`` / ``decode`` / ``stream``, with its ``bos_id`` and ``eos_ids``.

    ``bos_id`` is the id ``encode`` prepends, ``None`` for models that use none (Qwen).
    """

    def __init__(self, backend: tokenizers.Tokenizer, bos_id: int | None = None,
                 eos_ids: Sequence[int] = (), path: Path | None = None) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> TokenStream:
        return TokenStream(self.backend, skip_special_tokens)

    def is_eos(self, token_id: int) -> bool:
        return token_id in self.eos_ids

    def __repr__(self) -> str:
        return f"Tokenizer(vocab={self.vocab_size}, bos={self.bos_id}, eos={list(self.eos_ids)})"


# ---- loading -------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or ``{}`` if it is absent or unreadable (these files are optional)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_id(backend: tokenizers.Tokenizer, token: Any) -> int | None:
    """``"<s>"`` or ``{"content": "<s>", ...}`` (tokenizer_config.json spellings) -> its id."""
    if isinstance(token, dict):
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return () if value is None else (int(value),)


def special_ids(folder: Path, backend: tokenizers.Tokenizer) -> tuple[int | None, tuple[int, ...]]:
    """(bos id or None, eos ids), from generation_config.json, config.json and tokenizer_config.json."""
    gen, cfg = _read_json(folder / "generation_config.json"), _read_json(folder / "config.json")
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    if bos is None:
        bos = _token_id(backend, tok_cfg.get("bos_token"))
    adds_bos = tok_cfg.get("add_bos_token", not ("bos_token" in tok_cfg and tok_cfg["bos_token"] is None))
    eos = _ids(gen.get("eos_token_id", cfg.get("eos_token_id")))
    if not eos:
        eos = _ids(_token_id(backend, tok_cfg.get("eos_token")))
    return (int(bos) if adds_bos and bos is not None else None), eos


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of the model in ``model_dir`` (a folder, or its ``tokenizer.json``)."""
    p = Path(model_dir)
    if not p.exists():
        raise ModelNotFoundError(f"{p} does not exist: expected a model folder holding tokenizer.json")
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        hint = (" (it has tokenizer.model: convert it with transformers, "
                "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))" if (p / "tokenizer.model").exists() else "")
        raise CheckpointError(f"no tokenizer.json in {p}{hint}; offloadkit reads the Hugging Face "
                              f"'fast' tokenizer format")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"cannot read the tokenizer {file}: {e}") from e
    bos, eos = special_ids(file.parent, backend)
    return Tokenizer(backend, bos, eos, path=file)


# ---- the byte-level tokenizer of random models ---------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (what ByteLevel pre-tokenization emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return chars


def byte_level_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level tokenizer with exactly ``vocab_size`` ids: specials, 256 bytes, reserved tokens."""
    if vocab_size < BYTE_VOCAB_MIN:
        raise ConfigError(f"vocab_size {vocab_size} is too small for the byte-level tokenizer: it needs "
                          f"{BYTE_VOCAB_MIN} ids (<unk> <s> </s> and 256 bytes); use a larger vocab_size "
                          f"or pass your own tokenizer")
    byte_char = bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(SPECIALS)} | {byte_char[b]: len(SPECIALS) + b for b in range(256)}
    tok = tokenizers.Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # transformers' AutoTokenizer prepends <s> through this; offloadkit's encode adds it itself.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(f"<|reserved_{i}|>", special=False, normalized=False)
                    for i in range(BYTE_VOCAB_MIN, vocab_size)])
    return tok


__all__ = [
    "BYTE_VOCAB_MIN", "TokenStream", "Tokenizer", "byte_level_tokenizer", "load_tokenizer", "special_ids",
]
