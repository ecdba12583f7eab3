"""Rotary position embeddings (RoPE) exactly as transformers 5.23 computes them, for every supported rope type.

RoPE rotates each (i, i + D/2) pair of a query or key head by the angle ``position * inv_freq[i]``.
The rope *types* only change ``inv_freq`` and a scale applied to cos / sin:

- ``default``: ``inv_freq[i] = theta ** (-2i / D)``, scale 1.
- ``linear``: the default frequencies divided by ``factor``.
- ``llama3``: low frequencies divided by ``factor``, high ones kept, a smooth ramp between.
- ``longrope``: ``inv_freq[i] = 1 / (ext[i] * theta ** (2i / D))`` where ``ext`` is ``long_factor`` if
  the sequence (largest position + 1 of this call) passes ``original_max_position_embeddings``,
  else ``short_factor``; cos / sin are scaled by ``attention_factor`` (given, or
  ``sqrt(1 + ln(factor) / ln(original_max))``).

PhiMoE is a special case, matched on purpose: ``PhimoeRotaryEmbedding.forward`` in transformers 5.23
recomputes its frequencies with ``rope_init_fn(config)`` and *no* sequence length, so it always uses
``short_factor``; what switches with the sequence length is only the scale, ``long_mscale`` or
``short_mscale``. (Microsoft's original PhiMoE code switched both.) The oracle follows transformers,
because the numerics contract (docs/DESIGN.md section 10) is "equal to transformers".

The choice of long or short is made once per forward call from the largest position in it, as
transformers does, so a long prompt run in one call and the same prompt run in two calls can differ
for the positions before the threshold: that is transformers' behaviour, not ours to fix.

This module refuses what transformers would compute differently from the formulas above: partial
rotary dimensions and the dynamic / yarn rope types (the config reader refuses those already).
"""

from __future__ import annotations

import math

import torch

from offloadkit.errors import ConfigError
from offloadkit.model.spec import ModelSpec


def _param(spec: ModelSpec, key: str):
    try:
        return spec.rope.params[key]
    except KeyError:
        raise ConfigError(f"rope scaling {spec.rope.rope_type!r} of {spec.name or spec.arch} needs the field "
                          f"{key!r} in rope_scaling / rope_parameters") from None


def _exponents(dim: int) -> torch.Tensor:
    """``2i / D`` for i in [0, D/2), in f32 as transformers computes it."""
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def inv_freq(spec: ModelSpec, seq_len: int | None) -> torch.Tensor:
    """The f32 inverse frequencies [D/2] of ``spec``'s rope type for a call whose largest position is
    ``seq_len - 1`` (``None``: the short / initial set, as transformers' init functions)."""
    if float(spec.rope.params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    dim, theta, kind = spec.head_dim, spec.rope.theta, spec.rope.rope_type
    base = 1.0 / (theta ** _exponents(dim))
    if kind == "default":
        return base
    if kind == "linear":
        return base / float(_param(spec, "factor"))
    if kind == "llama3":
        factor = float(_param(spec, "factor"))
        low, high = float(_param(spec, "low_freq_factor")), float(_param(spec, "high_freq_factor"))
        old_len = float(_param(spec, "original_max_position_embeddings"))
        wavelen = 2 * math.pi / base
        scaled = torch.where(wavelen > old_len / low, base / factor, base)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    if kind == "longrope":
        original = int(_param(spec, "original_max_position_embeddings"))
        use_long = bool(seq_len) and seq_len > original
        ext = torch.tensor(_param(spec, "long_factor" if use_long else "short_factor"), dtype=torch.float32)
        if ext.shape != (dim // 2,):
            raise ConfigError(f"longrope factors must have head_dim / 2 = {dim // 2} entries, found {ext.numel()}")
        return 1.0 / (ext * theta ** _exponents(dim))
    raise ConfigError(f"rope type {kind!r} is not supported")


def attention_scale(spec: ModelSpec, seq_len: int) -> float:
    """The factor transformers multiplies cos and sin by (1.0 for default / linear / llama3)."""
    if spec.arch == "phimoe" and spec.rope.rope_type != "default":
        original = int(_param(spec, "original_max_position_embeddings"))
        return float(_param(spec, "long_mscale" if seq_len > original else "short_mscale"))
    if spec.rope.rope_type != "longrope":
        return 1.0
    given = spec.rope.params.get("attention_factor")
    if given is not None:
        return float(given)
    original = int(_param(spec, "original_max_position_embeddings"))
    factor = spec.rope.params.get("factor") or spec.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rotary_tables(spec: ModelSpec, positions: torch.Tensor, dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, D] for the 1-D ``positions`` of one forward call, e.g. ``arange(16, 17)``."""
    seq_len = int(positions.max()) + 1
    # PhiMoE computes its frequencies without the sequence length (see the module docstring).
    freqs_len = None if spec.arch == "phimoe" else seq_len
    freqs = positions.float()[:, None] * inv_freq(spec, freqs_len).to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = attention_scale(spec, seq_len)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, heads, T, D] by the tables of :func:`rotary_tables` ([T, D])."""
    return x * cos + rotate_half(x) * sin


__all__ = ["apply_rope", "attention_scale", "inv_freq", "rotary_tables", "rotate_half"]
