"""The model zoo: published configs of the paper's models, found by short name.

``data/models/zoo/<name>/config.json`` holds the config of each model the paper evaluates, exactly
as published, so offloadkit can reason about a full-size Mixtral-8x7B (plan it, simulate it, count
its bytes) without its 90 GB of weights. Anything that takes a model accepts either a zoo name or a
path to a local folder with a ``config.json``.
"""

from __future__ import annotations

from pathlib import Path

from offloadkit.errors import ModelNotFoundError
from offloadkit.model.spec import ModelSpec
from offloadkit.paths import demo_model_dir, zoo_dir


def zoo_names() -> list[str]:
    """Short names of the zoo's models, sorted."""
    root = zoo_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def resolve_model(name_or_path: str | Path) -> Path:
    """A zoo name, ``demo``, or a folder / ``config.json`` path -> the model's folder."""
    text = str(name_or_path)
    if text == "demo":
        return demo_model_dir()
    if text in zoo_names():
        return zoo_dir() / text
    p = Path(text).expanduser()
    if p.name == "config.json" and p.is_file():
        return p.parent
    if p.exists():
        return p
    known = ", ".join(["demo", *zoo_names()])
    raise ModelNotFoundError(f"no model named {text!r}: give a folder with a config.json, or one of: {known}")


def load_spec(name_or_path: str | Path) -> ModelSpec:
    """The :class:`ModelSpec` of a zoo model or a local model folder."""
    return ModelSpec.from_file(resolve_model(name_or_path))
