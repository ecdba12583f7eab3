"""Open a Hugging Face checkpoint folder as a mapping of zero-copy tensors, checked against its spec.

``open_checkpoint("mixtral-8x7b/")`` reads ``config.json`` (-> :class:`ModelSpec`), finds the weights
(``model.safetensors``, or ``model.safetensors.index.json`` and its shards), opens every file with
``safetensors.safe_open`` (which memory-maps it; see :mod:`offloadkit.model.safetensors_io`) and
checks, from the headers alone, that each tensor the spec names is there with the right shape and a
dtype offloadkit computes with. Nothing is read into RAM: ``ckpt[name]`` is a view on the map, so a
:class:`Checkpoint` can be handed to anything that expects a ``{name: tensor}`` weights dict, and the
engine pays for pages only when it touches them (and can copy a CG slice to the GPU straight from the
page cache).

What it refuses, each with a message naming the file and the tensor: a path that does not exist, a
folder without weights (or with only ``pytorch_model.bin``: pickles are not read), truncated or corrupt
files, an index naming a missing shard, a missing tensor, a wrong shape, and dtypes other than
bf16 / f16 / f32 (quantized checkpoints are out of scope: the paper's point is no accuracy loss).
Tensors the spec does not name are ignored: rotary ``inv_freq`` buffers and a tied ``lm_head``
silently, anything else with a warning.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

import torch

from offloadkit.errors import CheckpointError, DTypeError, ModelNotFoundError
from offloadkit.model.safetensors_io import COMPUTE_DTYPES, UNSUPPORTED_HINT, SafetensorsFile, TensorInfo
from offloadkit.model.spec import ModelSpec

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: Non-persistent buffers that old exports saved by mistake; never weights.
_BUFFER = re.compile(r"(^|\.)rotary_emb\.(original_)?inv_freq$")
#: Weight formats we recognise in order to say why we do not read them.
_OTHER_FORMATS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz")


def is_ignorable(name: str, spec: ModelSpec) -> bool:
    """Extra tensors that are silently skipped: rotary ``inv_freq`` buffers and a tied ``lm_head``."""
    return bool(_BUFFER.search(name)) or (spec.tie_word_embeddings and name == "lm_head.weight")


def _listing(names: list[str], at_most: int = 6) -> str:
    """``["a", "b", "c"], 2 -> "'a', 'b' (and 1 more)"``."""
    shown = ", ".join(repr(n) for n in names[:at_most])
    return shown + (f" (and {len(names) - at_most} more)" if len(names) > at_most else "")


# ---- finding the files ---------------------------------------------------------------------------


def _shards_from_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    """The shard files an index names (in order of first mention) and its weight map."""
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read {index}: {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} has no 'weight_map' object (tensor name -> shard file name)")
    shards = list(dict.fromkeys(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index} names {len(missing)} shard(s) missing from {index.parent}: "
                              f"{_listing(missing)}; download or write them again")
    return [index.parent / s for s in shards], weight_map


def _weight_files(folder: Path) -> tuple[list[Path], Path | None, dict[str, str]]:
    """(files, index or None, weight map) of the weights in a model folder."""
    if (folder / SINGLE_FILE).exists():  # preferred over an index, as transformers does
        return [folder / SINGLE_FILE], None, {}
    if (folder / INDEX_FILE).exists():
        files, weight_map = _shards_from_index(folder / INDEX_FILE)
        return files, folder / INDEX_FILE, weight_map
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others, None, {}
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _OTHER_FORMATS)
    hint = (f"; found {_listing(pickles)}, which offloadkit does not read (convert with transformers: "
            f"model.save_pretrained(dir, safe_serialization=True))" if pickles else "")
    raise CheckpointError(f"no weights in {folder}: expected {SINGLE_FILE}, or {INDEX_FILE} with the "
                          f"model-XXXXX-of-XXXXX.safetensors shards it names{hint}")


def _open_files(files: list[Path]) -> tuple[dict[Path, SafetensorsFile], dict[str, TensorInfo]]:
    opened: dict[Path, SafetensorsFile] = {}
    infos: dict[str, TensorInfo] = {}
    try:
        for path in files:
            opened[path] = st = SafetensorsFile(path)
            for name, info in st.infos.items():
                if name in infos:
                    raise CheckpointError(f"tensor {name!r} is stored twice: in {infos[name].file.name} "
                                          f"and in {path.name}")
                infos[name] = info
    except BaseException:
        for st in opened.values():
            st.close()
        raise
    return opened, infos


# ---- the checkpoint ------------------------------------------------------------------------------


class Checkpoint(Mapping[str, torch.Tensor]):
    """The weights of one model: ``{Hugging Face name: tensor view on the mapped file}``.

    Keys are the tensors of ``spec.tensors()`` that the files hold (all of them once validated), in
    forward order. Each access builds a fresh view (``safe_open().get_tensor``: ~25 us, no copy). Views
    stay valid after :meth:`close`; the files are unmapped when the last of them is freed.
    """

    def __init__(self, path: Path, spec: ModelSpec, files: dict[Path, SafetensorsFile],
                 infos: dict[str, TensorInfo]) -> None:
        self.path = path
        self.spec = spec
        self._files: dict[Path, SafetensorsFile] | None = files
        self._infos = infos
        self._names = [n for n in spec.tensors() if n in infos]
        self._name_set = frozenset(self._names)

    # ---- Mapping --------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._name_set:
            raise KeyError(name)
        if self._files is None:
            raise CheckpointError(f"checkpoint {self.path} has been closed")
        info = self._infos[name]
        return self._files[info.file].tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self._name_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    # ---- what is stored -------------------------------------------------------------------------

    @property
    def files(self) -> list[Path]:
        """The safetensors files, in the order they were opened."""
        return list(dict.fromkeys(i.file for i in self._infos.values()))

    def info(self, name: str) -> TensorInfo:
        """Where tensor ``name`` lives: file, byte range, stored dtype and shape."""
        return self._infos[name]

    def dtype_of(self, name: str) -> str:
        """The stored dtype of ``name`` as offloadkit names it: ``"bfloat16"``, ``"int8"``..."""
        return self._infos[name].dtype

    @property
    def dtype(self) -> str:
        """The stored dtype of the model: the one holding the most bytes (``"bfloat16"``...)."""
        by_dtype: dict[str, int] = {}
        for n in self._names:
            by_dtype[self.dtype_of(n)] = by_dtype.get(self.dtype_of(n), 0) + self._infos[n].nbytes
        return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else self.spec.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors of the spec, as stored."""
        return sum(self._infos[n].nbytes for n in self._names)

    @property
    def extra_names(self) -> list[str]:
        """Stored tensors the spec does not name (ignored)."""
        return [n for n in self._infos if n not in self._name_set]

    # ---- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the checkpoint's hold on its maps; further ``ckpt[name]`` raise CheckpointError."""
        for st in (self._files or {}).values():
            st.close()
        self._files = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Checkpoint({str(self.path)!r}, arch={self.spec.arch}, tensors={len(self)}, "
                f"dtype={self.dtype}, {self.nbytes / 1e9:.3f} GB in {len(self.files)} file(s))")


# ---- opening and checking ------------------------------------------------------------------------


def _validate(where: Path, spec: ModelSpec, infos: dict[str, TensorInfo]) -> None:
    expected = spec.tensors()
    missing = [n for n in expected if n not in infos]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} tensor(s) that the {spec.arch} config calls "
                              f"for: {_listing(missing)}; do config.json and the weights belong together?")
    for name in expected:
        info = infos[name]
        if info.st_dtype not in COMPUTE_DTYPES:
            raise DTypeError(f"tensor {name!r} in {info.file.name} is stored as {info.st_dtype} "
                             f"({info.dtype}); {UNSUPPORTED_HINT}")
    for name, shape in expected.items():
        info = infos[name]
        if info.shape != tuple(shape):
            raise CheckpointError(f"tensor {name!r} in {info.file.name} has shape {info.shape}, but the "
                                  f"config expects {tuple(shape)}")
    extras = [n for n in infos if n not in expected and not is_ignorable(n, spec)]
    if extras:
        warnings.warn(f"{where}: ignoring {len(extras)} tensor(s) the {spec.arch} config does not name: "
                      f"{_listing(extras)}", stacklevel=3)


def _check_index(index: Path, weight_map: dict[str, str], infos: dict[str, TensorInfo]) -> None:
    for name, shard in weight_map.items():
        info = infos.get(name)
        if info is None or info.file != index.parent / shard:
            raise CheckpointError(f"{index} says tensor {name!r} is in {shard}, but that shard does not "
                                  f"hold it" + (f" ({info.file.name} does)" if info else ""))


def open_checkpoint(path: str | Path, spec: ModelSpec | None = None, *, validate: bool = True) -> Checkpoint:
    """Open the checkpoint at ``path``: a model folder, a ``.safetensors`` file or an index file.

    ``spec`` defaults to the one read from ``config.json`` beside the weights. With ``validate``
    (the default) every tensor of the spec must be present, with its shape and a bf16/f16/f32 dtype;
    with ``validate=False`` only the files themselves are checked and the keys are whatever of the
    spec's tensors the files hold.
    """
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"{p} does not exist: expected a model folder holding config.json and "
                                 f"{SINGLE_FILE} (or {INDEX_FILE} and its shards)")
    folder = p if p.is_dir() else p.parent
    if spec is None:
        spec = ModelSpec.from_file(folder)
    index, weight_map = None, {}
    if p.is_dir():
        files, index, weight_map = _weight_files(p)
    elif p.name.endswith(".index.json"):
        index = p
        files, weight_map = _shards_from_index(p)
    elif p.suffix == ".safetensors":
        files = [p]
    else:
        raise CheckpointError(f"{p} is neither a model folder, a .safetensors file nor a "
                              f".safetensors.index.json file")
    opened, infos = _open_files(files)
    try:
        if index is not None:
            _check_index(index, weight_map, infos)
        if validate:
            _validate(p, spec, infos)
    except BaseException:
        for st in opened.values():
            st.close()
        raise
    return Checkpoint(folder, spec, opened, infos)


__all__ = ["INDEX_FILE", "SINGLE_FILE", "Checkpoint", "is_ignorable", "open_checkpoint"]
