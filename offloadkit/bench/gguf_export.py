"""Export an offloadkit / Hugging Face checkpoint as GGUF, so that llama.cpp runs the very same weights.

A benchmark against llama.cpp means something only if both engines compute the same function of the
same numbers. ``export_gguf("bench-moe-bfloat16/", "m.gguf", "bfloat16")`` writes the checkpoint with
the ``gguf`` package (the version pinned in pyproject.toml matches the ``gguf-py`` of the llama.cpp
tree ``make llamacpp`` builds), with llama.cpp's tensor names and metadata, as its own converter
(``convert_hf_to_gguf.py``, ``conversion/llama.py`` and ``conversion/qwen.py``) would:

- **Mixtral and LLaMA** become llama.cpp's ``llama`` architecture. Its RoPE rotates *adjacent* pairs
  (``LLAMA_ROPE_TYPE_NORM``) where Hugging Face rotates the two halves of each head, so the rows of
  ``q_proj`` and ``k_proj`` (weights and biases) are permuted within each head: HF row
  ``h*D + j*(D/2) + i`` becomes GGUF row ``h*D + 2*i + j`` (conversion/llama.py, ``LlamaModel.permute``).
  Mixtral's experts are stacked per layer into 3-D ``ffn_{gate,up,down}_exps`` tensors
  ``[experts, rows, cols]``; ``expert_count`` and ``expert_used_count`` say how many there are.
- **Qwen2-MoE** becomes ``qwen2moe`` (NEOX RoPE, the HF layout: no permutation), with the shared expert
  (``ffn_*_shexp``), its sigmoid gate (``ffn_gate_inp_shexp``) and ``expert_feed_forward_length`` /
  ``expert_shared_feed_forward_length``. llama.cpp's graph (src/models/qwen2moe.cpp) makes every layer
  MoE and never renormalizes the top-k weights, so configs with dense layers or ``norm_topk_prob`` are
  refused.
- **PhiMoE** is refused: llama.cpp's ``phimoe`` runs the phi3 graph (src/models/models.h:663), which
  normalizes with RMSNorm plus a bias (src/models/phi3.cpp:99-102, 137-139) where PhiMoE uses LayerNorm,
  and routes by a renormalized softmax top-2 (phi3.cpp:153-162) where PhiMoE uses sparsemixer; its
  outputs would not be offloadkit's (read from the source, not run).

Tensors are written in the asked dtype (f32, f16 or bf16) except, as the converter does, 1-D tensors,
norms and routers, which llama.cpp keeps in f32 (exact: widening loses nothing). Tensors stream one at
a time from the memory-mapped checkpoint into the file (a layer's stacked experts are the largest piece
held in RAM), and the file is written under a temporary name and renamed at the end, so an interrupted
export never leaves a file a cache would take for finished. The tokenizer metadata comes from
:mod:`offloadkit.bench.gguf_vocab`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from offloadkit.bench.gguf_vocab import checkpoint_vocab, gguf  # gguf_vocab says how to install gguf if missing
from offloadkit.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from offloadkit.model.checkpoint import Checkpoint, open_checkpoint
from offloadkit.model.config import RopeSpec
from offloadkit.model.dtypes import normalize_dtype
from offloadkit.model.rope import inv_freq
from offloadkit.model.spec import ModelSpec

#: offloadkit architecture -> llama.cpp architecture.
GGUF_ARCH = {"mixtral": "llama", "llama": "llama", "qwen2_moe": "qwen2moe"}
#: Bumped whenever the files written change; caches (:func:`offloadkit.bench.llamacpp.gguf_path`) compare it.
EXPORT_VERSION = 1
VERSION_KEY = "offloadkit.gguf_export.version"
_GGML = {"float32": gguf.GGMLQuantizationType.F32, "float16": gguf.GGMLQuantizationType.F16,
         "bfloat16": gguf.GGMLQuantizationType.BF16}
_FILE_TYPE = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
              "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NP_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16 goes out as raw bits


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: its GGUF name, numpy-order shape, dtype, and how to make it (lazily)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _TORCH[self.dtype].itemsize


# ---- what llama.cpp can run ----------------------------------------------------------------------


def check_exportable(spec: ModelSpec) -> str:
    """The llama.cpp architecture of ``spec``; raises if llama.cpp would compute something else."""
    where = spec.name or spec.arch
    if spec.arch == "phimoe":
        raise UnsupportedArchitectureError(
            "architecture 'phimoe' is not exported to GGUF: llama.cpp's phimoe runs the phi3 graph "
            "(src/models/phi3.cpp), which normalizes with RMSNorm plus a bias where PhiMoE uses LayerNorm and "
            "routes by softmax top-2 where PhiMoE uses sparsemixer, so llama.cpp would not compute this model")
    if spec.arch not in GGUF_ARCH:
        raise UnsupportedArchitectureError(f"architecture {spec.arch!r} is not exported to GGUF; offloadkit exports "
                                           f"{', '.join(GGUF_ARCH)}")
    if spec.sliding_window is not None and spec.sliding_window < spec.max_position_embeddings:
        raise ConfigError(f"{where} uses a sliding window of {spec.sliding_window} positions; llama.cpp's "
                          f"{GGUF_ARCH[spec.arch]} architecture has none, so it would attend differently")
    rope_ok = ("default", "linear", "llama3") if GGUF_ARCH[spec.arch] == "llama" else ("default", "linear")
    if spec.rope.rope_type not in rope_ok:
        raise ConfigError(f"{where}: rope type {spec.rope.rope_type!r} is not exported to llama.cpp's "
                          f"{GGUF_ARCH[spec.arch]} (exported: {', '.join(rope_ok)})")
    if spec.arch == "qwen2_moe":
        dense = [i for i in range(spec.n_layers) if not spec.is_moe_layer(i)]
        problems = []
        if dense:
            problems.append(f"dense layers {dense} (llama.cpp makes every layer MoE)")
        if spec.norm_topk_prob:
            problems.append("norm_topk_prob=true (llama.cpp never renormalizes the top-k weights)")
        if not spec.shared_expert_intermediate_size:
            problems.append("no shared expert (llama.cpp requires one)")
        if spec.n_heads * spec.head_dim != spec.hidden_size:
            problems.append("heads * head_dim != hidden_size (llama.cpp's qwen2moe assumes they are equal)")
        if problems:
            raise UnsupportedArchitectureError(f"this qwen2_moe config cannot be exported to llama.cpp's qwen2moe: "
                                               f"{'; '.join(problems)}")
    return GGUF_ARCH[spec.arch]


# ---- the tensors ---------------------------------------------------------------------------------


def rope_permute(w: torch.Tensor, n_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of each head from HF's half-split order to llama.cpp's interleaved pairs, in ``dtype``.

    Rows ``[h, j, i]`` (head, half, index: HF row ``h*D + j*D/2 + i``) become ``[h, i, j]``;
    ``w`` is a weight ``[heads*D, in]`` or a bias ``[heads*D]``. One copy is made, already in ``dtype``.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    out = torch.empty((n_heads, half, 2, *w.shape[1:]), dtype=dtype)
    out.copy_(w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2))
    return out.reshape(w.shape)


def _stack(ckpt: Checkpoint, names: list[str], dtype: torch.dtype) -> torch.Tensor:
    first = ckpt[names[0]]
    out = torch.empty((len(names), *first.shape), dtype=dtype)
    for i, n in enumerate(names):
        out[i].copy_(ckpt[n])
    return out


def gguf_tensors(ckpt: Checkpoint, dtype: str) -> list[GGUFTensor]:
    """Every tensor of the GGUF file of ``ckpt`` in ``dtype``, in llama.cpp's names and order."""
    spec = ckpt.spec
    permute = GGUF_ARCH[spec.arch] == "llama"
    out: list[GGUFTensor] = []

    def add(gguf_name: str, hf: str, *, heads: int = 0, force_f32: bool = False) -> None:
        shape = tuple(ckpt.info(hf).shape)
        kind = "float32" if force_f32 or len(shape) == 1 or gguf_name.endswith("_norm.weight") else dtype
        to = _TORCH[kind]
        if heads and permute:
            make = lambda: rope_permute(ckpt[hf], heads, to)
        else:
            make = lambda: ckpt[hf].to(to).contiguous()
        out.append(GGUFTensor(gguf_name, shape, kind, make))

    def add_stack(gguf_name: str, hf_names: list[str]) -> None:
        shape = (len(hf_names), *ckpt.info(hf_names[0]).shape)
        out.append(GGUFTensor(gguf_name, shape, dtype, lambda: _stack(ckpt, hf_names, _TORCH[dtype])))

    add("token_embd.weight", "model.embed_tokens.weight")
    for layer in range(spec.n_layers):
        p, b = f"model.layers.{layer}", f"blk.{layer}"
        add(f"{b}.attn_norm.weight", f"{p}.input_layernorm.weight")
        for proj, short, heads in (("q_proj", "q", spec.n_heads), ("k_proj", "k", spec.n_kv_heads), ("v_proj", "v", 0)):
            add(f"{b}.attn_{short}.weight", f"{p}.self_attn.{proj}.weight", heads=heads)
            if spec.qkv_bias:
                add(f"{b}.attn_{short}.bias", f"{p}.self_attn.{proj}.bias", heads=heads)
        add(f"{b}.attn_output.weight", f"{p}.self_attn.o_proj.weight")
        if spec.o_bias:
            add(f"{b}.attn_output.bias", f"{p}.self_attn.o_proj.bias")
        add(f"{b}.ffn_norm.weight", f"{p}.post_attention_layernorm.weight")
        if not spec.is_moe_layer(layer):
            for proj in ("gate", "up", "down"):
                add(f"{b}.ffn_{proj}.weight", f"{p}.mlp.{proj}_proj.weight")
            continue
        m = spec.moe_prefix(layer)
        add(f"{b}.ffn_gate_inp.weight", f"{m}.gate.weight", force_f32=True)
        for short, hf_name in zip(("gate", "up", "down"), spec.expert_names(), strict=True):
            add_stack(f"{b}.ffn_{short}_exps.weight",
                      [f"{m}.experts.{e}.{hf_name}.weight" for e in range(spec.n_experts)])
        if spec.shared_expert_intermediate_size:
            for proj in ("gate", "up", "down"):
                add(f"{b}.ffn_{proj}_shexp.weight", f"{m}.shared_expert.{proj}_proj.weight")
            gate = f"{m}.shared_expert_gate.weight"  # [1, H] in HF; llama.cpp reads a vector [H]
            out.append(GGUFTensor(f"{b}.ffn_gate_inp_shexp.weight", (spec.hidden_size,), "float32",
                                  lambda gate=gate: ckpt[gate].reshape(-1).to(torch.float32)))
    add("output_norm.weight", "model.norm.weight")
    if not spec.tie_word_embeddings:
        add("output.weight", "lm_head.weight")
    elif GGUF_ARCH[spec.arch] != "llama":  # qwen2moe requires output.weight; llama falls back to token_embd
        add("output.weight", "model.embed_tokens.weight")
    if spec.rope.rope_type == "llama3":  # llama.cpp divides the base frequencies by these factors
        plain = dataclasses.replace(spec, rope=RopeSpec(theta=spec.rope.theta))
        factors = lambda: (inv_freq(plain, None) / inv_freq(spec, None)).to(torch.float32)
        out.append(GGUFTensor("rope_freqs.weight", (spec.head_dim // 2,), "float32", factors))
    return out


# ---- metadata ------------------------------------------------------------------------------------


def write_metadata(writer: gguf.GGUFWriter, spec: ModelSpec, dtype: str) -> None:
    """The ``general.*`` and ``<arch>.*`` keys llama.cpp's loader reads for ``spec``."""
    writer.add_name(spec.name or spec.arch)
    writer.add_file_type(_FILE_TYPE[dtype])
    writer.add_vocab_size(spec.vocab_size)
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.n_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope.theta)
    if spec.rope.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(spec.rope.params["factor"]))
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    if spec.is_moe:
        writer.add_expert_count(spec.n_experts)
        writer.add_expert_used_count(spec.top_k)
    if spec.arch == "qwen2_moe":
        writer.add_expert_feed_forward_length(spec.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(spec.shared_expert_intermediate_size)
    writer.add_uint32(VERSION_KEY, EXPORT_VERSION)


# ---- the export ----------------------------------------------------------------------------------


def _open(model: str | os.PathLike[str] | Checkpoint) -> Checkpoint:
    if isinstance(model, Checkpoint):
        return model
    p = Path(model).expanduser()
    if p.exists() and (not p.is_dir() or not (p / "config.json").is_file()):
        raise CheckpointError(f"{p} is not a model checkpoint: expected a folder holding config.json and "
                              f"model.safetensors (or an index and its shards)")
    return open_checkpoint(p)  # ModelNotFoundError if p does not exist


def export_gguf(model: str | os.PathLike[str] | Checkpoint, out_path: str | os.PathLike[str],
                dtype: str = "bfloat16", *, byte_tokenizer: bool = False, progress: bool = True) -> Path:
    """Write the checkpoint ``model`` (a folder or an open :class:`Checkpoint`) as GGUF ``out_path``.

    ``dtype``: ``"bfloat16"``, ``"float16"`` or ``"float32"`` (aliases such as ``bf16`` accepted).
    ``byte_tokenizer``: write offloadkit's byte-level tokenizer instead of the checkpoint's (see
    :mod:`offloadkit.bench.gguf_vocab`). Returns ``out_path``.
    """
    dtype = normalize_dtype(dtype)  # DTypeError names the supported ones
    ckpt = _open(model)
    spec = ckpt.spec
    arch = check_exportable(spec)
    config = _config(ckpt.path)
    vocab = checkpoint_vocab(ckpt.path, spec.vocab_size, config, byte_tokenizer=byte_tokenizer)
    tensors = gguf_tensors(ckpt, dtype)

    out = Path(out_path).expanduser()
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        write_metadata(writer, spec, dtype)
        vocab.write(writer)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(_NP_STORAGE[t.dtype]), t.nbytes, raw_dtype=_GGML[t.dtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(t.nbytes for t in tensors)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"GGUF {out.name}", disable=not progress) as bar:
            for t in tensors:
                data = t.make()
                if tuple(data.shape) != t.shape or data.dtype != _TORCH[t.dtype]:
                    raise CheckpointError(f"internal: {t.name} came out {tuple(data.shape)} {data.dtype}, "
                                          f"expected {t.shape} {t.dtype}")
                arr = (data.view(torch.int16) if t.dtype == "bfloat16" else data).numpy()
                writer.write_tensor_data(arr)
                bar.update(t.nbytes)
                del data, arr
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def export_version(path: Path) -> int | None:
    """The :data:`EXPORT_VERSION` a GGUF file was written with (``None``: not by offloadkit, or unreadable)."""
    try:
        field = gguf.GGUFReader(path).fields.get(VERSION_KEY)
    except (OSError, ValueError):
        return None
    return int(field.parts[field.data[0]][0]) if field is not None else None


def _is_fresh(out: Path, folder: Path) -> bool:
    """``out`` exists, was written by this exporter version, and is newer than every file of ``folder``."""
    if not out.is_file() or export_version(out) != EXPORT_VERSION:
        return False
    newest = max((f.stat().st_mtime for f in folder.iterdir() if f.is_file()), default=0.0)
    return out.stat().st_mtime >= newest


def gguf_for(folder: str | os.PathLike[str], dtype: str = "bfloat16", *, progress: bool = True) -> Path:
    """The GGUF export of the checkpoint ``folder`` in ``dtype``, made once and cached.

    A benchmark model of the cache (``<cache>/models/bench-moe-bfloat16``) gets its export beside it
    (``<cache>/models/bench-moe-bfloat16.gguf``); any other folder gets
    ``<cache>/gguf/<name>-<path hash>-<dtype>.gguf``. An export is made again when older than a file of
    the checkpoint or written by another version of this exporter.
    """
    from offloadkit.bench.models import cache_dir

    src = Path(folder).expanduser().resolve()
    dtype = normalize_dtype(dtype)
    if src.parent == (cache_dir() / "models").resolve() and src.name.endswith(f"-{dtype}"):
        out = src.with_name(f"{src.name}.gguf")
    else:
        tag = hashlib.sha1(str(src).encode()).hexdigest()[:8]
        out = cache_dir() / "gguf" / f"{src.name}-{tag}-{dtype}.gguf"
    if src.is_dir() and _is_fresh(out, src):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"exporting {src.name} ({dtype}) to GGUF for llama.cpp: {out} ...", flush=True)
    return export_gguf(src, out, dtype, progress=progress)


def gguf_path(model_name: str, dtype: str = "bfloat16", *, progress: bool = True) -> Path:
    """The GGUF export of benchmark model ``model_name`` in ``dtype`` (made first if needed), beside it in the cache."""
    from offloadkit.bench.models import bench_model

    dtype = normalize_dtype(dtype)
    return gguf_for(bench_model(model_name, dtype, progress=progress), dtype, progress=progress)


__all__ = ["EXPORT_VERSION", "GGUF_ARCH", "VERSION_KEY", "GGUFTensor", "check_exportable", "export_gguf",
           "export_version", "gguf_for", "gguf_path", "gguf_tensors", "rope_permute", "write_metadata"]
