"""Tokenizers: byte-level round trips, streaming decode of multi-byte text, special ids, bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from offloadkit.errors import CheckpointError, ConfigError, ModelNotFoundError
from offloadkit.model.tokenizer import Tokenizer, byte_level_tokenizer, load_tokenizer

TEXTS = ["naïve café — 東京", "hello world", "emoji 🙂🚀 and ünïcödé", "  leading spaces\nand\ttabs ", ""]
CORPUS = ["naïve café — 東京 tower", "the quick brown fox jumps over the lazy dog", "東京 東京 café café",
          "émigré naïve façade 🙂 🙂"] * 20


def byte_level_trained() -> HFTokenizer:
    """A byte-level BPE with merges that join bytes of one character and cross character boundaries."""
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def sentencepiece_like() -> HFTokenizer:
    """A Metaspace BPE with byte fallback, like LLaMA's: ids 3-258 are the byte pieces ``<0x00>``..``<0xFF>``,
    ordinary vocabulary as in LLaMA's tokenizer.json (so ``skip_special_tokens`` keeps them); anything
    but "hello" and "world" falls back to bytes; its decoder strips the first leading space."""
    words = ["▁", "h", "e", "l", "o", "w", "r", "d", "ll", "▁h", "▁he", "▁hell", "▁hello", "▁w", "▁wo", "▁wor",
             "▁worl", "▁world"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words])}
    merges = [("l", "l"), ("▁", "h"), ("▁h", "e"), ("▁he", "ll"), ("▁hell", "o"), ("▁", "w"), ("▁w", "o"),
              ("▁wo", "r"), ("▁wor", "l"), ("▁worl", "d")]
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok


BACKENDS = {"byte_level": lambda: byte_level_tokenizer(512), "trained_bpe": byte_level_trained,
            "sentencepiece_like": sentencepiece_like}
CACHED = {"byte_level": byte_level_tokenizer(512), "trained_bpe": byte_level_trained()}  # built once for hypothesis


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_and_stream(backend: str, text: str) -> None:
    tok = Tokenizer(BACKENDS[backend](), bos_id=1, eos_ids=(2,))
    ids = tok.encode(text)
    assert ids[0] == 1 and tok.encode(text, add_bos=False) == ids[1:]
    full = tok.decode(ids)
    if backend != "sentencepiece_like":  # that one normalizes spaces, as sentencepiece does
        assert full == text
    stream = tok.stream()
    pieces = [stream.push(i) for i in [*ids, 2]]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == full
    assert pieces[-1] == ""  # </s> is special: skipped


def test_stream_holds_back_incomplete_characters() -> None:
    tok = Tokenizer(byte_level_tokenizer(300), bos_id=1)
    ids = tok.encode("東京", add_bos=False)
    assert len(ids) == 6  # three bytes each
    stream = tok.stream()
    assert [stream.push(i) for i in ids] == ["", "", "東", "", "", "京"]
    stream = tok.stream()
    assert stream.push(ids[0]) == "" and stream.flush() == "\ufffd"  # cut mid-character: flush says so


@pytest.mark.parametrize("backend", ["byte_level", "trained_bpe"])
@given(data=st.data())
@settings(max_examples=200, deadline=None)
def test_stream_of_any_ids_joins_to_decode(backend: str, data: st.DataObject) -> None:
    """What a random model emits (any ids, so broken UTF-8 and stray specials) streams to ``decode``."""
    tok = Tokenizer(CACHED[backend], bos_id=1)
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=16))
    stream = tok.stream()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)


def test_stream_goes_on_where_the_text_already_printed_changes() -> None:
    """Byte fallback turns every byte of an invalid UTF-8 run into U+FFFD, so "A" (``<0x41>``), once
    printed, later decodes as "\ufffd" (``<0x41> <0xE6> ▁hello`` is "\ufffd\ufffd hello"). tokenizers'
    DecodeStream raises there; the stream prints the rest past what it printed and goes on."""
    backend = sentencepiece_like()
    tok = Tokenizer(backend)
    ids = [backend.token_to_id(t) for t in ("<0x41>", "<0xE6>", "▁hello", "▁world", "<0xE4>", "<0xBA>", "<0xAC>")]
    assert tok.decode(ids[:3]) == "\ufffd\ufffd hello"
    stream = tok.stream()
    assert [stream.push(i) for i in ids] == ["A", "", "\ufffd hello", " world", "", "", "京"]
    assert stream.flush() == ""


def test_byte_level_tokenizer_layout() -> None:
    tok = byte_level_tokenizer(300)
    assert tok.get_vocab_size(with_added_tokens=True) == 300
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert tok.encode("A", add_special_tokens=False).ids == [3 + ord("A")]  # id = 3 + byte
    assert max(tok.encode("".join(map(chr, range(0x20, 0x3000, 7)))).ids) < 259
    assert tok.decode([299, 3 + ord("x")]) == "<|reserved_299|>x"  # every id decodes to something
    assert byte_level_tokenizer(259).get_vocab_size(with_added_tokens=True) == 259
    with pytest.raises(ConfigError, match=r"vocab_size 258 is too small .* needs 259 ids"):
        byte_level_tokenizer(258)


# ---- loading -------------------------------------------------------------------------------------


def test_load_reads_special_ids(tmp_path: Path) -> None:
    byte_level_tokenizer(300).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_ids) == (1, (2,)) and tok.is_eos(2)
    assert load_tokenizer(tmp_path / "tokenizer.json").bos_id == 1
    # Qwen-style: no BOS, several EOS ids from generation_config.json.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "</s>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id is None and tok.eos_ids == (2, 0)
    assert tok.encode("hi") == tok.encode("hi", add_bos=False)
    assert "vocab=300" in repr(tok)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="gone does not exist"):
        load_tokenizer(tmp_path / "gone")
    with pytest.raises(CheckpointError, match=r"no tokenizer.json in .*'fast' tokenizer format"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")
    with pytest.raises(CheckpointError, match=r"it has tokenizer.model: convert it"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(CheckpointError, match="cannot read the tokenizer .*tokenizer.json"):
        load_tokenizer(tmp_path)
