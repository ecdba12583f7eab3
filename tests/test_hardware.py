"""Hardware profiles: the catalog, its sources, validation messages, the TOML round trip, curves, the CLI."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from offloadkit import ProfileError
from offloadkit.hardware import (
    CpuProfile,
    Curve,
    GpuProfile,
    HardwareProfile,
    LinkProfile,
    catalog_names,
    load_catalog,
    load_profile,
    profile_to_toml,
    save_profile,
)
from offloadkit.hardware.catalog import hardware_dir, read_profile

CATALOG = hardware_dir()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offloadkit.cli", *args], capture_output=True, text=True,
                          timeout=120)


def edited_copy(tmp_path: Path, name: str, old: str, new: str) -> Path:
    """A copy of catalog file ``name`` (same file name, outside the catalog) with one edit."""
    text = (CATALOG / f"{name}.toml").read_text()
    assert old in text, old
    path = tmp_path / f"{name}.toml"
    path.write_text(text.replace(old, new, 1))
    return path


# ---- the catalog ----------------------------------------------------------------------------------

def test_catalog_has_six_moderate_systems():
    profiles = load_catalog()
    assert len(profiles) >= 6
    assert [p.name for p in profiles] == catalog_names()
    for p in profiles:
        assert p.gpu is not None and p.link is not None
        assert 12 <= p.gpu.memory_gib <= 48, p.name  # moderate GPUs
        assert p.gpu.usable_memory_gib < p.gpu.memory_gib
        assert p.link.h2d_pageable_gbps < p.link.h2d_pinned_gbps
        assert p.path == CATALOG / f"{p.name}.toml"


def test_every_catalog_figure_has_a_source():
    for p in load_catalog():
        for dotted in p.figures():
            assert len(p.sources.get(dotted, "")) > 10, f"{p.name}: {dotted} has no source"
        # the raw file: every number sits in a table with a source (the loader enforces it too)
        for line in p.path.read_text().splitlines():
            if "=" in line and line.split("=", 1)[0].strip() not in ("name", "description") \
                    and not line.lstrip().startswith("#"):
                assert "source = " in line, f"{p.path.name}: {line}"


def test_effective_fractions_are_applied():
    p = load_profile("rtx4090-desktop")
    assert p.cpu.dram_bandwidth_gbps == 62.4  # 83.2 x 0.75, rounded to a clean float
    d = p.derivations["cpu.dram_bandwidth_gbps"]
    assert (d.peak, d.effective) == (83.2, 0.75)
    assert p.gpu.usable_memory_gib == 23.0 and p.derivations["gpu.usable_memory_gib"].reserve == 1.0
    assert p.link.h2d_pinned_gbps == pytest.approx(31.5 * 0.8)
    assert p.gpu.memory_bandwidth_gbps == pytest.approx(1008 * 0.85)
    x8 = load_profile("rtx4060ti16-desktop").link
    assert x8.name == "PCIe 4.0 x8" and x8.h2d_pinned_gbps == pytest.approx(p.link.h2d_pinned_gbps / 2)


def test_units_and_rates():
    p = load_profile("rtx4090-desktop")
    assert p.cpu.flop_rate("float32") == pytest.approx(p.cpu.flops_f32_tflops * 1e12)
    assert p.cpu.flop_rate("float16") == p.cpu.flop_rate("bfloat16") == p.cpu.flop_rate("bf16")
    assert p.gpu.flop_rate("torch.bfloat16") == pytest.approx(p.gpu.flops_bf16_tflops * 1e12)
    assert p.gpu.usable_memory_bytes == 23 * 2**30
    assert hash(p) == hash(load_profile("rtx4090-desktop"))  # usable as a cache key
    assert p.link.bandwidth("h2d") == pytest.approx(25.2e9)
    assert p.link.bandwidth("d2h", pinned=False) == pytest.approx(31.5 * 0.24 * 1e9)
    with pytest.raises(ProfileError, match="int8"):
        p.gpu.flop_rate("int8")
    with pytest.raises(ProfileError, match="h2d"):
        p.link.bandwidth("up")


# ---- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("old, new, message", [
    ("memory_bandwidth_gbps = {", "# memory_bandwidth_gbps = {",
     "rtx4090-desktop.toml: gpu.memory_bandwidth_gbps is missing"),
    ("cores = { value = 16,", "cores = { value = -16,", "rtx4090-desktop.toml: cpu.cores must be positive"),
    ("peak = 83.2, effective = 0.75", "peak = 0, effective = 0.75", "cpu.dram_bandwidth_gbps must be positive"),
    ("latency_us = { value = 10.0", "latency_us = { value = -1.0", "link.latency_us is negative"),
    ("peak = 83.2, effective = 0.75", "peak = 83.2, effective = 1.5", "effective must be in (0, 1]"),
    ("peak = 83.2, effective = 0.75", "peak = 83.2", "needs an explicit effective fraction"),
    ("cores = { value = 16,", "cores = { value = 16.5,", "cpu.cores must be a whole number"),
    ("cores = { value = 16,", 'cores = { value = "16",', "must be a finite number"),
    ("dram_bandwidth_gbps =", "dram_bandwith_gbps =", "unknown key cpu.dram_bandwith_gbps"),
    ("total = 24.0, reserve = 1.0", "total = 24.0, reserve = -1.0", "reserve is negative"),
    ('[gpu]\nname = "NVIDIA GeForce RTX 4090"\nmemory_gib = { value = 24.0',
     '[gpu]\nname = "NVIDIA GeForce RTX 4090"\nmemory_gib = { value = 20.0', "exceeds gpu.memory_gib"),
    ('[link]\nname = "PCIe 4.0 x16"', '[wire]\nname = "PCIe 4.0 x16"', "unknown key wire"),
    ('name = "rtx4090-desktop"', 'name = "rtx4090-desktop', "not valid TOML"),
    ("memory_gib = { value = 128.0", "memory_gib = { value = -128.0", "cpu.memory_gib must be positive (got -128)"),
    ("memory_gib = { value = 128.0", "memory_gib = { value = 0", "cpu.memory_gib must be positive (got 0)"),
    ("memory_gib = { value = 128.0", 'memory_gib = { value = "unknown"',
     "cpu.memory_gib: value must be a finite number"),
    ("memory_gib = { value = 128.0", "memory_gb = { value = 128.0", "unknown key cpu.memory_gb"),
])
def test_bad_fields_name_the_field_and_the_file(tmp_path, old, new, message):
    path = edited_copy(tmp_path, "rtx4090-desktop", old, new)
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    assert message in str(e.value)
    assert str(e.value).startswith("rtx4090-desktop.toml: ")


def test_host_memory_is_in_every_catalog_profile_and_optional_elsewhere(tmp_path):
    for p in load_catalog():
        # installed DIMMs: a whole number of GiB, more than the GPU's memory (the host holds what is offloaded)
        assert p.cpu.memory_gib is not None and p.cpu.memory_gib == int(p.cpu.memory_gib), p.name
        assert p.cpu.memory_gib > p.gpu.memory_gib and p.cpu.memory_bytes == int(p.cpu.memory_gib) * 2**30
        assert "DIMM" in p.sources["cpu.memory_gib"] and "cpu.memory_gib" in p.figures()
    path = edited_copy(tmp_path, "rtx4090-desktop", "memory_gib = { value = 128.0", "# memory_gib = { value = 128.0")
    p = load_profile(path)  # a profile without it: the host's memory is unknown, not a guess
    assert p.cpu.memory_gib is None and p.cpu.memory_bytes is None
    assert "cpu.memory_gib" not in p.figures() and "gpu.memory_gib" in p.figures()
    cpu_section = profile_to_toml(p).split("[cpu]")[1].split("[gpu]")[0]
    assert "memory_gib" not in cpu_section  # written back absent, not as a number
    assert read_profile(save_profile(p, tmp_path / "again.toml")) == p


def test_gpu_without_link_is_refused(tmp_path):
    text = (CATALOG / "l4-server.toml").read_text()
    path = tmp_path / "l4.toml"
    path.write_text(text[:text.index("[link]")])
    with pytest.raises(ProfileError, match=r"l4.toml: has a \[gpu\] table but no \[link\] table"):
        load_profile(path)


def test_catalog_files_need_sources_other_files_do_not(tmp_path, monkeypatch):
    text = (CATALOG / "rtx3090-desktop.toml").read_text()
    bare = re.sub(r'cores = \{ value = 12, source = "[^"]*" \}', "cores = 12", text)
    assert bare != text
    (tmp_path / "mine.toml").write_text(bare)
    assert load_profile(tmp_path / "mine.toml").cpu.cores == 12  # a user's file may omit sources
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "rtx3090-desktop.toml").write_text(bare)
    monkeypatch.setenv("OFFLOADKIT_DATA", str(tmp_path))
    assert catalog_names() == ["rtx3090-desktop"]
    with pytest.raises(ProfileError, match="rtx3090-desktop.toml: cpu.cores has no source"):
        load_profile("rtx3090-desktop")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ProfileError) as e:
        load_profile("rtx9090-dream")
    assert "no hardware profile named 'rtx9090-dream'" in str(e.value)
    assert all(name in str(e.value) for name in catalog_names())


# ---- writing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", catalog_names())
def test_catalog_round_trips_through_toml(tmp_path, name):
    p = load_profile(name)
    text = profile_to_toml(p)
    assert "effective = " in text and "source = " in text
    assert read_profile(save_profile(p, tmp_path / "sub" / f"{name}.toml")) == p


def test_a_profile_built_in_code_round_trips(tmp_path):
    p = HardwareProfile(
        name="lab-box", description='a "quoted"\ndescription\twith \\ escapes and é',
        cpu=CpuProfile("Some CPU", 8, 40.123456789, 0.5, 0.25, 3.0),
        gpu=GpuProfile("Some GPU", 16.0, 15.25, 300.0, 10.0, 80.0, 80.0, 0.0),
        link=LinkProfile("PCIe 4.0 x8", 12.0, 4.0, 12.5, 4.5, 7.0),
        curves={"cpu_expert_bf16": Curve("cpu_expert_bf16", (1, 2, 512), (3e-10, 3.1e-10, 1e-8), params=1000)},
        sources={"cpu.cores": "counted", "curves.cpu_expert_bf16": "measured"})
    back = read_profile(save_profile(p, tmp_path / "lab-box.toml"))
    assert back == p and back.description == p.description
    assert "cores = { value = 8, source = \"counted\" }" in profile_to_toml(p)
    assert "dram_bandwidth_gbps = 40.123456789\n" in profile_to_toml(p)  # no source: a bare number


def test_cpu_only_profile_round_trips(tmp_path):
    p = HardwareProfile(name="cpu-box", description="", cpu=CpuProfile("CPU", 2, 30.0, 0.1, 0.05, 5.0))
    back = read_profile(save_profile(p, tmp_path / "cpu-box.toml"))
    assert back == p and back.gpu is None and back.link is None and not back.has_gpu
    with_memory = HardwareProfile(name="cpu-box", description="", cpu=CpuProfile("CPU", 2, 30.0, 0.1, 0.05, 5.0, 64.0))
    back = read_profile(save_profile(with_memory, tmp_path / "cpu-box.toml"))
    assert back == with_memory and back.cpu.memory_gib == 64.0


# ---- curves ---------------------------------------------------------------------------------------

def test_curve_interpolates_log_linearly():
    c = Curve("cpu_expert_f32", (1, 4, 16), (1e-9, 1e-9, 4e-9))
    assert c.time_s(1, 1000) == pytest.approx(1e-6)
    assert c.time_s(16, 10) == pytest.approx(4e-8)
    assert c.time_s(8, 1) == pytest.approx(2e-9)  # halfway in log(tokens) between 4 and 16 -> geometric mean
    assert c.time_s(2, 1) == pytest.approx(1e-9)
    assert c.time_s(6, 1) == pytest.approx(math.exp(math.log(1e-9) + math.log(4) * math.log(1.5) / math.log(4)))


def test_curve_extrapolates():
    c = Curve("k", (4, 8), (1e-9, 2e-9))
    assert c.time_s(0, 100) == 0.0
    assert c.time_s(1, 100) == pytest.approx(1e-7)  # below the first point: the first point's time
    assert c.time_s(32, 100) == pytest.approx(2e-9 * 4 * 100)  # above: in proportion to the tokens
    assert c.seconds_per_param_at(8) == 2e-9


@pytest.mark.parametrize("tokens, spp, message", [
    ((), (), "non-empty"), ((1, 2), (1e-9,), "equal length"), ((2, 1), (1e-9, 1e-9), "strictly increasing"),
    ((0, 1), (1e-9, 1e-9), "positive"), ((1,), (0.0,), "positive and finite"),
])
def test_bad_curves_are_refused(tokens, spp, message):
    with pytest.raises(ProfileError, match=message):
        Curve("k", tokens, spp)


# ---- CLI ------------------------------------------------------------------------------------------

def test_cli_list_and_show():
    r = run_cli("hardware", "list")
    assert r.returncode == 0, r.stderr
    for name in catalog_names():
        assert name in r.stdout
    assert "DRAM GB/s" in r.stdout and "PCIe 3.0 x16" in r.stdout and "62.4" in r.stdout
    r = run_cli("hardware", "show", "rtx4090-desktop")
    assert r.returncode == 0, r.stderr
    assert "dram_bandwidth_gbps = 62.4 GB/s   (peak 83.2 x effective 0.75)" in r.stdout
    assert "source: DDR5-5200 dual channel" in r.stdout
    assert r.stdout.count("source: ") == len(load_profile("rtx4090-desktop").figures())


@pytest.mark.parametrize("args, message", [
    (["hardware", "show", "rtx9090"], "no hardware profile named 'rtx9090'"),
    (["hardware", "show", "/no/such/file.toml"], "rtx4090-desktop"),
])
def test_cli_errors_without_traceback(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("offloadkit: error:") and message in r.stderr


def test_cli_reports_a_broken_file(tmp_path):
    path = edited_copy(tmp_path, "t4-server-pcie3", "h2d_pinned_gbps = { peak = 15.75",
                       "h2d_pinned_gbps = { peak = -15.75")
    r = run_cli("hardware", "show", str(path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "t4-server-pcie3.toml: link.h2d_pinned_gbps must be positive" in r.stderr
