"""The sampler: greedy is argmax, seeded sampling is reproducible, top-p keeps the nucleus only; generation
stops at the model's context and says so."""

import io

import pytest
import torch

from offloadkit.errors import OffloadkitError
from offloadkit.model.generate import (
    SamplingConfig,
    context_room,
    generate_ids,
    model_context,
    sample_next,
    stream_text,
)


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample_next(logits, SamplingConfig()) == 1


def test_seeded_sampling_is_reproducible_and_varied():
    logits = torch.zeros(50)
    cfg = SamplingConfig(temperature=1.0)
    a = [sample_next(logits, cfg, torch.Generator().manual_seed(7)) for _ in range(3)]
    b = [sample_next(logits, cfg, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a == b
    g = torch.Generator().manual_seed(0)
    assert len({sample_next(logits, cfg, g) for _ in range(200)}) > 20


def test_top_p_keeps_only_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.75 keeps the first two tokens only.
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.75), g) for _ in range(300)}
    assert picks == {0, 1}


@pytest.mark.parametrize("kwargs, msg", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p")])
def test_bad_sampling_settings(kwargs, msg):
    with pytest.raises(OffloadkitError, match=msg):
        SamplingConfig(**kwargs)


class CountingLM:
    """A fake engine whose next token is always (last token + 1) mod V; counts the tokens it is fed."""

    V = 10

    def __init__(self):
        self.fed: list[int] = []

    def new_cache(self, batch=1, max_len=None):
        return object()

    def forward(self, input_ids, cache=None):
        self.fed.append(input_ids.shape[1])
        last = input_ids[0, -1]
        logits = torch.full((1, input_ids.shape[1], self.V), -1e9)
        logits[0, -1, (last + 1) % self.V] = 0.0
        return logits


def test_generate_prefills_once_then_decodes_one_token_at_a_time():
    lm = CountingLM()
    out = list(generate_ids(lm, [3, 4, 5], 6))
    assert out == [6, 7, 8, 9, 0, 1]
    assert lm.fed == [3, 1, 1, 1, 1, 1]


def test_generate_stops_at_eos_and_rejects_empty_prompt():
    assert list(generate_ids(CountingLM(), [1], 10, stop_ids=(4,))) == [2, 3, 4]
    with pytest.raises(OffloadkitError, match="prompt is empty"):
        list(generate_ids(CountingLM(), [], 4))


# ---- the model's context ----------------------------------------------------------------------------

class Spec:
    max_position_embeddings = 8


class ContextLM(CountingLM):
    """A CountingLM that says its context is 8 positions, and fails if it is fed past them."""

    spec = Spec()

    def new_cache(self, batch=1, max_len=None):
        assert max_len <= self.spec.max_position_embeddings, f"a cache of {max_len} positions"
        return super().new_cache(batch, max_len)

    def forward(self, input_ids, cache=None):
        out = super().forward(input_ids, cache)
        assert sum(self.fed) <= self.spec.max_position_embeddings, f"fed {sum(self.fed)} positions"
        return out


def test_context_room_counts_the_prompt():
    assert context_room(5, 100, 16) == 11
    assert context_room(5, 3, 16) == 3
    assert context_room(5, 100, None) == 100
    assert context_room(16, 0, 16) == 0


@pytest.mark.parametrize("prompt, asked, message", [
    (17, 1, "the prompt is 17 tokens, longer than the model's context of 16 positions"),
    (17, 0, "longer than the model's context"),
    (16, 1, "the prompt is 16 tokens, the model's whole context of 16 positions"),
    (3, -1, "max_new_tokens must be >= 0, got -1"),
])
def test_context_room_refuses_what_does_not_fit(prompt, asked, message):
    with pytest.raises(OffloadkitError) as e:
        context_room(prompt, asked, 16)
    assert message in str(e.value)


def test_generation_stops_at_the_models_context():
    lm = ContextLM()
    assert model_context(lm) == 8 and model_context(CountingLM()) is None
    out = list(generate_ids(lm, [1, 2, 3], 100))
    assert out == [4, 5, 6, 7, 8]  # 3 prompt + 5 new = 8 positions; the last token is never fed
    assert lm.fed == [3, 1, 1, 1, 1]
    assert list(generate_ids(ContextLM(), [1, 2, 3], 100, context=5)) == [4, 5]  # an explicit context wins
    with pytest.raises(OffloadkitError, match="longer than the model's context of 8"):
        list(generate_ids(ContextLM(), list(range(9)), 1))


class ByteTokenizer:
    """The smallest tokenizer stream_text needs: one id per character."""

    eos_ids = ()

    def encode(self, text):
        return [ord(c) % 10 for c in text]

    def stream(self):
        class Stream:
            def push(self, token):
                return str(token)

            def flush(self):
                return ""
        return Stream()


class HoldingTokenizer(ByteTokenizer):
    """A stream that, like a byte-level decoder mid-character, holds its last piece until ``flush``."""

    def stream(self):
        class Stream:
            held = ""

            def push(self, token):
                text, self.held = self.held, str(token)
                return text

            def flush(self):
                text, self.held = self.held, ""
                return text
        return Stream()


def test_stream_text_prints_what_the_decoder_held_back_at_the_end():
    out = io.StringIO()
    new = stream_text(ContextLM(), HoldingTokenizer(), "ab", 3, out=out, err=io.StringIO())
    assert new == [9, 0, 1]
    assert out.getvalue().startswith("ab901\n[measured on ")  # the held '1' is not lost


def test_stream_text_keeps_the_text_and_says_where_the_context_ended():
    out, err = io.StringIO(), io.StringIO()
    new = stream_text(ContextLM(), ByteTokenizer(), "ab", 50, out=out, err=err)  # 'a' -> 7, 'b' -> 8
    assert new == [9, 0, 1, 2, 3, 4]
    assert out.getvalue().startswith("ab901234\n[measured on ")
    assert err.getvalue() == ("note: stopped after 6 of the 50 new tokens asked for: the prompt (2 tokens) and the "
                              "text now fill the model's context of 8 positions (max_position_embeddings)\n")
    err = io.StringIO()
    assert stream_text(ContextLM(), ByteTokenizer(), "ab", 6, out=io.StringIO(), err=err) == new
    assert err.getvalue() == ""  # exactly what was asked for: nothing to say
    out = io.StringIO()
    with pytest.raises(OffloadkitError, match="the prompt is 9 tokens, longer"):
        stream_text(ContextLM(), ByteTokenizer(), "abcdefghi", 1, out=out)
    assert out.getvalue() == ""  # refused before anything is printed
