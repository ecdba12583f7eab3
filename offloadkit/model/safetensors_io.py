"""The safetensors file format: tensors read through ``safetensors.safe_open``, headers checked first.

A safetensors file is ``[u64 little-endian header length N][N bytes of JSON][tensor data]``. The JSON
maps each tensor name to ``{"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}`` (offsets
relative to the start of the data) plus an optional ``"__metadata__"`` object of strings.

Tensors come from the library the field uses, ``safe_open(path, framework="pt").get_tensor(name)``.
With torch it memory-maps the whole file once, privately (copy-on-write: writing into a tensor never
changes the file), and hands out each tensor as a view on that map: checked with safetensors 0.4.0,
0.5.0 and 0.8.0, the tensor's data pointer lies inside the file's mapping in ``/proc/self/maps``, and
viewing every tensor of a 456 MB bf16 checkpoint adds 0.1 MB of private memory. So a 90 GB Mixtral
costs neither 90 GB of RAM nor the time to copy it; the operating system pages weights in when a
kernel first touches them.

One cost the hand-written map this module used before did not have: ``get_tensor`` (and ``get_slice``)
touches the first bytes of each tensor as it builds the view (``torch.asarray`` over a slice of a
file-mapped storage does that here, ``Tensor.set_`` on it does not), so each tensor faults in the
page-cache folio it starts in: 64 KiB of fault-around to 2 MiB for a large folio. On that 456 MB
checkpoint of 127 tensors (benchmarks/checkpoint_open.py, means of 5, two runs): viewing every tensor
took 300-390 ms from a cold page cache (1.2-1.5 ms before) and 5 ms from a warm one (1.2-1.6 ms), and
file-backed RSS grew 121 MB cold and 208 MB warm (1.7 MB before); opening itself (3 ms) and the first
read of a tensor did not change. Those pages are shared, clean page cache, not a copy, and the cost is
per tensor, not per byte: for Mixtral-8x7B's 995 tensors it is at most ~2 GB of its 87 GiB. We take it
for the library's checks and upkeep.

What offloadkit keeps of its own: :func:`read_header`, a thin check of the header, run before
``safe_open``, so that every way a file can be broken gets a message naming the file, the tensor
and what was expected (the library says "invalid offset for tensor `f`" or "incomplete metadata,
file not fully covered"), and the byte range of every tensor (:class:`TensorInfo`; ``safe_open``
does not expose offsets). Whatever ``safe_open`` refuses beyond these checks is re-raised as
:class:`CheckpointError` with the file named. It *describes* tensors of any safetensors dtype
(``I8``, ``F64``, ``F8_E4M3``...), but hands out only bf16 / f16 / f32 ones (:class:`DTypeError`);
what to compute with is decided above, in :mod:`offloadkit.model.checkpoint`. A tensor that another
writer stored at an offset that is not a multiple of its element size is copied (safetensors hands
it out misaligned, which the kernels must not be given).

The writer, :func:`write_safetensors`, is offloadkit's own because ``safetensors.torch.save_file``
takes the whole ``{name: tensor}`` dict at once: writing a random Mixtral-8x7B that way would hold
87 GiB in RAM, whereas ours produces and writes one tensor at a time. Files it writes are read by
``safe_open`` and by transformers (tests/test_checkpoint.py, tests/test_writer.py).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from offloadkit.errors import CheckpointError, DTypeError

#: Safetensors dtype code -> (offloadkit's name, bytes per element; 0 for sub-byte packed formats).
ST_DTYPES: dict[str, tuple[str, int]] = {
    "BF16": ("bfloat16", 2), "F16": ("float16", 2), "F32": ("float32", 4), "F64": ("float64", 8),
    "I8": ("int8", 1), "U8": ("uint8", 1), "I16": ("int16", 2), "U16": ("uint16", 2),
    "I32": ("int32", 4), "U32": ("uint32", 4), "I64": ("int64", 8), "U64": ("uint64", 8),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1), "E8M0": ("float8_e8m0fnu", 1), "C64": ("complex64", 8),
    "F4": ("float4_e2m1", 0), "F6_E2M3": ("float6_e2m3", 0), "F6_E3M2": ("float6_e3m2", 0),
}
#: The dtypes offloadkit computes with: code -> torch dtype.
COMPUTE_DTYPES: dict[str, torch.dtype] = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
#: torch dtype -> safetensors code, for writing.
TORCH_TO_ST: dict[torch.dtype, str] = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces

UNSUPPORTED_HINT = "offloadkit computes with bfloat16, float16 or float32; convert the checkpoint first"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file`` bytes ``[start, stop)`` (absolute file offsets)."""

    name: str
    st_dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int
    file: Path

    @property
    def dtype(self) -> str:
        """offloadkit's name for the stored dtype: ``"BF16"`` -> ``"bfloat16"``."""
        return ST_DTYPES[self.st_dtype][0]

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


# ---- reading the header --------------------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"the name {k!r} appears twice")
        seen[k] = v
    return seen


def _entry(path: Path, name: str, raw: object, data_start: int) -> TensorInfo:
    """Check one header entry and turn it into a :class:`TensorInfo`."""
    bad = f"{path}: corrupt safetensors header: tensor {name!r}"
    if not isinstance(raw, dict) or not {"dtype", "shape", "data_offsets"} <= raw.keys():
        raise CheckpointError(f"{bad} needs 'dtype', 'shape' and 'data_offsets', found {raw!r}")
    code, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if code not in ST_DTYPES:
        raise CheckpointError(f"{bad} has an unknown dtype {code!r} (known: {', '.join(ST_DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{bad} has a bad shape {shape!r} (want a list of non-negative integers)")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{bad} has bad data_offsets {offsets!r} (want [begin, end], 0 <= begin <= end)")
    begin, end = offsets
    itemsize = ST_DTYPES[code][1]
    if itemsize and (end - begin) != math.prod(shape) * itemsize:
        raise CheckpointError(f"{bad} spans {end - begin} bytes (data_offsets {offsets}) but shape "
                              f"{tuple(shape)} of {code} needs {math.prod(shape) * itemsize}")
    return TensorInfo(name, code, tuple(shape), data_start + begin, data_start + end, path)


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check the header of a safetensors file: ``({name: TensorInfo}, metadata)``.

    Checks the length prefix, the JSON, every entry's dtype/shape/offsets, that no two tensors
    overlap, and that the file is long enough to hold every tensor (else it is truncated).
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path} is {size} bytes long, too short to be a safetensors file "
                              f"(it starts with an 8-byte header length)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header: its length prefix says {n} bytes, "
                                  f"but the file has {size} bytes (a header must be 1..{MAX_HEADER_BYTES} "
                                  f"bytes and fit in the file); the file is damaged or not safetensors")
        raw_header = f.read(n)
    try:
        header = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: it is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: JSON is a {type(header).__name__}, "
                              f"not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map strings to "
                              f"strings, found {metadata!r}")
    data_start = 8 + n
    infos = {name: _entry(path, name, raw, data_start) for name, raw in header.items()}

    ordered = sorted((i for i in infos.values() if i.nbytes), key=lambda i: i.start)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.start < a.stop:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors {a.name!r} and {b.name!r} "
                                  f"overlap (bytes {a.start - data_start}..{a.stop - data_start} and "
                                  f"{b.start - data_start}..{b.stop - data_start} of the data)")
    if ordered and ordered[-1].stop > size:
        last = ordered[-1]
        raise CheckpointError(f"{path} is truncated or its header is corrupt: the header says the tensor "
                              f"data ends at byte {last.stop} (tensor {last.name!r}), but the file has "
                              f"{size} bytes; download or write it again")
    return infos, metadata


# ---- reading tensors -----------------------------------------------------------------------------


class SafetensorsFile:
    """One safetensors file, header checked and opened with ``safe_open``; ``tensor(name)`` is a view.

    The map lives as long as the file object *or any tensor taken from it*: :meth:`close` drops this
    object's handle, and the operating system unmaps the file when the last view is freed.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.infos, self.metadata = read_header(self.path)
        try:
            self._handle = safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError) as e:  # what the header checks let through: gaps, trailing bytes
            raise CheckpointError(f"{self.path}: the safetensors library refuses the file: {e}; the file is "
                                  f"damaged or was written by a non-conforming tool") from e

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a view on the mapped file (bf16 / f16 / f32 only)."""
        if self._handle is None:
            raise CheckpointError(f"{self.path} has been closed")
        info = self.infos[name]
        if info.st_dtype not in COMPUTE_DTYPES:
            raise DTypeError(f"tensor {name!r} in {self.path} is stored as {info.st_dtype} ({info.dtype}); "
                             f"{UNSUPPORTED_HINT}")
        t = self._handle.get_tensor(name)
        if t.data_ptr() % t.element_size():  # misaligned (other writers): copy this one
            t = t.clone()
        return t

    def close(self) -> None:
        """Release this object's handle on the map; views handed out stay valid."""
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
            self._handle = None


# ---- writing -------------------------------------------------------------------------------------


def write_safetensors(path: str | Path, layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write a safetensors file tensor by tensor; returns the bytes of tensor data written.

    ``layout`` lists ``(name, dtype, shape)`` in file order; ``produce(name)`` is called once per
    tensor, in that order, so a caller can generate or convert one tensor at a time instead of
    holding the whole model. The file is written under a temporary name and renamed at the end, so
    an interrupted write never leaves a truncated file under the real name.
    """
    path = Path(path)
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, dtype, shape in layout:
        if dtype not in TORCH_TO_ST:
            raise DTypeError(f"cannot write tensor {name!r} as {dtype}: {UNSUPPORTED_HINT}")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # pad with spaces so the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in layout:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"tensor {name!r} came as {t.dtype} {tuple(t.shape)}, layout says "
                                      f"{dtype} {tuple(shape)}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)
    return offset


__all__ = [
    "COMPUTE_DTYPES", "ST_DTYPES", "SafetensorsFile", "TensorInfo", "read_header", "write_safetensors",
]
