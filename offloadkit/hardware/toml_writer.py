"""Writing a :class:`HardwareProfile` as TOML that ``catalog.read_profile`` reads back unchanged.

Python's standard library reads TOML but does not write it, and a profile is small and flat, so the
writer is written by hand rather than adding a dependency. It writes each figure with its source
(and its derivation, ``peak x effective`` or ``total - reserve``, when the profile carries one that
still matches the value), so a written file is as readable as a hand-made catalog entry.

It refuses what TOML cannot hold faithfully here: non-finite numbers and non-string names raise
:class:`~offloadkit.errors.ProfileError`. ``load(profile_to_toml(p)) == p`` is a tested property.
"""

from __future__ import annotations

import math
from pathlib import Path

from offloadkit.errors import ProfileError
from offloadkit.hardware.profile import LANE_TABLES, Derivation, HardwareProfile

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def toml_string(text: str) -> str:
    """A TOML basic string: ``'say "hi"'`` -> ``'"say \\"hi\\""'``."""
    if not isinstance(text, str):
        raise ProfileError(f"expected a string, got {text!r}")
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_number(x: float | int) -> str:
    """``16`` -> ``16``; ``62.4`` -> ``62.4``; ``3e-12`` -> ``3e-12`` (``repr`` round-trips floats exactly)."""
    if isinstance(x, bool):
        raise ProfileError(f"expected a number, got {x!r}")
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if not math.isfinite(x):
        raise ProfileError(f"cannot write the non-finite number {x!r} to a profile")
    return repr(x)


def _figure(value: float | int, source: str | None, derivation: Derivation | None) -> str:
    if derivation is not None and derivation.value == value:
        if derivation.peak is not None:
            parts = [f"peak = {toml_number(derivation.peak)}", f"effective = {toml_number(derivation.effective)}"]
        else:
            parts = [f"total = {toml_number(derivation.total)}", f"reserve = {toml_number(derivation.reserve)}"]
    elif source:
        parts = [f"value = {toml_number(value)}"]
    else:
        return toml_number(value)
    if source:
        parts.append(f"source = {toml_string(source)}")
    return "{ " + ", ".join(parts) + " }"


def profile_to_toml(profile: HardwareProfile) -> str:
    """The TOML text of ``profile`` (figures with their sources and derivations)."""
    lines = ["# A hardware profile for offloadkit (the format: offloadkit/hardware/catalog.py).",
             "# Units are in the names: _gbps = 1e9 bytes/s, _tflops = 1e12 FLOP/s, _gib = 2**30 bytes, _us = 1e-6 s.",
             f"name = {toml_string(profile.name)}",
             f"description = {toml_string(profile.description)}"]
    for section in ("cpu", "gpu", "link"):
        part = getattr(profile, section)
        if part is None:
            continue
        lines += ["", f"[{section}]", f"name = {toml_string(part.name)}"]
        for key, value in vars(part).items():
            if key == "name" or value is None:  # an optional figure the profile does not give stays absent
                continue
            dotted = f"{section}.{key}"
            rendered = _figure(value, profile.sources.get(dotted), profile.derivations.get(dotted))
            lines.append(f"{key} = {rendered}")
    for kind, curve in profile.curves.items():
        lines += ["", f"[curves.{_toml_key(kind)}]",
                  "tokens = [" + ", ".join(str(t) for t in curve.tokens) + "]",
                  "seconds_per_param = [" + ", ".join(toml_number(s) for s in curve.seconds_per_param) + "]",
                  f"params = {curve.params}"]
        source = profile.sources.get(f"curves.{kind}")
        if source:
            lines.append(f"source = {toml_string(source)}")
    if profile.cpu_lane is not None:
        lines += _cpu_lane_lines(profile)
    return "\n".join(lines) + "\n"


def _cpu_lane_lines(profile: HardwareProfile) -> list[str]:
    """The ``[cpu_lane]`` tables of a measured profile (the format: ``catalog.py``)."""
    lane, src = profile.cpu_lane, profile.sources
    assert lane is not None
    lines = ["", "[cpu_lane]", f"name = {toml_string(lane.name)}",
             "", "[cpu_lane.attention]",
             "keys = [" + ", ".join(str(k) for k in lane.attention_keys) + "]",
             "head_dims = [" + ", ".join(str(d) for d in lane.attention_head_dims) + "]",
             "gflops = [" + ", ".join("[" + ", ".join(toml_number(r) for r in row) + "]"
                                      for row in lane.attention_gflops) + "]"]
    if src.get("cpu_lane.attention"):
        lines.append(f"source = {toml_string(src['cpu_lane.attention'])}")
    for key in LANE_TABLES:
        lines += ["", f"[cpu_lane.{key}]"]
        for kind, value in getattr(lane, key).items():
            lines.append(f"{_toml_key(kind)} = {_figure(value, src.get(f'cpu_lane.{key}.{kind}'), None)}")
    return lines


def _toml_key(key: str) -> str:
    """A bare key when TOML allows one, a quoted key otherwise."""
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return key
    return toml_string(key)


def save_profile(profile: HardwareProfile, path: str | Path) -> Path:
    """Write ``profile`` to ``path`` (parent folders created); returns the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile_to_toml(profile), encoding="utf-8")
    return path
