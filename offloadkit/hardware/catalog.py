"""Reading hardware profiles from TOML, with validation that names the field and the file.

A profile file (``data/hardware/<name>.toml`` in the catalog, or any path) has a ``name``, a
``description``, a ``[cpu]`` table, optionally ``[gpu]`` and ``[link]`` (both or neither), and
optionally ``[curves.<kind>]`` tables, and optionally ``[cpu_lane]`` (what offloadkit's CPU engine costs
beyond its matmuls, measured by ``offloadkit profile``: ``[cpu_lane.attention]`` with ``keys``,
``head_dims`` and ``gflops`` (one list per head dim), and ``[cpu_lane.task_us]``, ``task_hidden_ns``,
``element_ns`` and ``decode_ps`` tables of one figure per task kind; a file without it loads as before).
Every number is written in one of four forms::

    cores = 16                                                            # bare (not in the catalog)
    cores = { value = 16, source = "AMD product page" }
    dram_bandwidth_gbps = { peak = 83.2, effective = 0.75, source = "DDR5-5200 x 2 channels x 8 B" }
    usable_memory_gib = { total = 24.0, reserve = 1.0, source = "CUDA context + allocator slack" }

``peak`` needs an explicit ``effective`` fraction in (0, 1]; the loaded value is their product
(62.4 above). ``total - reserve`` gives usable memory. A curve table holds ``tokens``,
``seconds_per_param``, optionally ``params``, and a ``source``. Every figure is required except
``[cpu] memory_gib`` (the host's installed memory): without it the host's memory is unknown and no
plan is refused for it; given, it must be positive and, in the catalog, sourced like any other.

This module refuses: unknown keys (a typo must not silently fall back to nothing), missing fields,
zero or negative rates, booleans or strings where numbers belong, and, for files of the catalog,
any figure or curve without a ``source``. Every message starts with the file name.
"""

from __future__ import annotations

import math
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from offloadkit.errors import ProfileError
from offloadkit.hardware.profile import (
    LANE_TABLES,
    CpuLaneProfile,
    CpuProfile,
    Curve,
    Derivation,
    GpuProfile,
    HardwareProfile,
    LinkProfile,
)
from offloadkit.paths import data_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SECTIONS: dict[str, type] = {"cpu": CpuProfile, "gpu": GpuProfile, "link": LinkProfile}
#: Figures that may be zero (a fixed cost); every other figure must be strictly positive.
MAY_BE_ZERO = frozenset({"call_overhead_us", "launch_overhead_us", "latency_us"})
_FIGURE_KEYS = frozenset({"value", "peak", "effective", "total", "reserve", "source"})
_CURVE_KEYS = frozenset({"tokens", "seconds_per_param", "params", "source"})
_LANE_KEYS = frozenset({"name", "attention", *LANE_TABLES})
_ATTENTION_KEYS = frozenset({"keys", "head_dims", "gflops", "source"})


def hardware_dir() -> Path:
    """The catalog folder: ``data/hardware/`` (or ``$OFFLOADKIT_DATA/hardware``)."""
    return data_dir() / "hardware"


def catalog_names() -> list[str]:
    """Names of the catalog's profiles, sorted."""
    root = hardware_dir()
    return sorted(p.stem for p in root.glob("*.toml")) if root.is_dir() else []


def load_catalog() -> list[HardwareProfile]:
    """Every profile of the catalog, in name order."""
    return [load_profile(name) for name in catalog_names()]


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A catalog name (``"rtx4090-desktop"``) or a path to a profile TOML -> the profile."""
    text = str(name_or_path)
    if text in catalog_names():
        return read_profile(hardware_dir() / f"{text}.toml")
    path = Path(text).expanduser()
    if path.is_file():
        return read_profile(path)
    known = ", ".join(catalog_names()) or "(the catalog is empty)"
    raise ProfileError(f"no hardware profile named {text!r}: give a profile .toml path, or one of: {known}")


def read_profile(path: Path) -> HardwareProfile:
    """Parse and validate one profile file. Files inside the catalog folder must source every figure."""
    path = Path(path)
    in_catalog = path.resolve().parent == hardware_dir().resolve()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ProfileError(f"{path}: cannot read the profile ({e.strerror or e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path.name}: not valid TOML ({e})") from e
    profile = parse_profile(raw, path.name, require_sources=in_catalog, path=path)
    if in_catalog and profile.name != path.stem:
        raise ProfileError(f"{path.name}: name = {profile.name!r} must match the file name {path.stem!r}")
    return profile


def parse_profile(raw: dict[str, Any], file: str, *, require_sources: bool = False,
                  path: Path | None = None) -> HardwareProfile:
    """Build a :class:`HardwareProfile` from parsed TOML; ``file`` names the origin in messages."""
    _check_keys(raw, {"name", "description", *SECTIONS, "curves", "cpu_lane"}, "", file)
    name = _string(raw, "name", "name", file)
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ProfileError(f"{file}: description must be a string")
    sources: dict[str, str] = {}
    derivations: dict[str, Derivation] = {}
    parts: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        table = raw.get(section)
        if table is None:
            if section == "cpu":
                raise ProfileError(f"{file}: the [cpu] table is missing")
            parts[section] = None
            continue
        if not isinstance(table, dict):
            raise ProfileError(f"{file}: {section} must be a table ([{section}])")
        parts[section] = _parse_section(section, cls, table, file, require_sources, sources, derivations)
    if (parts["gpu"] is None) != (parts["link"] is None):
        have, lack = ("gpu", "link") if parts["gpu"] is not None else ("link", "gpu")
        raise ProfileError(f"{file}: has a [{have}] table but no [{lack}] table (give both, or neither "
                           "for a CPU-only machine)")
    gpu = parts["gpu"]
    if gpu is not None and gpu.usable_memory_gib > gpu.memory_gib:
        raise ProfileError(f"{file}: gpu.usable_memory_gib ({gpu.usable_memory_gib:g}) exceeds "
                           f"gpu.memory_gib ({gpu.memory_gib:g})")
    curves = _parse_curves(raw.get("curves", {}), file, require_sources, sources)
    lane = _parse_cpu_lane(raw["cpu_lane"], file, require_sources, sources) if "cpu_lane" in raw else None
    return HardwareProfile(name=name, description=description, cpu=parts["cpu"], gpu=gpu, link=parts["link"],
                           curves=curves, sources=sources, path=path, derivations=derivations, cpu_lane=lane)


# ---- helpers ------------------------------------------------------------------------------------

def _check_keys(table: dict[str, Any], allowed: set[str] | frozenset[str], prefix: str, file: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        where = f"in [{prefix}] " if prefix else ""
        raise ProfileError(f"{file}: unknown key {prefix + '.' if prefix else ''}{unknown[0]} {where}"
                           f"(known: {', '.join(sorted(allowed))})")


def _string(table: dict[str, Any], key: str, dotted: str, file: str) -> str:
    if key not in table:
        raise ProfileError(f"{file}: {dotted} is missing")
    if not isinstance(table[key], str) or not table[key].strip():
        raise ProfileError(f"{file}: {dotted} must be a non-empty string")
    return table[key]


def _number(x: Any, dotted: str, what: str, file: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ProfileError(f"{file}: {dotted}: {what} must be a finite number, not {x!r}")
    return float(x)


def _parse_section(section: str, cls: type, table: dict[str, Any], file: str, require_sources: bool,
                   sources: dict[str, str], derivations: dict[str, Derivation]) -> Any:
    names = [f.name for f in fields(cls)]
    _check_keys(table, set(names), section, file)
    values: dict[str, Any] = {"name": _string(table, "name", f"{section}.name", file)}
    for f in fields(cls):
        if f.name == "name":
            continue
        dotted = f"{section}.{f.name}"
        if f.name not in table:
            if f.default is None:  # an optional figure (cpu.memory_gib): unknown, and nothing is checked against it
                continue
            raise ProfileError(f"{file}: {dotted} is missing")
        value, source, derivation = _parse_figure(table[f.name], dotted, file)
        if require_sources and not source:
            raise ProfileError(f"{file}: {dotted} has no source (catalog figures need "
                               "{ value = ..., source = \"...\" })")
        if f.name in MAY_BE_ZERO:
            if value < 0:
                raise ProfileError(f"{file}: {dotted} is negative ({value:g}); it must be >= 0")
        elif value <= 0:
            raise ProfileError(f"{file}: {dotted} must be positive (got {value:g})")
        if f.type in ("int", int):
            if value != int(value):
                raise ProfileError(f"{file}: {dotted} must be a whole number (got {value:g})")
            value = int(value)
        values[f.name] = value
        if source:
            sources[dotted] = source
        if derivation is not None:
            derivations[dotted] = derivation
    return cls(**values)


def _parse_figure(raw: Any, dotted: str, file: str) -> tuple[float, str, Derivation | None]:
    """One figure in any of the four forms -> (value, source, derivation or None)."""
    if not isinstance(raw, dict):
        return _number(raw, dotted, "the value", file), "", None
    _check_keys(raw, _FIGURE_KEYS, dotted, file)
    source = raw.get("source", "")
    if not isinstance(source, str):
        raise ProfileError(f"{file}: {dotted}: source must be a string")
    bases = [k for k in ("value", "peak", "total") if k in raw]
    if len(bases) != 1:
        raise ProfileError(f"{file}: {dotted} needs exactly one of value, peak (with effective) or total "
                           f"(with reserve); got {', '.join(bases) or 'none'}")
    base = bases[0]
    num = {k: _number(raw[k], dotted, k, file) for k in ("value", "peak", "effective", "total", "reserve")
           if k in raw}
    if base == "value":
        if "effective" in raw or "reserve" in raw:
            raise ProfileError(f"{file}: {dotted}: effective goes with peak, reserve with total, not with value")
        return num["value"], source.strip(), None
    if base == "peak":
        if "effective" not in raw:
            raise ProfileError(f"{file}: {dotted}: a peak needs an explicit effective fraction "
                               "(e.g. effective = 0.8), or write value = ...")
        if "reserve" in raw:
            raise ProfileError(f"{file}: {dotted}: reserve goes with total, not with peak")
        if not 0 < num["effective"] <= 1:
            raise ProfileError(f"{file}: {dotted}: effective must be in (0, 1] (got {num['effective']:g})")
        d = Derivation(peak=num["peak"], effective=num["effective"])
    else:
        if "effective" in raw:
            raise ProfileError(f"{file}: {dotted}: effective goes with peak, not with total")
        reserve = num.get("reserve", 0.0)
        if reserve < 0:
            raise ProfileError(f"{file}: {dotted}: reserve is negative ({reserve:g})")
        d = Derivation(total=num["total"], reserve=reserve)
    return d.value, source.strip(), d


def _parse_curves(raw: Any, file: str, require_sources: bool, sources: dict[str, str]) -> dict[str, Curve]:
    if not isinstance(raw, dict):
        raise ProfileError(f"{file}: curves must be a table of [curves.<kind>] tables")
    curves: dict[str, Curve] = {}
    for kind, table in raw.items():
        dotted = f"curves.{kind}"
        if not isinstance(table, dict):
            raise ProfileError(f"{file}: {dotted} must be a table")
        _check_keys(table, _CURVE_KEYS, dotted, file)
        for key in ("tokens", "seconds_per_param"):
            if key not in table:
                raise ProfileError(f"{file}: {dotted}.{key} is missing")
            if not isinstance(table[key], list):
                raise ProfileError(f"{file}: {dotted}.{key} must be a list")
        tokens = table["tokens"]
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ProfileError(f"{file}: {dotted}.tokens must be whole numbers")
        spp = [_number(s, f"{dotted}.seconds_per_param", "every entry", file) for s in table["seconds_per_param"]]
        params = table.get("params", 0)
        if isinstance(params, bool) or not isinstance(params, int) or params < 0:
            raise ProfileError(f"{file}: {dotted}.params must be a whole number >= 0")
        source = table.get("source", "")
        if not isinstance(source, str):
            raise ProfileError(f"{file}: {dotted}.source must be a string")
        if require_sources and not source.strip():
            raise ProfileError(f"{file}: {dotted} has no source")
        try:
            curves[kind] = Curve(kind=kind, tokens=tuple(tokens), seconds_per_param=tuple(spp), params=params)
        except ProfileError as e:
            raise ProfileError(f"{file}: {e}") from e
        if source.strip():
            sources[dotted] = source.strip()
    return curves


def _parse_cpu_lane(raw: Any, file: str, require_sources: bool, sources: dict[str, str]) -> CpuLaneProfile:
    """The ``[cpu_lane]`` table (see the module docstring) -> a :class:`CpuLaneProfile`."""
    if not isinstance(raw, dict):
        raise ProfileError(f"{file}: cpu_lane must be a table ([cpu_lane])")
    _check_keys(raw, _LANE_KEYS, "cpu_lane", file)
    if "attention" not in raw:
        raise ProfileError(f"{file}: cpu_lane.attention is missing")

    def figure(value: Any, dotted: str) -> float:
        number, source, _ = _parse_figure(value, dotted, file)
        if require_sources and not source:
            raise ProfileError(f"{file}: {dotted} has no source")
        if number < 0:
            raise ProfileError(f"{file}: {dotted} must be >= 0 (got {number:g})")
        if source:
            sources[dotted] = source
        return number

    tables: dict[str, dict[str, float]] = {}
    for key in LANE_TABLES:
        table = raw.get(key, {})
        if not isinstance(table, dict):
            raise ProfileError(f"{file}: cpu_lane.{key} must be a table of task kind = figure")
        tables[key] = {kind: figure(v, f"cpu_lane.{key}.{kind}") for kind, v in table.items()}
    att = raw["attention"]
    if not isinstance(att, dict):
        raise ProfileError(f"{file}: cpu_lane.attention must be a table with keys and gflops")
    _check_keys(att, _ATTENTION_KEYS, "cpu_lane.attention", file)
    keys, dims, rates = att.get("keys"), att.get("head_dims", [128]), att.get("gflops")
    for axis, key in ((keys, "keys"), (dims, "head_dims")):
        if not isinstance(axis, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in axis):
            raise ProfileError(f"{file}: cpu_lane.attention.{key} must be a list of whole numbers")
    if not isinstance(rates, list) or not all(isinstance(row, list) for row in rates):
        raise ProfileError(f"{file}: cpu_lane.attention.gflops must be a list of lists (one per head dim)")
    rates = [[_number(r, "cpu_lane.attention.gflops", "every entry", file) for r in row] for row in rates]
    source = att.get("source", "")
    if not isinstance(source, str) or (require_sources and not source.strip()):
        raise ProfileError(f"{file}: cpu_lane.attention needs a source string")
    if source.strip():
        sources["cpu_lane.attention"] = source.strip()
    name = _string(raw, "name", "cpu_lane.name", file)
    try:
        return CpuLaneProfile(name, tuple(keys), tuple(tuple(r) for r in rates), tuple(dims), **tables)
    except ProfileError as e:
        raise ProfileError(f"{file}: {e}") from e
