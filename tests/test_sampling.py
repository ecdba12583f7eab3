"""The sampler: greedy is argmax, seeded sampling is reproducible, top-p keeps the nucleus only."""

import pytest
import torch

from offloadkit.errors import OffloadkitError
from offloadkit.model.generate import SamplingConfig, generate_ids, sample_next


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
