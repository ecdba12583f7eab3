"""TiledTrace: the demo model's recorded routing (4 layers) replayed onto Mixtral-8x7B's 32 layers."""

from __future__ import annotations

import numpy as np
import pytest
from sim_fixtures import tiny

from offloadkit.errors import TraceError
from offloadkit.model.zoo import load_spec
from offloadkit.plan.routing import Routing, RoutingTrace, counts_from_choices, moe_layers
from offloadkit.plan.trace_tiling import TiledTrace, layer_permutation

MIXTRAL = load_spec("mixtral-8x7b")
TRACE = RoutingTrace.load("demo-mixtral-pydoc.npz")


@pytest.fixture(scope="module")
def tiled() -> TiledTrace:
    return TiledTrace.load("demo-mixtral-pydoc.npz", MIXTRAL)


def test_label_names_the_trace_and_the_tiling(tiled: TiledTrace):
    assert tiled.label == "trace:demo-mixtral-pydoc tiled 4→32 layers"
    routing: Routing = tiled  # the Routing protocol
    assert routing.step_counts(MIXTRAL, [3]).shape == (1, 32, 8)


@pytest.mark.parametrize("steps", [[512] + [1] * 128, [7, 1, 1], [1000]])  # 640 and 1000 tokens wrap the 320
def test_counts_per_step_sum_to_tokens_times_top_k(tiled: TiledTrace, steps: list[int]):
    counts = tiled.step_counts(MIXTRAL, steps)
    assert counts.shape == (len(steps), 32, 8)
    assert (counts >= 0).all()
    assert (counts.sum(axis=2) == np.asarray(steps)[:, None] * MIXTRAL.top_k).all()


def test_each_tiled_layer_has_its_trace_layers_histogram_up_to_its_permutation(tiled: TiledTrace):
    counts = tiled.step_counts(MIXTRAL, TRACE.step_tokens.tolist()).sum(axis=0)  # the trace's own stream once
    recorded = counts_from_choices(TRACE.experts, TRACE.n_experts)  # [4, 8]
    for j in range(32):
        source = recorded[j % 4]
        perm = layer_permutation(8, j)
        assert (counts[j, perm] == source).all()  # trace expert e is model expert perm[e]
        assert sorted(counts[j]) == sorted(source)
        assert (tiled.choices()[j] == perm[TRACE.experts[j % 4]]).all()  # token by token, pairs kept together


def test_tiles_are_not_identical_copies(tiled: TiledTrace):
    counts = tiled.step_counts(MIXTRAL, [320]).sum(axis=0)
    for j in range(4, 32):
        assert tiled.source_layer(j) == j % 4
    assert any((counts[j] != counts[j % 4]).any() for j in range(4, 32))
    assert len({tuple(tiled.permutation(j)) for j in range(32)}) > 1


def test_seeded_and_independent_of_the_model_size():
    a = TiledTrace(TRACE, MIXTRAL, seed=0).step_counts(MIXTRAL, [64, 1, 1])
    assert (a == TiledTrace(TRACE, MIXTRAL, seed=0).step_counts(MIXTRAL, [64, 1, 1])).all()
    assert not (a == TiledTrace(TRACE, MIXTRAL, seed=1).step_counts(MIXTRAL, [64, 1, 1])).all()
    small, _ = tiny("mixtral", layers=6, experts=8, top_k=2)
    b = TiledTrace(TRACE, small).step_counts(small, [64, 1, 1])
    assert (b == a[:, :6]).all()  # a layer's permutation depends on its index, not on the layer count


def test_dense_layers_of_a_moe_model_get_no_tokens_and_are_not_counted_as_tiles():
    spec, _ = tiny("qwen2_moe", layers=6, experts=8, top_k=2, mlp_only_layers=[1, 4])
    t = TiledTrace(TRACE, spec)
    assert t.label.endswith("4→4 layers")
    counts = t.step_counts(spec, [10, 1])
    assert (counts[:, [1, 4]] == 0).all()
    assert (counts[:, moe_layers(spec)].sum(axis=2) == np.array([[20], [2]])).all()


@pytest.mark.parametrize("model, what", [("phi-3.5-moe", "16 experts, top-2"),
                                         ("qwen1.5-moe-a2.7b", "60 experts, top-4"),
                                         ("qwen2-57b-a14b", "64 experts, top-8")])
def test_refuses_a_model_whose_experts_or_top_k_differ(model: str, what: str):
    with pytest.raises(TraceError) as e:
        TiledTrace.load("demo-mixtral-pydoc.npz", load_spec(model))
    msg = str(e.value)
    assert f"cannot tile the trace of demo-mixtral (8 experts, top-2) onto {model} ({what})" in msg
    assert "number of experts and top-k must be the trace's" in msg


def test_refuses_a_top_k_mismatch_alone_and_a_dense_model():
    top1, _ = tiny("mixtral", layers=2, experts=8, top_k=1)
    with pytest.raises(TraceError, match=r"\(8 experts, top-1\)"):
        TiledTrace(TRACE, top1)
    with pytest.raises(TraceError, match="llama-2-7b has no experts"):
        TiledTrace(TRACE, load_spec("llama-2-7b"))


def test_step_counts_refuses_another_model_than_it_was_tiled_for(tiled: TiledTrace):
    other, _ = tiny("mixtral", layers=6, experts=8, top_k=2)
    with pytest.raises(TraceError, match="does not match"):
        tiled.step_counts(other, [4])
