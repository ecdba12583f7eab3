"""Where offloadkit finds its data: the model zoo, the demo checkpoint, hardware profiles.

The data lives in the repository's top-level ``data/`` folder (beside the package). The environment
variable ``OFFLOADKIT_DATA`` points elsewhere when the package is installed without the repository.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The root of offloadkit's data folder."""
    env = os.environ.get("OFFLOADKIT_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "data"


def zoo_dir() -> Path:
    """Published configs of the paper's models, one folder each."""
    return data_dir() / "models" / "zoo"


def demo_model_dir() -> Path:
    """The small trained Mixtral-architecture checkpoint that ``offloadkit demo`` runs."""
    return data_dir() / "models" / "demo-mixtral"
