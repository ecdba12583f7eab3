"""Names for the machine a measurement was taken on: every **measured** figure carries one.

``cpu_model()`` is the CPU's marketing name; ``cpu_features()`` the instruction-set extensions the CPU
kernels choose their paths by (``("AVX2", "FMA", "F16C")``, or with ``"AVX512_BF16"`` where the CPU has
native bf16 dot products); ``machine_label()`` puts them together with the threads the kernels use
(``"AMD EPYC 7B13 (AVX2 FMA F16C), 2 threads"``). The same model name can come with different features
from one VM to the next, so every measured figure names both. Kept apart from the probe so that
anything that prints a measured number (generation speed, benchmarks, the CPU engine's timeline) can
say where it was measured without importing the probe.
"""

from __future__ import annotations

import functools
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


#: The extensions that decide a CPU kernel's path, as ``/proc/cpuinfo`` spells them -> as printed, widest first.
FEATURES = (("amx_bf16", "AMX_BF16"), ("avx512_bf16", "AVX512_BF16"), ("avx512f", "AVX512F"), ("avx2", "AVX2"),
            ("fma", "FMA"), ("f16c", "F16C"))


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_features() -> tuple[str, ...]:
    """The kernel-relevant extensions this CPU has, widest first: ``("AVX2", "FMA", "F16C")`` on a Zen 3."""
    flags = cpu_flags()
    return tuple(name for flag, name in FEATURES if flag in flags)


def has_feature(name: str) -> bool:
    """True when the CPU has extension ``name`` (a printed name of :data:`FEATURES`, e.g. ``"AVX512_BF16"``)."""
    return name in cpu_features()


def cpu_label() -> str:
    """``"AMD EPYC 7B13 (AVX2 FMA F16C)"``: the model and its kernel-relevant extensions."""
    return f"{cpu_model()} ({' '.join(cpu_features()) or 'no AVX2'})"


def machine_label(threads: int | None = None) -> str:
    """``"AMD EPYC 7B13 (AVX2 FMA F16C), 2 threads"``: the CPU, its extensions and the threads the kernels
    use (Numba's by default)."""
    return f"{cpu_label()}, {threads or numba.get_num_threads()} threads"
