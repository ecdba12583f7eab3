"""Subcommands of ``offloadkit`` that belong to ``offloadkit.hardware`` (registered by ``offloadkit.cli``).

- ``offloadkit hardware list``: the catalog side by side, one row per machine.
- ``offloadkit hardware show NAME``: every figure of one profile (catalog name or TOML path) with its
  derivation and its source.
- ``offloadkit profile [--out FILE] [--quick]``: measure this machine and write its profile (the file's
  path is checked before measuring).

Handlers only format; loading, validation and measuring live in the package. Errors arrive as
:class:`~offloadkit.errors.ProfileError` and the CLI prints them without a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from offloadkit.hardware.profile import HardwareProfile

_UNITS = {"_gbps": "GB/s", "_tflops": "TFLOP/s", "_gib": "GiB", "_us": "us"}


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """A plain-text table with aligned columns (``right[i]``: right-align column ``i``)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right,
                                                                                      strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _short_gpu(name: str) -> str:
    return name.removeprefix("NVIDIA ").removeprefix("GeForce ")


def catalog_table(profiles: Sequence[HardwareProfile]) -> str:
    """The ``hardware list`` table."""
    headers = ["name", "CPU", "DRAM GB/s", "GPU", "GPU mem GiB", "GPU GB/s", "link", "H2D GB/s"]
    rows = []
    for p in profiles:
        row = [p.name, f"{p.cpu.name} ({p.cpu.cores}c)", f"{p.cpu.dram_bandwidth_gbps:.1f}"]
        if p.gpu is not None and p.link is not None:
            row += [_short_gpu(p.gpu.name), f"{p.gpu.usable_memory_gib:.1f} / {p.gpu.memory_gib:.0f}",
                    f"{p.gpu.memory_bandwidth_gbps:.0f}", p.link.name, f"{p.link.h2d_pinned_gbps:.1f}"]
        else:
            row += ["(none)", "-", "-", "-", "-"]
        rows.append(row)
    right = [False, False, True, False, True, True, False, True]
    note = ("Figures are effective rates (spec peaks times the fraction real kernels reach, or measured). "
            "GPU mem: usable / total. H2D: pinned host memory.")
    return format_table(headers, rows, right) + "\n\n" + note


def _unit(key: str) -> str:
    return next((u for suffix, u in _UNITS.items() if key.endswith(suffix)), "")


def describe_profile(p: HardwareProfile) -> str:
    """The ``hardware show`` text: every field with its unit, derivation and source."""
    out = [f"{p.name}: {p.description}"]
    if p.path is not None:
        out.append(f"file: {p.path}")
    for section in ("cpu", "gpu", "link"):
        part = getattr(p, section)
        if part is None:
            if section == "gpu":
                out += ["", "[gpu] none: a CPU-only machine (no [gpu] or [link])"]
            continue
        out += ["", f"[{section}] {part.name}"]
        for key, value in vars(part).items():
            if key == "name" or value is None:
                continue
            dotted = f"{section}.{key}"
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            line = f"  {key} = {shown} {_unit(key)}".rstrip()
            if dotted in p.derivations:
                line += f"   ({p.derivations[dotted].describe()})"
            out.append(line)
            out.append(f"      source: {p.sources.get(dotted, '(none given)')}")
    if p.cpu_lane is not None:
        out += _describe_lane(p)
    if p.curves:
        out += ["", "[curves] measured time vs tokens (seconds per weight parameter)"]
        for kind, c in p.curves.items():
            pts = ", ".join(f"{t}: {s:.3g}" for t, s in zip(c.tokens, c.seconds_per_param, strict=True))
            out.append(f"  {kind} (measured on {c.params:,} parameters): {pts}")
            out.append(f"      source: {p.sources.get(f'curves.{kind}', '(none given)')}")
    return "\n".join(out)


def _describe_lane(p: HardwareProfile) -> list[str]:
    """The ``[cpu_lane]`` part of ``hardware show``: the CPU engine's own costs per task kind."""
    lane = p.cpu_lane
    assert lane is not None
    out = ["", f"[cpu_lane] {lane.name}", "  kind: fixed us + ns per hidden unit; ns per further row and hidden unit"]
    for kind in lane.task_us:
        out.append(f"  {kind}: {lane.task_us[kind]:.1f} us + {lane.task_hidden_ns.get(kind, 0.0):.1f} ns/hidden; "
                   f"{lane.element_ns.get(kind, 0.0):.3f} ns/row/hidden")
    reads = ", ".join(f"{k} {v:.1f}" for k, v in lane.decode_ps.items())
    out.append(f"  decode read, ps per weight: {reads or '(none)'}")
    for dim, row in zip(lane.attention_head_dims, lane.attention_gflops, strict=True):
        pts = ", ".join(f"{k}: {r:.1f}" for k, r in zip(lane.attention_keys, row, strict=True))
        out.append(f"  attention core, head dim {dim}, GFLOP/s by keys per query: {pts}")
    for key in ("cpu_lane.task_us.embed", "cpu_lane.attention"):
        if key in p.sources:
            out.append(f"      source ({key}): {p.sources[key]}")
    return out


def describe_measurement(p: HardwareProfile) -> str:
    """A short summary of a freshly measured profile."""
    c = p.cpu
    lines = [f"measured {p.name}: {c.name}, {c.cores} cores",
             f"  DRAM read {c.dram_bandwidth_gbps:.1f} GB/s; CPU expert f32 {c.flops_f32_tflops * 1e3:.1f} GFLOP/s, "
             f"bf16 {c.flops_bf16_tflops * 1e3:.1f} GFLOP/s; call overhead {c.call_overhead_us:.1f} us",
             f"  DRAM read: {p.sources.get('cpu.dram_bandwidth_gbps', 'how it was measured is not recorded')}"]
    if p.gpu is not None and p.link is not None:
        g, k = p.gpu, p.link
        lines.append(f"  GPU {g.name}: {g.usable_memory_gib:.1f} / {g.memory_gib:.1f} GiB usable, "
                     f"{g.memory_bandwidth_gbps:.0f} GB/s, bf16 {g.flops_bf16_tflops:.1f} TFLOP/s, "
                     f"launch {g.launch_overhead_us:.1f} us")
        lines.append(f"  {k.name}: H2D {k.h2d_pinned_gbps:.1f} (pageable {k.h2d_pageable_gbps:.1f}) GB/s, "
                     f"D2H {k.d2h_pinned_gbps:.1f} (pageable {k.d2h_pageable_gbps:.1f}) GB/s, "
                     f"latency {k.latency_us:.1f} us")
    else:
        lines.append("  no CUDA device: the profile has no [gpu] or [link]")
    if p.cpu_lane is not None:
        lane = p.cpu_lane
        host = sum(lane.task_us.get(k, 0.0) for k in ("host_step", "host_layer"))
        lines.append(f"  CPU engine: {len(lane.task_us)} task kinds priced; e.g. attn_norm "
                     f"{lane.task_us.get('attn_norm', 0.0):.1f} us, expert {lane.task_us.get('expert', 0.0):.1f} us "
                     f"+ its read, outside tasks {host:.1f} us per step and dense layer (measured)")
    return "\n".join(lines)


# ---- handlers -------------------------------------------------------------------------------------

def cmd_hardware_list(args: argparse.Namespace) -> int:
    from offloadkit.hardware.catalog import hardware_dir, load_catalog

    profiles = load_catalog()
    if not profiles:
        print(f"the hardware catalog is empty (no .toml files in {hardware_dir()})")
        return 0
    print(catalog_table(profiles))
    return 0


def cmd_hardware_show(args: argparse.Namespace) -> int:
    from offloadkit.hardware.catalog import load_profile

    print(describe_profile(load_profile(args.name)))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from offloadkit.hardware.probe import default_out, run_profile
    from offloadkit.output_paths import check_output_file

    out = check_output_file(args.out or default_out(args.name), "--out")  # before a minute of measuring, not after
    profile, path = run_profile(out=out, quick=args.quick, name=args.name, progress=not args.no_progress)
    print(describe_measurement(profile))
    print(f"wrote {path}  (see it with: offloadkit hardware show {path})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``offloadkit`` parser."""
    p = sub.add_parser("hardware", help="the catalog of hardware profiles")
    hw = p.add_subparsers(dest="hardware_command", required=True)
    q = hw.add_parser("list", help="the catalog's machines side by side")
    q.set_defaults(func=cmd_hardware_list)
    q = hw.add_parser("show", help="every figure of one profile with its source")
    q.add_argument("name", help="a catalog name (see 'offloadkit hardware list') or a profile .toml path")
    q.set_defaults(func=cmd_hardware_show)

    p = sub.add_parser("profile", help="measure this machine (CPU; GPU and PCIe when CUDA is present) "
                                       "and write its hardware profile")
    p.add_argument("--out", help="the TOML file to write (default: ./<name>.toml, i.e. ./measured-<hostname>.toml)")
    p.add_argument("--quick", action="store_true", help="smaller buffers and weights: seconds, not a minute")
    p.add_argument("--name", help="the profile's name (default: measured-<hostname>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_profile)
