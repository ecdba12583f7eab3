"""Names for the machine a measurement was taken on: every **measured** figure carries one.

``cpu_model()`` is the CPU's marketing name; ``machine_label()`` adds the threads the CPU kernels use
(``"AMD EPYC 7B13, 2 threads"``). Kept apart from the probe so that anything that prints a measured
number (generation speed, benchmarks, the CPU engine's timeline) can say where it was measured
without importing the probe.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numba


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_label(threads: int | None = None) -> str:
    """``"AMD EPYC, 2 threads"``: the CPU and the threads the kernels use (Numba's by default)."""
    return f"{cpu_model()}, {threads or numba.get_num_threads()} threads"
