"""Subcommands of ``offloadkit`` that belong to ``offloadkit.kernels`` (registered by ``offloadkit.cli``)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``offloadkit`` parser."""
