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


class ModelNotFoundError(OffloadkitError):
    """A model name or path that resolves to nothing."""
