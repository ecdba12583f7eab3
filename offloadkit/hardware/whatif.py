"""What-if profiles: a catalog profile with one or more of its pipes changed, for "what would X buy me?".

A plan depends on three numbers a buyer can change: the GPU's usable memory (how many rows can be GG),
the PCIe generation (how fast CG rows stream) and the DRAM bandwidth (how fast CC rows are computed at
decode). :func:`what_if` derives a new :class:`~offloadkit.hardware.profile.HardwareProfile` from a
base with any of them replaced, and names it after the base and the change, e.g.
``"rtx4090-desktop (what-if: 16 GiB GPU, PCIe 3, 50 GB/s DRAM)"``, so that a figure drawn from it says
"simulated on" a machine nobody measured.

- GPU memory is the *usable* figure (what the plan may fill); the base's reserve (CUDA context,
  allocator slack) is added back to give the card's total.
- A PCIe generation keeps the link's lane count (``x16``, ``x8`` from its name) and every copy's
  effective fraction (pinned 0.8, pageable 0.24 in the catalog): only the spec peak changes, from
  the per-lane rates of :data:`PCIE_LANE_GBPS` (x16: 15.75 / 31.5 / 63 GB/s for generations 3 / 4 / 5).
- DRAM bandwidth is the *effective* read in GB/s, the figure the cost model divides by.

Every changed figure gets a ``source`` saying it is a what-if and a derivation where it has one, so
``offloadkit hardware show`` can still explain it. It refuses (:class:`~offloadkit.errors.ProfileError`)
non-positive or non-finite values, unknown generations, and GPU or PCIe changes on a profile
without a GPU. A measured CPU curve in the base is kept as it is: the cost model never prices a CPU
matmul faster than its bytes over the new bandwidth, but a curve measured at a lower bandwidth still
caps it from below.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from offloadkit.errors import ProfileError
from offloadkit.hardware.profile import Derivation, HardwareProfile, round_figure

#: Peak GB/s per lane per direction after line coding (PCI-SIG): 8 GT/s x 128b/130b / 8 bits for gen 3.
PCIE_LANE_GBPS: dict[int, float] = {3: 0.984375, 4: 1.96875, 5: 3.9375}
LINK_FIELDS = ("h2d_pinned_gbps", "h2d_pageable_gbps", "d2h_pinned_gbps", "d2h_pageable_gbps")


def pcie_peak_gbps(generation: int, lanes: int = 16) -> float:
    """Peak GB/s per direction of a PCIe link: ``pcie_peak_gbps(4) -> 31.5``, ``pcie_peak_gbps(3, 8) -> 7.875``."""
    if generation not in PCIE_LANE_GBPS:
        raise ProfileError(f"no PCIe generation {generation!r}: use one of {', '.join(map(str, PCIE_LANE_GBPS))}")
    return round_figure(PCIE_LANE_GBPS[generation] * lanes)


def link_shape(profile: HardwareProfile) -> tuple[int | None, int]:
    """(generation, lanes) of the profile's link from its name (``"PCIe 4.0 x8"`` -> ``(4, 8)``); lanes default 16."""
    name = profile.link.name if profile.link is not None else ""
    gen = re.search(r"PCIe\s*([0-9])", name, re.IGNORECASE)
    lanes = re.search(r"\bx([0-9]+)\b", name)
    return (int(gen.group(1)) if gen else None), (int(lanes.group(1)) if lanes else 16)


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ProfileError(f"a what-if {name} must be a positive finite number, got {value!r}")
    return float(value)


def what_if(base: HardwareProfile, *, gpu_gib: float | None = None, pcie_gen: int | None = None,
            dram_gbps: float | None = None) -> HardwareProfile:
    """``base`` with usable GPU memory ``gpu_gib`` (GiB), PCIe generation ``pcie_gen`` (3, 4 or 5) and
    effective DRAM read ``dram_gbps`` (GB/s) replaced; ``None`` keeps the base's. See the module docstring.

    A value equal to the base's is no change; with no change at all the base itself is returned.
    """
    cpu, gpu, link = base.cpu, base.gpu, base.link
    sources, derivations = dict(base.sources), dict(base.derivations)
    changed: dict[str, str] = {}  # what changed, by pipe, for the name
    if gpu_gib is not None:
        gib = _positive("GPU memory (GiB)", gpu_gib)
        if gpu is None:
            raise ProfileError(f"profile {base.name!r} has no GPU: it has no GPU memory to change")
        if not math.isclose(gib, gpu.usable_memory_gib):
            reserve = max(gpu.memory_gib - gpu.usable_memory_gib, 0.0)
            gpu = replace(gpu, usable_memory_gib=gib, memory_gib=round_figure(gib + reserve))
            derivations["gpu.usable_memory_gib"] = Derivation(total=gpu.memory_gib, reserve=reserve)
            for key in ("gpu.usable_memory_gib", "gpu.memory_gib"):
                sources[key] = f"what-if: {gib:g} GiB usable (the base's reserve of {reserve:g} GiB added back)"
            changed["gpu"] = f"{gib:g} GiB GPU"
    if pcie_gen is not None:
        if link is None:
            raise ProfileError(f"profile {base.name!r} has no PCIe link to change (no GPU)")
        if isinstance(pcie_gen, bool) or pcie_gen not in PCIE_LANE_GBPS:
            raise ProfileError(f"no PCIe generation {pcie_gen!r}: use one of {', '.join(map(str, PCIE_LANE_GBPS))}")
        gen, lanes = link_shape(base)
        if pcie_gen != gen:
            peak = pcie_peak_gbps(pcie_gen, lanes)
            figures = {}
            for f in LINK_FIELDS:
                effective = _effective(base, f, gen, lanes)
                figures[f] = round_figure(peak * effective)
                derivations[f"link.{f}"] = Derivation(peak=peak, effective=effective)
                sources[f"link.{f}"] = (f"what-if: PCIe {pcie_gen}.0 x{lanes} = {peak:g} GB/s per direction, "
                                        f"effective {effective:g} as in {base.name}")
            link = replace(link, name=f"PCIe {pcie_gen}.0 x{lanes} (what-if)", **figures)
            changed["pcie"] = f"PCIe {pcie_gen}"
    if dram_gbps is not None:
        bw = _positive("DRAM bandwidth (GB/s)", dram_gbps)
        if not math.isclose(bw, cpu.dram_bandwidth_gbps):
            cpu = replace(cpu, dram_bandwidth_gbps=bw)
            derivations.pop("cpu.dram_bandwidth_gbps", None)
            sources["cpu.dram_bandwidth_gbps"] = f"what-if: {bw:g} GB/s effective DRAM read"
            changed["dram"] = f"{bw:g} GB/s DRAM"
    if not changed:
        return base
    root, earlier = _what_if_parts(base.name)
    what = ", ".join({**earlier, **changed}[k] for k in ("gpu", "pcie", "dram") if k in {**earlier, **changed})
    description = base.description.split(" — what-if:")[0]
    return replace(base, name=f"{root} (what-if: {what})", cpu=cpu, gpu=gpu, link=link, sources=sources,
                   derivations=derivations, path=None, description=f"{description} — what-if: {what}")


def _what_if_parts(name: str) -> tuple[str, dict[str, str]]:
    """``"x (what-if: 16 GiB GPU, PCIe 3)"`` -> ``("x", {"gpu": "16 GiB GPU", "pcie": "PCIe 3"})`` (a what-if
    of a what-if names every change once, the latest value of each)."""
    m = re.fullmatch(r"(.*) \(what-if: (.*)\)", name)
    if m is None:
        return name, {}
    kinds = {"GPU": "gpu", "PCIe": "pcie", "DRAM": "dram"}
    parts = {next(v for k, v in kinds.items() if k in item): item for item in m.group(2).split(", ")}
    return m.group(1), parts


def _effective(base: HardwareProfile, field: str, gen: int | None, lanes: int) -> float:
    """The effective fraction of a link figure: from its derivation, else its value over the link's peak."""
    d = base.derivations.get(f"link.{field}")
    if d is not None and d.peak is not None:
        return d.effective if d.effective is not None else 1.0
    if gen is None or gen not in PCIE_LANE_GBPS:
        raise ProfileError(f"profile {base.name!r}: cannot tell the effective fraction of link.{field} (no spec "
                           f"peak, and the link's name {base.link.name!r} names no PCIe generation)")  # type: ignore[union-attr]
    return round_figure(getattr(base.link, field) / pcie_peak_gbps(gen, lanes))


__all__ = ["PCIE_LANE_GBPS", "link_shape", "pcie_peak_gbps", "what_if"]
