"""Routing for the simulator: synthetic choices (uniform, Zipf) and recorded traces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sim_fixtures import tiny

from offloadkit.errors import PlanError, TraceError
from offloadkit.model.expert_usage import expert_counts, normalized_entropy
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.zoo import load_spec
from offloadkit.paths import data_dir
from offloadkit.plan.routing import (
    RoutingTrace,
    SyntheticRouting,
    counts_from_choices,
    parse_routing,
    record_trace,
)

MIXTRAL = load_spec("mixtral-8x7b")


def test_counts_from_choices_example():
    choices = np.array([[[0, 1], [1, 2]], [[3, 3], [0, 2]]])
    assert counts_from_choices(choices, 4).tolist() == [[1, 2, 1, 0], [1, 0, 1, 2]]


def test_uniform_routing_picks_distinct_experts_evenly_and_reproducibly():
    r = SyntheticRouting(0.0, seed=3)
    c = r.choices(MIXTRAL, 4000)
    assert c.shape == (32, 4000, 2)
    assert (c[..., 0] != c[..., 1]).all()
    share = counts_from_choices(c, 8) / (4000 * 2)
    assert np.abs(share - 1 / 8).max() < 0.02
    assert (r.choices(MIXTRAL, 50) == SyntheticRouting(0.0, seed=3).choices(MIXTRAL, 50)).all()
    assert not (r.choices(MIXTRAL, 50) == SyntheticRouting(0.0, seed=4).choices(MIXTRAL, 50)).all()


def test_zipf_routing_is_skewed_per_layer():
    r = SyntheticRouting(1.2, seed=0)
    p = r.probabilities(MIXTRAL)
    assert p.shape == (32, 8) and np.allclose(p.sum(1), 1)
    assert (p.argmax(1) != p.argmax(1)[0]).any()  # each layer has its own hot expert
    share = counts_from_choices(r.choices(MIXTRAL, 4000), 8) / 8000
    hot = share.max(1)
    assert (hot > 0.25).all()  # uniform would be 0.125
    entropies = [normalized_entropy(torch.tensor(row)) for row in counts_from_choices(r.choices(MIXTRAL, 4000), 8)]
    assert max(entropies) < 0.95


def test_step_counts_split_tokens_by_step_and_skip_dense_layers():
    spec, _ = tiny("qwen2_moe", layers=3, mlp_only_layers=[1])
    counts = SyntheticRouting(0.0).step_counts(spec, [7, 1, 1])
    assert counts.shape == (3, 3, 4)
    assert counts[:, 1].sum() == 0  # the dense layer
    assert counts[0, 0].sum() == 7 * 2 and counts[1, 2].sum() == 2


def test_record_save_load_replay(tmp_path):
    spec, weights = tiny("mixtral", layers=2)
    model = ReferenceModel(spec, weights)
    prompt = list(range(3, 13))
    trace = record_trace(model, prompt, 4, meta={"source": "measured"})
    assert trace.step_tokens.tolist() == [10, 1, 1, 1, 1] and trace.experts.shape == (2, 14, 2)
    # the prefill's choices are the ones the reference model records
    prefill = expert_counts(model, prompt)
    assert counts_from_choices(trace.experts[:, :10], 4).tolist() == [prefill[0].tolist(), prefill[1].tolist()]
    path = trace.save(tmp_path / "t.npz")
    back = RoutingTrace.load(path)
    assert (back.experts == trace.experts).all() and back.meta == {"source": "measured"} and back.layers == (0, 1)
    # replay onto a longer workload wraps around the token stream
    counts = back.step_counts(spec, [10, 1, 1, 1, 1, 1])
    assert counts.sum(axis=2).tolist() == [[20, 20]] + [[2, 2]] * 5
    assert (counts[5] == counts_from_choices(trace.experts[:, :1], 4)).all()  # token 14 is token 0 again
    assert isinstance(parse_routing(f"trace:{path}"), RoutingTrace)


def test_trace_errors(tmp_path):
    spec, weights = tiny("mixtral", layers=2)
    trace = record_trace(ReferenceModel(spec, weights), [5, 6, 7], 1)
    other, _ = tiny("mixtral", layers=3)
    with pytest.raises(TraceError, match="does not match"):
        trace.step_counts(other, [3])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="cannot read routing trace"):
        RoutingTrace.load(bad)
    llama, w = tiny("llama")
    with pytest.raises(TraceError, match="no experts"):
        record_trace(ReferenceModel(llama, w), [1, 2], 1)


def test_parse_routing():
    assert parse_routing(None) == SyntheticRouting(0.0)
    assert parse_routing("zipf:1.5", seed=2) == SyntheticRouting(1.5, 2)
    assert parse_routing("zipf:0").label == "uniform"
    for bad in ("zipf:-1", "zipf:abc", "popular"):
        with pytest.raises(PlanError):
            parse_routing(bad)


@pytest.mark.parametrize("text, message", [
    ("zipf", "routing 'zipf' needs its exponent: zipf:S"),  # was read as zipf:1.2
    ("zipf:", "finite exponent S >= 0"),
    ("zipf:inf", "finite exponent S >= 0"),
    ("zipf:nan", "finite exponent S >= 0"),
    ("zipf=1.2", "unknown routing 'zipf=1.2': the routings are uniform, zipf:S, trace:PATH"),
    ("Uniform", "unknown routing 'Uniform': the routings are uniform, zipf:S, trace:PATH"),
    (" uniform", "unknown routing ' uniform'"),
    ("trace:", "names no file: give trace:PATH"),
])
def test_parse_routing_accepts_only_the_exact_forms(text, message):
    with pytest.raises(PlanError) as e:
        parse_routing(text)
    assert message in str(e.value)


DEMO_TRACE = data_dir() / "traces" / "demo-mixtral-pydoc.npz"


@pytest.mark.skipif(not DEMO_TRACE.exists(), reason="the demo trace is recorded by data/traces/record_demo_trace.py")
def test_the_recorded_demo_trace_loads_and_is_not_uniform():
    trace = RoutingTrace.load("demo-mixtral-pydoc.npz")
    assert trace.meta["source"] == "measured" and len(trace.step_tokens) == trace.meta["gen_tokens"] + 1
    counts = counts_from_choices(trace.experts, trace.n_experts)
    assert min(normalized_entropy(torch.tensor(c)) for c in counts) < 0.98
    if (data_dir() / "models" / "demo-mixtral" / "config.json").exists():
        trace.check(load_spec("demo"))
