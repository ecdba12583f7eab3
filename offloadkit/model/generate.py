"""Token-by-token generation over any engine that maps token ids to logits with a KV cache.

Greedy decoding (``temperature == 0``) is the default because it makes engines comparable token
for token; seeded temperature / top-p sampling is there for people who want to read the text.
The sampler works on one row of f32 logits and draws from a ``torch.Generator`` of its own, so a
seed gives the same text on every run and every engine.
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


def generate_ids(model: CausalLM, prompt_ids: list[int], max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yield new token ids one at a time: one prefill over the prompt, then one decode step each."""
    if not prompt_ids:
        raise OffloadkitError("the prompt is empty: give at least one token")
    if max_new_tokens <= 0:
        return
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator().manual_seed(sampling.seed)
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    with torch.no_grad():
        logits = model.forward(torch.tensor([prompt_ids]), cache)
        for i in range(max_new_tokens):
            token = sample_next(logits[0, -1], sampling, generator)
            yield token
            if token in stop_ids or i == max_new_tokens - 1:
                return
            logits = model.forward(torch.tensor([[token]]), cache)


def stream_text(model: CausalLM, tokenizer, prompt: str, max_new_tokens: int,
                sampling: SamplingConfig = SamplingConfig(), out: TextIO | None = None) -> list[int]:
    """Print the prompt and its continuation as tokens come; return the new token ids.

    The closing line reports the speed, labelled as measured on this machine with this engine.
    """
    out = out or sys.stdout
    stream = tokenizer.stream()
    out.write(prompt)
    out.flush()
    new: list[int] = []
    t0 = time.perf_counter()
    for token in generate_ids(model, tokenizer.encode(prompt), max_new_tokens, sampling,
                              stop_ids=tuple(tokenizer.eos_ids)):
        new.append(token)
        out.write(stream.push(token))
        out.flush()
    elapsed = time.perf_counter() - t0
    engine = getattr(model, "engine_name", type(model).__name__)
    out.write(f"\n[measured on {machine_label(torch.get_num_threads())}: {len(new)} tokens in {elapsed:.2f} s "
              f"({len(new) / max(elapsed, 1e-9):.1f} tokens/s, prefill included), engine: {engine}]\n")
    return new
