"""The GPU half of the probe, where it can be checked without a GPU: the host buffers of the PCIe copies
are written before they are timed, and nvidia-smi is asked about torch's device by its PCI bus id or
UUID, never by torch's index (which ``CUDA_VISIBLE_DEVICES`` renumbers)."""

from __future__ import annotations

import subprocess
import types

import pytest
import torch

from offloadkit.hardware import probe_cuda

MIB = 2**20


def test_a_pageable_host_buffer_has_every_page_written():
    host = probe_cuda.host_buffer(8 * MIB, pinned=False)
    assert host.dtype == torch.uint8 and host.numel() == 8 * MIB
    assert bool((host != 0).all())  # a never-written buffer this size reads as zeros (the shared zero page)


def test_the_h2d_copy_reads_the_written_buffer(monkeypatch):
    """copy_gbps on the CPU (its "cuda" buffer made on the CPU, its timer one plain call): what arrives
    on the device side is the written pattern, not the zeros of untouched pages."""
    real_empty, made = torch.empty, []

    def empty(*args, device=None, **kwargs):
        t = real_empty(*args, **kwargs)
        made.append((device, t))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(probe_cuda, "wall_best_time", lambda fn, reps: (fn(), 0.002)[1])
    gbps = probe_cuda.copy_gbps("h2d", pinned=False, nbytes=4 * MIB)
    assert gbps == pytest.approx(4 * MIB / 0.002 / 1e9)
    (device_buffer,) = [t for device, t in made if device == "cuda"]
    assert bool((device_buffer != 0).all())


def fake_properties(**fields):
    return lambda index: types.SimpleNamespace(name="NVIDIA Test GPU", **fields)


@pytest.mark.parametrize("fields, expected", [
    ({"pci_domain_id": 0, "pci_bus_id": 0x41, "pci_device_id": 0, "uuid": "0b42632a-bc5c-f731-724b-6936a19c4b24"},
     "00000000:41:00.0"),                                     # the bus id first: nvidia-smi's own format
    ({"pci_domain_id": 1, "pci_bus_id": 0xC1, "pci_device_id": 3}, "00000001:C1:03.0"),
    ({"uuid": "0b42632a-bc5c-f731-724b-6936a19c4b24"}, "GPU-0b42632a-bc5c-f731-724b-6936a19c4b24"),  # older torch
    ({"uuid": "GPU-0b42632a-bc5c-f731-724b-6936a19c4b24"}, "GPU-0b42632a-bc5c-f731-724b-6936a19c4b24"),
    ({}, None),
])
def test_the_device_is_named_to_nvidia_smi_by_bus_id_or_uuid(monkeypatch, fields, expected):
    monkeypatch.setattr(torch.cuda, "get_device_properties", fake_properties(**fields))
    assert probe_cuda.smi_device_id(0) == expected


def test_link_name_asks_nvidia_smi_about_torchs_device_not_index_0(monkeypatch):
    """Under CUDA_VISIBLE_DEVICES=1, torch's device 0 is the machine's second GPU: nvidia-smi must be
    asked about that GPU's bus id (an x8 link here), not about its own GPU 0."""
    asked = {}
    links = {"00000000:41:00.0": "4, 8\n", "0": "4, 16\n"}  # nvidia-smi's GPU 1 (torch's 0), and its GPU 0

    def run(cmd, **kwargs):
        asked["cmd"] = cmd
        device = next(a.removeprefix("--id=") for a in cmd if a.startswith("--id="))
        return subprocess.CompletedProcess(cmd, 0, stdout=links[device], stderr="")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(probe_cuda.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(probe_cuda.subprocess, "run", run)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        fake_properties(pci_domain_id=0, pci_bus_id=0x41, pci_device_id=0))
    assert probe_cuda.link_name(0) == "PCIe 4.0 x8"
    assert asked["cmd"][0] == "/usr/bin/nvidia-smi" and "--id=00000000:41:00.0" in asked["cmd"]


def test_link_name_without_a_way_to_name_the_device_does_not_guess(monkeypatch):
    monkeypatch.setattr(probe_cuda.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(probe_cuda.subprocess, "run", lambda *a, **k: pytest.fail("nvidia-smi asked without an id"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", fake_properties())
    assert probe_cuda.link_name(0) == "PCIe (generation unknown)"


def test_link_name_when_nvidia_smi_fails_or_is_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", fake_properties(uuid="abc"))
    monkeypatch.setattr(probe_cuda.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(probe_cuda.subprocess, "run",
                        lambda cmd, **k: subprocess.CompletedProcess(cmd, 6, stdout="", stderr="No devices"))
    assert probe_cuda.link_name(0) == "PCIe (generation unknown)"

    def timeout(cmd, **k):
        raise subprocess.TimeoutExpired(cmd, 10)

    monkeypatch.setattr(probe_cuda.subprocess, "run", timeout)
    assert probe_cuda.link_name(0) == "PCIe (generation unknown)"
    monkeypatch.setattr(probe_cuda.shutil, "which", lambda name: None)
    assert probe_cuda.link_name(0) == "PCIe (generation unknown)"


@pytest.mark.gpu
@pytest.mark.skipif(not probe_cuda.cuda_available(), reason="needs a CUDA device (torch.cuda.is_available())")
def test_on_a_gpu_the_device_has_a_name_nvidia_smi_takes():
    device = probe_cuda.smi_device_id(0)
    assert device is not None and (device.startswith("GPU-") or device.count(":") == 2)
