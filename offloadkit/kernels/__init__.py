"""Kernels: the code that does the arithmetic of every lane, one folder per device.

- :mod:`offloadkit.kernels.cpu` — Numba kernels of the ``cpu`` lane: the SwiGLU expert over a row
  slice (``experts`` is the entry point; ``decode`` and ``prefill`` are its two paths; ``primitives``
  holds the widening and fused dot products they share), plus ``norms_attention`` for the small
  operations around the experts.
- :mod:`offloadkit.kernels.cuda` — the ``gpu`` lane: raw CUDA C sources (``cuda/src/*.cu``, also
  reachable as the repository's top-level ``kernels/``), compiled by NVRTC (``nvrtc``), loaded and
  launched through CuPy (``loader``, ``ops``), their CPU twins (``twins``) and a CPU emulation that
  runs the CUDA source itself (``emulate``).
- :mod:`offloadkit.kernels.checks` — the input contract both folders enforce before a launch.

The course's step-by-step teaching versions live in :mod:`offloadkit.course`, and the STREAM-like
memory read that kernels are measured against lives with the probe in
:mod:`offloadkit.hardware.stream`: neither is a production kernel.
"""
