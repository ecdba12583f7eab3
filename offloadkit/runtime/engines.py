"""One call from an engine name and a model to a runnable engine and its tokenizer.

``offloadkit generate --engine cpu`` and the notebooks pick an engine by name here; every engine
has ``new_cache``, ``forward(ids, cache)`` and ``engine_name``, which is all
:mod:`offloadkit.model.generate` needs. It refuses names it does not know, listing the ones it does.
"""

from __future__ import annotations

from pathlib import Path

from offloadkit.errors import OffloadkitError
from offloadkit.model.checkpoint import open_checkpoint
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.tokenizer import Tokenizer, load_tokenizer
from offloadkit.model.zoo import resolve_model

#: ``reference``: the plain PyTorch oracle; ``cpu``: the whole model on offloadkit's CPU kernels.
ENGINES: tuple[str, ...] = ("reference", "cpu")


def load_engine(name: str, model_dir: str | Path) -> tuple[ReferenceModel, Tokenizer]:
    """Open the checkpoint (memory-mapped) under engine ``name``; return (engine, tokenizer)."""
    if name not in ENGINES:
        raise OffloadkitError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    folder = resolve_model(model_dir)
    ckpt = open_checkpoint(folder)
    if name == "cpu":
        from offloadkit.runtime.cpu_engine import CpuEngine

        return CpuEngine(ckpt.spec, ckpt), load_tokenizer(folder)
    return ReferenceModel(ckpt.spec, ckpt), load_tokenizer(folder)


__all__ = ["ENGINES", "load_engine"]
