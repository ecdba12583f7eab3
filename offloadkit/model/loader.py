"""One call from a model name or folder to a runnable reference model and its tokenizer."""

from __future__ import annotations

from pathlib import Path

from offloadkit.model.checkpoint import open_checkpoint
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.tokenizer import Tokenizer, load_tokenizer
from offloadkit.model.zoo import resolve_model


def load_reference(name_or_path: str | Path) -> tuple[ReferenceModel, Tokenizer]:
    """Open a checkpoint memory-mapped and wrap it in the reference engine, with its tokenizer."""
    folder = resolve_model(name_or_path)
    ckpt = open_checkpoint(folder)
    return ReferenceModel(ckpt.spec, ckpt), load_tokenizer(folder)
