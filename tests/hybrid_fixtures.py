"""What the hybrid engine's tests share: tiny models in f32 or bf16 (the thread check is in conftest.py)."""

from __future__ import annotations

import functools

import torch
from sim_fixtures import tiny

from offloadkit.model.spec import ModelSpec
from offloadkit.model.writer import make_config


@functools.cache
def model(arch: str, dtype: str = "float32") -> tuple[ModelSpec, dict]:
    """A tiny 2-layer model; ``bfloat16``: the same weights converted, under a bf16 config."""
    spec, weights = tiny(arch, layers=2)
    if dtype == "float32":
        return spec, weights
    spec = ModelSpec.from_config(make_config(arch, layers=2, dtype=dtype), name=f"tiny-{arch}-{dtype}")
    return spec, {n: t.to(getattr(torch, dtype)) for n, t in weights.items()}
