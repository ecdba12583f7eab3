"""The one model loader: an engine name and a model name or folder -> a runnable engine and its tokenizer.

Everything that runs a model (``offloadkit generate``, the demo, the notebooks, the tests) opens it
here: the checkpoint memory-mapped (:func:`~offloadkit.model.checkpoint.open_checkpoint`), wrapped in
the engine asked for, with the tokenizer of the same folder. Every engine has ``new_cache``,
``forward(ids, cache)`` and ``engine_name``, which is all :mod:`offloadkit.model.generate` needs.
It lives in ``runtime`` (not ``model``) because engines other than the reference are runtime parts.
It refuses names it does not know, listing the ones it does.
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
