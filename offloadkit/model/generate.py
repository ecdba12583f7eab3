"""Token-by-token generation over any engine that maps token ids to logits with a KV cache.

Greedy decoding (``temperature == 0``) is the default because it makes engines comparable token
for token; seeded temperature / top-p sampling is there for people who want to read the text.
The sampler works on one row of f32 logits and draws from a ``torch.Generator`` of its own, so a
seed gives the same text on every run and every engine.

Generation stops at the model's context (``max_position_embeddings``: the prompt counts), where its
positions run out and it would write gibberish, and says so; a prompt that does not fit is refused.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, TextIO

import torch

from offloadkit.errors import OffloadkitError
from offloadkit.hardware.machine import machine_label


class CausalLM(Protocol):
    """What generation needs of an engine: a cache and a forward over new tokens."""

    def new_cache(self, batch: int = 1, max_len: int | None = None): ...

    def forward(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor: ...

    # optional: ``spec.max_position_embeddings``, the context generation stops at (see model_context)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise OffloadkitError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise OffloadkitError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> int:
    """Pick the next token from a 1-D row of logits."""
    if cfg.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < cfg.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def model_context(model: object) -> int | None:
    """Positions the model was built for (``spec.max_position_embeddings``); ``None`` if it does not say."""
    return getattr(getattr(model, "spec", None), "max_position_embeddings", None)


def context_room(prompt_tokens: int, max_new_tokens: int, context: int | None) -> int:
    """How many of ``max_new_tokens`` fit after a prompt of ``prompt_tokens`` in ``context`` positions.

    The prompt and the generated text together hold at most ``context`` tokens (as ``max_length`` in
    transformers): ``context_room(5, 100, 16) -> 11``. A prompt longer than the context, or one that
    fills it while tokens are asked for, is refused: the model has no position left to write to.
    """
    if max_new_tokens < 0:
        raise OffloadkitError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if context is None:
        return max_new_tokens
    if prompt_tokens > context:
        raise OffloadkitError(f"the prompt is {prompt_tokens} tokens, longer than the model's context of {context} "
                              f"positions (max_position_embeddings): shorten it")
    if prompt_tokens == context and max_new_tokens > 0:
        raise OffloadkitError(f"the prompt is {prompt_tokens} tokens, the model's whole context of {context} positions "
                              f"(max_position_embeddings): there is no room to generate; shorten it")
    return min(max_new_tokens, context - prompt_tokens)


def generate_ids(model: CausalLM, prompt_ids: list[int], max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), stop_ids: tuple[int, ...] = (),
                 context: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time: one prefill over the prompt, then one decode step each.

    It stops at ``stop_ids``, after ``max_new_tokens``, or when the prompt and the new tokens fill the
    model's ``context`` (default: :func:`model_context`), whichever comes first: past its context a
    model's positions mean nothing and it writes gibberish. See :func:`context_room` for what it refuses.
    """
    if not prompt_ids:
        raise OffloadkitError("the prompt is empty: give at least one token")
    max_new_tokens = context_room(len(prompt_ids), max_new_tokens,
                                  model_context(model) if context is None else context)
    if max_new_tokens == 0:
        return
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator().manual_seed(sampling.seed)
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    # only the last position's logits are sampled: engines that can skip the others (logits_modes) do
    last = {"logits": "last"} if "last" in getattr(model, "logits_modes", ()) else {}
    with torch.no_grad():
        logits = model.forward(torch.tensor([prompt_ids]), cache, **last)
        for i in range(max_new_tokens):
            token = sample_next(logits[0, -1], sampling, generator)
            yield token
            if token in stop_ids or i == max_new_tokens - 1:
                return
            logits = model.forward(torch.tensor([[token]]), cache, **last)


def stream_text(model: CausalLM, tokenizer, prompt: str, max_new_tokens: int,
                sampling: SamplingConfig = SamplingConfig(), out: TextIO | None = None,
                err: TextIO | None = None) -> list[int]:
    """Print the prompt and its continuation as tokens come; return the new token ids.

    The closing line reports the speed, labelled as measured on this machine with this engine. If the
    model's context ends the text before ``max_new_tokens``, a note on ``err`` (default stderr) says so;
    the text generated up to there is kept.
    """
    out = out or sys.stdout
    ids = tokenizer.encode(prompt)
    context = model_context(model)
    room = context_room(len(ids), max_new_tokens, context)  # refuses before anything is printed
    stream = tokenizer.stream()
    out.write(prompt)
    out.flush()
    new: list[int] = []
    eos = tuple(tokenizer.eos_ids)
    t0 = time.perf_counter()
    for token in generate_ids(model, ids, room, sampling, stop_ids=eos, context=context):
        new.append(token)
        out.write(stream.push(token))
        out.flush()
    out.write(stream.flush())  # bytes of a character the last token left unfinished
    elapsed = time.perf_counter() - t0
    engine = getattr(model, "engine_name", type(model).__name__)
    out.write(f"\n[measured on {machine_label(torch.get_num_threads())}: {len(new)} tokens in {elapsed:.2f} s "
              f"({len(new) / max(elapsed, 1e-9):.1f} tokens/s, prefill included), engine: {engine}]\n")
    out.flush()
    if room < max_new_tokens and len(new) == room and not (new and new[-1] in eos):
        (err or sys.stderr).write(
            f"note: stopped after {len(new)} of the {max_new_tokens} new tokens asked for: the prompt ({len(ids)} "
            f"tokens) and the text now fill the model's context of {context} positions (max_position_embeddings)\n")
    return new
