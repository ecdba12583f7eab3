"""offloadkit: hybrid CPU-GPU inference of large language models on one moderate GPU.

A reimplementation of the engine described in *Task Scheduling for Efficient Inference of Large
Language Models on Single Moderate GPU Systems* (arXiv 2411.15715, "ScheInfer") from its published
description. The cost model and the algorithms are offloadkit's own formulation.
"""

from offloadkit.errors import (
    CheckpointError,
    ConfigError,
    CudaUnavailableError,
    DTypeError,
    KernelInputError,
    ModelNotFoundError,
    OffloadkitError,
    PlanError,
    ProfileError,
    TaskGraphError,
    ThreadingLayerError,
    TraceError,
    UnsupportedArchitectureError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CudaUnavailableError",
    "DTypeError",
    "KernelInputError",
    "ModelNotFoundError",
    "OffloadkitError",
    "PlanError",
    "ProfileError",
    "TaskGraphError",
    "ThreadingLayerError",
    "TraceError",
    "UnsupportedArchitectureError",
    "__version__",
]
