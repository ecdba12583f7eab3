"""The ``cpu`` lane's kernels (Numba, GIL released): experts over row slices, norms and attention.

``from offloadkit.kernels.cpu import ExpertWeights, expert_rows`` is the usual entry point; see
:mod:`offloadkit.kernels.cpu.experts` for the contract and the submodules for each path
(:mod:`~offloadkit.kernels.cpu.layer_ops` for RoPE, the cache write and routing;
:mod:`~offloadkit.kernels.cpu.decode_layer` for a whole decode step in one call, as the CPU engine runs it).
"""

from offloadkit.kernels.cpu.experts import DECODE_MAX_TOKENS, ExpertWeights, expert_rows, linear
from offloadkit.kernels.cpu.norms_attention import causal_attention, layer_norm, rms_norm

__all__ = ["DECODE_MAX_TOKENS", "ExpertWeights", "causal_attention", "expert_rows", "layer_norm", "linear",
           "rms_norm"]
