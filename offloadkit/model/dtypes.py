"""The dtypes offloadkit stores weights in, and the one place their names are normalized.

A leaf module (it imports nothing from the package but its errors) so that the config reader, the
spec, the writer and the cost model can all ask it without importing one another.
"""

from __future__ import annotations

from offloadkit.errors import DTypeError

#: Bytes per element of the dtypes offloadkit stores weights in.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

def normalize_dtype(name: str | None) -> str:
    """``"bf16"``, ``"torch.bfloat16"``, ``"bfloat16"`` -> ``"bfloat16"``; rejects the rest."""
    if name is None:
        return "float32"
    key = str(name).removeprefix("torch.").lower()
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "f16": "float16",
               "fp32": "float32", "f32": "float32", "float": "float32"}
    key = aliases.get(key, key)
    if key not in DTYPE_BYTES:
        raise DTypeError(f"unsupported dtype {name!r}: offloadkit computes with {', '.join(DTYPE_BYTES)}")
    return key


__all__ = ["DTYPE_BYTES", "normalize_dtype"]
