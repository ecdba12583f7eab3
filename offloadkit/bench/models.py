"""Benchmark models: checkpoints of realistic shape with random weights, made on first use and cached.

Speed on a CPU depends on a model's shapes (how many bytes a token reads, how wide each matmul is),
not on what its weights learned, so a benchmark needs a model of real proportions and nothing from
a hub. ``bench_model("bench-moe", "bfloat16")`` writes one (once: a second call finds it) through
:func:`offloadkit.model.writer.write_checkpoint`, whose random weights are a pure function of the seed
and the tensor name: every machine that makes ``bench-moe`` holds the same numbers, so offloadkit's
engine and llama.cpp (through :mod:`offloadkit.bench.gguf_export`) read the same weights.

The set spans what the simulator is calibrated on (docs/DESIGN.md, calibration): MoE and dense, from
~100 M to ~1 B parameters. ``bench-moe`` (Mixtral's architecture and proportions: GQA 4:1, 8 experts,
top-2, a 32000-token vocabulary) is the default of ``offloadkit bench``.

The cache is ``$OFFLOADKIT_CACHE`` or ``~/.cache/offloadkit``; a folder is only used when its
``config.json`` says what was asked for (a write interrupted midway leaves no ``.complete`` stamp and
is made again).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from offloadkit.errors import ModelNotFoundError
from offloadkit.model.dtypes import normalize_dtype

#: name -> (architecture, make_config keywords). Parameter counts are in the docstrings of the README table.
BENCH_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    # 1.02 B parameters; a decode step reads 0.35 B of them (2 of 8 experts).
    "bench-moe": ("mixtral", dict(layers=8, hidden=2048, heads=16, kv_heads=4, experts=8, top_k=2,
                                  intermediate=2048, vocab=32000)),
    # 0.11 B parameters; the small end of the calibration set.
    "bench-moe-small": ("mixtral", dict(layers=4, hidden=768, heads=12, kv_heads=4, experts=8, top_k=2,
                                        intermediate=1024, vocab=32000)),
    # 0.93 B parameters, every one read by every token.
    "bench-dense": ("llama", dict(layers=16, hidden=2048, heads=16, kv_heads=4, intermediate=5632,
                                  vocab=32000)),
    # 0.12 B parameters.
    "bench-dense-small": ("llama", dict(layers=8, hidden=768, heads=12, kv_heads=4, intermediate=2048,
                                        vocab=32000)),
}
DEFAULT_BENCH_MODEL = "bench-moe"
SEED = 2411  # arXiv 2411.15715
_STAMP = ".complete"


def cache_dir() -> Path:
    """Where generated benchmark checkpoints (and their GGUF exports) are kept."""
    env = os.environ.get("OFFLOADKIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "offloadkit"


def bench_config(name: str, dtype: str = "bfloat16") -> dict[str, Any]:
    """The ``config.json`` dict of benchmark model ``name`` in ``dtype``."""
    from offloadkit.model.writer import make_config

    if name not in BENCH_MODELS:
        raise ModelNotFoundError(f"no benchmark model {name!r}; there are {', '.join(BENCH_MODELS)}")
    arch, kw = BENCH_MODELS[name]
    return make_config(arch, dtype=normalize_dtype(dtype), **kw)


def is_bench_model(name: str | Path) -> bool:
    return str(name) in BENCH_MODELS


def bench_model(name: str = DEFAULT_BENCH_MODEL, dtype: str = "bfloat16", *, progress: bool = True) -> Path:
    """The folder of benchmark model ``name`` in ``dtype``, written first if the cache lacks it."""
    from offloadkit.model.writer import write_checkpoint

    dtype = normalize_dtype(dtype)
    config = bench_config(name, dtype)
    out = cache_dir() / "models" / f"{name}-{dtype}"
    if (out / _STAMP).exists():
        return out
    if progress:
        print(f"making benchmark model {name} ({dtype}, random weights, seed {SEED}) in {out} ...", flush=True)
    write_checkpoint(out, config, seed=SEED)
    (out / _STAMP).write_text("")
    return out


__all__ = ["BENCH_MODELS", "DEFAULT_BENCH_MODEL", "SEED", "bench_config", "bench_model", "cache_dir",
           "is_bench_model"]
