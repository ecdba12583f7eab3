"""One name -> one device: ``--device loopback|cuda[:N]`` of the command line and ``open_hybrid``.

It lives apart from :mod:`offloadkit.runtime.devices` because it imports both implementations, and
:mod:`offloadkit.runtime.cuda_device` imports the interface from there.
"""

from __future__ import annotations

from typing import Any

from offloadkit.errors import DeviceError
from offloadkit.runtime.devices import Device, LoopbackDevice


def open_device(kind: str, **kwargs: Any) -> Device:
    """``"loopback"`` or ``"cuda"`` / ``"cuda:N"`` -> a device; CUDA without CUDA is refused, saying what was
    looked for (:class:`~offloadkit.errors.CudaUnavailableError`)."""
    if kind == "loopback":
        return LoopbackDevice(**kwargs)
    if kind == "cuda" or kind.startswith("cuda:"):
        from offloadkit.runtime.cuda_device import CudaDevice

        index = kind.split(":", 1)[1] if ":" in kind else "0"
        if not index.isdigit():
            raise DeviceError(f"unknown device {kind!r}: CUDA devices are cuda or cuda:N")
        return CudaDevice(int(index), **kwargs)
    raise DeviceError(f"unknown device {kind!r}: use 'loopback' (CPU threads standing in for a GPU) or 'cuda'")


__all__ = ["open_device"]
