"""Hardware profiles: the catalog of moderate machines, the loader, and the probe of this machine.

``profile`` holds the dataclasses, ``catalog`` reads and validates TOML, ``toml_writer`` writes it,
``probe`` (with ``probe_cuda``) measures the machine it runs on, ``commands`` is the CLI.
"""

from offloadkit.hardware.catalog import catalog_names, load_catalog, load_profile
from offloadkit.hardware.profile import (
    CpuProfile,
    Curve,
    Derivation,
    GpuProfile,
    HardwareProfile,
    LinkProfile,
    canonical_dtype,
)
from offloadkit.hardware.toml_writer import profile_to_toml, save_profile

__all__ = [
    "CpuProfile",
    "Curve",
    "Derivation",
    "GpuProfile",
    "HardwareProfile",
    "LinkProfile",
    "canonical_dtype",
    "catalog_names",
    "load_catalog",
    "load_profile",
    "profile_to_toml",
    "save_profile",
]
