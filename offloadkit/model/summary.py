"""Where a model's bytes are: the breakdown ``offloadkit info`` prints and notebook 01 plots.

One function computes the rows (block kind, parameters, bytes, active per token), the others only
format them, so the CLI table and the notebook's charts never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from offloadkit.model.spec import ModelSpec

#: Readable names of block kinds, in forward order.
KIND_LABELS: dict[str, str] = {
    "embed": "embedding", "attn_norm": "attention norm", "attn_qkv": "attention QKV",
    "attn_o": "attention O", "ffn_norm": "FFN norm", "router": "router", "expert": "routed experts",
    "shared_expert": "shared expert", "shared_gate": "shared-expert gate", "ffn": "dense FFN",
    "final_norm": "final norm", "lm_head": "lm_head",
}


@dataclass(frozen=True)
class BreakdownRow:
    kind: str
    params: int
    active_params: int
    bytes_: int


def breakdown(spec: ModelSpec) -> list[BreakdownRow]:
    """Parameters and bytes by block kind, in forward order."""
    total = spec.params_by_kind()
    active = spec.active_params_by_kind()
    return [BreakdownRow(k, total[k], active[k], spec.bytes_of(total[k])) for k in KIND_LABELS if k in total]


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M'; bytes with unit='B' -> '1.15 GiB'."""
    if unit == "B":
        for suffix, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if n >= scale:
                return f"{n / scale:.2f} {suffix}"
        return f"{n:.0f} B"
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f}"


def format_breakdown(spec: ModelSpec) -> str:
    """The table ``offloadkit info`` prints."""
    rows = breakdown(spec)
    lines = [f"{spec.name or spec.arch}  ({spec.arch}, {spec.n_layers} layers, hidden {spec.hidden_size}, "
             + (f"{spec.n_experts} experts top-{spec.top_k}, " if spec.is_moe else "dense, ")
             + f"stored as {spec.dtype})",
             f"{'block':<20}{'params':>12}{'bytes':>13}{'share':>8}{'active/token':>15}"]
    total = spec.total_params
    for r in rows:
        lines.append(f"{KIND_LABELS[r.kind]:<20}{human(r.params):>12}{human(r.bytes_, 'B'):>13}"
                     f"{100 * r.params / total:>7.1f}%{human(r.active_params):>15}")
    lines.append(f"{'total':<20}{human(total):>12}{human(spec.total_bytes, 'B'):>13}{100.0:>7.1f}%"
                 f"{human(spec.active_params):>15}")
    lines.append(f"KV cache: {human(spec.kv_bytes_per_token(), 'B')} per token "
                 f"({human(spec.kv_bytes_per_token() * 4096, 'B')} for 4096 tokens)")
    return "\n".join(lines)
