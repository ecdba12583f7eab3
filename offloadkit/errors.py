"""The package's own exception types.

Every error a user can cause (a bad path, a broken checkpoint, a config the package does not
understand) is raised as one of these, with a message that says what was wrong and what to do.
The CLI catches :class:`OffloadkitError` and prints the message without a traceback; anything else
that escapes is a bug in offloadkit.
"""

from __future__ import annotations


class OffloadkitError(Exception):
    """Base class of every error offloadkit raises on purpose."""


class ConfigError(OffloadkitError):
    """A model config (``config.json``) is missing, unreadable or incomplete."""


class UnsupportedArchitectureError(ConfigError):
    """The config names an architecture offloadkit does not implement."""


class CheckpointError(OffloadkitError):
    """A weights file is missing, truncated, corrupt, or does not match the config."""


class DTypeError(CheckpointError):
    """A tensor is stored in a dtype offloadkit cannot compute with."""


class KernelInputError(OffloadkitError, ValueError):
    """Arguments a kernel (CPU or CUDA) cannot compute with: wrong shapes, dtypes, slices or layouts."""


class ModelNotFoundError(OffloadkitError):
    """A model name or path that resolves to nothing."""


class PlanError(OffloadkitError):
    """A plan that cannot run: it does not fit the GPU's memory, needs a GPU the profile lacks, or is unknown."""


class TaskGraphError(OffloadkitError):
    """A task graph with a cycle, a dependency on a missing task, or a task on an unknown lane."""


class TraceError(OffloadkitError):
    """A routing trace file that is missing, unreadable, or does not match the model."""


class ProfileError(OffloadkitError):
    """A hardware profile is unknown, unreadable, incomplete, or has a figure without a source."""


class CudaUnavailableError(OffloadkitError):
    """CUDA was asked for (a GPU kernel, a CUDA device) where there is none: no CuPy, no driver, no GPU."""


class ThreadingLayerError(OffloadkitError):
    """Numba has no thread-safe threading layer here (only workqueue), or was already started on workqueue."""


class BenchError(OffloadkitError):
    """A benchmark cannot run: llama.cpp is not built, llama-bench failed, a model cannot be exported."""


class DeviceError(OffloadkitError):
    """A device (CUDA or the loopback stand-in) failed: a kernel or copy raised, or the device was closed."""


class DeviceTimeout(DeviceError):
    """A wait on a device exceeded its bound (a stalled copy or kernel), instead of hanging."""


class ExecutorError(OffloadkitError):
    """A task of the hybrid executor failed; the message names the task and its lane."""
