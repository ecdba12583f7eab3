"""Reading checkpoints: bit-exact round trips, zero-copy views, and a clear error for every bad input."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from offloadkit.errors import CheckpointError, ConfigError, DTypeError, ModelNotFoundError
from offloadkit.kernels.cpu.primitives import storage_view
from offloadkit.model.checkpoint import Checkpoint, open_checkpoint
from offloadkit.model.safetensors_io import SafetensorsFile, read_header
from offloadkit.model.spec import ModelSpec
from offloadkit.model.writer import make_config, random_tensor, random_weights, write_checkpoint

ARCHS = ("mixtral", "llama", "qwen2_moe", "phimoe")
DTYPES = ("bfloat16", "float16", "float32")
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def file_mapping(path: Path) -> list[tuple[int, int]]:
    """Address ranges at which this process maps ``path`` (from /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.fixture
def mixtral_dir(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "m", make_config("mixtral"), seed=3)


# ---- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bit_exact(tmp_path: Path, arch: str, dtype: str, sharded: bool) -> None:
    config = make_config(arch, dtype=dtype)
    out = write_checkpoint(tmp_path / arch, config, seed=7, max_shard_bytes=20_000 if sharded else None)
    spec = ModelSpec.from_config(config)
    expected = random_weights(spec, seed=7)
    with open_checkpoint(out) as ckpt:
        assert list(ckpt) == list(spec.tensors())
        assert ckpt.dtype == dtype and ckpt.spec.arch == arch
        assert ckpt.nbytes == sum(t.numel() * t.element_size() for t in expected.values())
        assert (len(ckpt.files) > 2) == sharded
        for name, want in expected.items():
            assert ckpt.dtype_of(name) == dtype
            assert same_bits(ckpt[name], want), name


def test_views_live_in_the_file_mapping(mixtral_dir: Path) -> None:
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    ckpt = open_checkpoint(mixtral_dir)
    ranges = file_mapping(mixtral_dir / "model.safetensors")
    assert ranges, "model.safetensors is not memory-mapped"
    for name in ckpt:
        t = ckpt[name]
        assert any(lo <= t.data_ptr() and t.data_ptr() + t.nbytes <= hi for lo, hi in ranges), name
        assert t.untyped_storage().data_ptr() == t.data_ptr()  # no copy, no hidden offset buffer
        arr, _ = storage_view(t)  # and the CPU kernels take it as it is
        assert t.is_contiguous() and arr.ctypes.data == t.data_ptr(), name


def test_writing_a_view_does_not_change_the_file(mixtral_dir: Path) -> None:
    file = mixtral_dir / "model.safetensors"
    before = file.read_bytes()
    with open_checkpoint(mixtral_dir) as ckpt:
        ckpt["model.norm.weight"].fill_(42.0)  # copy-on-write: the page becomes private to this map
        assert ckpt["model.norm.weight"][0].item() == 42.0
    assert file.read_bytes() == before
    assert open_checkpoint(mixtral_dir)["model.norm.weight"][0].item() != 42.0


def test_views_outlive_close(mixtral_dir: Path) -> None:
    ckpt = open_checkpoint(mixtral_dir)
    t = ckpt["model.embed_tokens.weight"]
    ckpt.close()
    del ckpt
    want = random_tensor("model.embed_tokens.weight", tuple(t.shape), seed=3).to(torch.bfloat16)
    assert same_bits(t, want)


def test_closed_checkpoint_refuses_access(mixtral_dir: Path) -> None:
    ckpt = open_checkpoint(mixtral_dir)
    ckpt.close()
    with pytest.raises(CheckpointError, match="has been closed"):
        ckpt["model.norm.weight"]


def test_is_a_mapping_with_info(mixtral_dir: Path) -> None:
    ckpt = open_checkpoint(mixtral_dir)
    assert isinstance(ckpt, Checkpoint) and len(ckpt) == len(ckpt.spec.tensors())
    assert "model.norm.weight" in ckpt and "nope" not in ckpt
    assert ckpt.get("nope") is None
    info = ckpt.info("model.norm.weight")
    assert info.st_dtype == "BF16" and info.nbytes == 2 * 64 and info.file.name == "model.safetensors"
    assert "mixtral" in repr(ckpt) and "bfloat16" in repr(ckpt)


@pytest.mark.parametrize("which", ["file", "index"])
def test_open_by_file_path(tmp_path: Path, which: str) -> None:
    sharded = which == "index"
    out = write_checkpoint(tmp_path / "m", make_config("llama"), max_shard_bytes=30_000 if sharded else None)
    path = out / ("model.safetensors.index.json" if sharded else "model.safetensors")
    ckpt = open_checkpoint(path)
    assert ckpt.path == out and len(ckpt) == len(ckpt.spec.tensors())


def test_safetensors_library_reads_ours_and_we_read_its(tmp_path: Path, mixtral_dir: Path) -> None:
    ckpt = open_checkpoint(mixtral_dir)
    with safe_open(mixtral_dir / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name in ckpt:
            assert same_bits(f.get_tensor(name), ckpt[name])
    theirs = {n: ckpt[n].clone() for n in ckpt}
    theirs["model.norm.weight"] = theirs["model.norm.weight"].float()  # mixed dtypes
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((mixtral_dir / "config.json").read_text())
    save_file(theirs, other / "model.safetensors", metadata={"format": "pt"})
    mine = open_checkpoint(other)
    assert mine.dtype_of("model.norm.weight") == "float32" and mine.dtype == "bfloat16"
    for name, t in theirs.items():
        assert same_bits(mine[name], t), name


def test_misaligned_tensor_is_read_correctly(tmp_path: Path) -> None:
    """Another writer may put an f32 tensor at an offset that is not a multiple of 4: we copy that one."""
    data = torch.tensor([1.5], dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    data += torch.tensor([2.5, -3.0], dtype=torch.float32).view(torch.uint8).numpy().tobytes()
    write_raw(tmp_path, {"h": entry("F16", [1], [0, 2]), "f": entry("F32", [2], [2, 10])}, data)
    st = SafetensorsFile(tmp_path / "model.safetensors")
    h, f = st.tensor("h"), st.tensor("f")
    assert h.tolist() == [1.5] and f.tolist() == [2.5, -3.0]
    assert h.data_ptr() % 2 == 0 and f.data_ptr() % 4 == 0  # the kernels never see a misaligned weight
    st.close()


# ---- memory: mapping, not loading ----------------------------------------------------------------

RSS_PROBE = textwrap.dedent("""
    import sys
    import torch
    from offloadkit.model.checkpoint import open_checkpoint

    def rss() -> tuple[int, int]:
        \"\"\"(private, file-backed) resident bytes of this process.\"\"\"
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return tuple(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))

    before = rss()
    ckpt = open_checkpoint(sys.argv[1])
    shapes = {name: tuple(t.shape) for name, t in ckpt.items()}  # a view of every tensor
    from offloadkit.model.reference import ReferenceModel
    model = ReferenceModel(ckpt.spec, ckpt)  # checks every tensor, converts none
    after = rss()
    probe = ckpt[sys.argv[2]].float().sum().item()
    logits = model.forward(torch.tensor([[1, 5, 9, 200]]))  # and the mapped bf16 model runs
    ok = bool(torch.isfinite(logits).all()) and tuple(logits.shape) == (1, 4, ckpt.spec.vocab_size)
    print(*before, *after, len(shapes), ckpt.nbytes, repr(probe), ok)
""")


def test_open_maps_instead_of_loading(tmp_path: Path) -> None:
    """A ~240 MB bf16 checkpoint opens and is wrapped in the reference model (every tensor viewed)
    without being loaded: private memory grows by well under 10% of its size (a copy would be 100%),
    and of the file no more is paged in than one page-cache folio per tensor; then the model runs.

    Why a folio per tensor: ``safe_open().get_tensor`` reads the first bytes of each tensor as it
    builds the view, and the kernel maps in the whole folio those bytes sit in: 64 KiB of fault-around
    on 4 KiB pages, up to 2 MiB where the page cache holds the file in large folios (measured by
    benchmarks/checkpoint_open.py). The model has few, large tensors, so that reading the whole file
    would exceed that allowance twofold.
    """
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status (Linux)")
    config = make_config("mixtral", layers=1, hidden=1024, heads=16, kv_heads=4, experts=8,
                         intermediate=4096, vocab=8000)
    out = write_checkpoint(tmp_path / "big", config, seed=1)
    try:
        file_bytes = (out / "model.safetensors").stat().st_size
        assert file_bytes > 200e6
        probe = "model.layers.0.block_sparse_moe.experts.7.w2.weight"
        run = subprocess.run([sys.executable, "-c", RSS_PROBE, str(out), probe], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        anon0, file0, anon1, file1, n_tensors, nbytes, value, ran = run.stdout.split()
        assert ran == "True", "the memory-mapped bf16 model did not produce finite logits"
        anon, mapped = int(anon1) - int(anon0), int(file1) - int(file0)
        assert int(n_tensors) == len(ModelSpec.from_config(config).tensors())
        assert int(nbytes) > 0.99 * file_bytes
        assert anon < 0.10 * file_bytes, (f"private memory grew {anon / 1e6:.1f} MB opening a "
                                          f"{file_bytes / 1e6:.0f} MB file: weights were copied")
        allowance = int(n_tensors) * 2**21 + 10e6  # a 2 MiB folio per tensor, 10 MB of library code
        assert 2 * allowance < file_bytes  # so that the bound below tells mapping from reading
        assert mapped < allowance, (f"file-backed RSS grew {mapped / 1e6:.1f} MB opening a {file_bytes / 1e6:.0f} "
                                    f"MB file of {n_tensors} tensors: more than a folio per tensor was read")
        shape = (1024, 4096)
        assert float(value) == random_tensor(probe, shape, seed=1).to(torch.bfloat16).float().sum().item()
    finally:
        for f in out.iterdir():
            f.unlink()


# ---- bad inputs ----------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"nowhere does not exist.*config.json"):
        open_checkpoint(tmp_path / "nowhere")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json in"):
        open_checkpoint(tmp_path)


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(make_config("llama")))
    with pytest.raises(CheckpointError, match=r"no weights in .*expected model.safetensors, or "
                                              r"model.safetensors.index.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"found 'pytorch_model.bin', which offloadkit does not read"):
        open_checkpoint(tmp_path)


def test_truncated_file(mixtral_dir: Path) -> None:
    file = mixtral_dir / "model.safetensors"
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=rf"truncated.*ends at byte {size} .*file has {size - 100} bytes"):
        open_checkpoint(mixtral_dir)


def write_raw(folder: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> None:
    """A model.safetensors with a hand-made header (and the config of a tiny llama beside it)."""
    (folder / "config.json").write_text(json.dumps(make_config("llama")))
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def entry(dtype: str = "F32", shape: list | None = None, offsets: list | None = None) -> dict:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": offsets or [0, 8]}


CORRUPT = {
    "too short": (b"", None, "too short to be a safetensors file"),
    "length past the end": (b"{}", 10**6, r"length prefix says 1000000 bytes, but the file has"),
    "not json": (b"{not json", None, "it is not valid JSON"),
    "not utf-8": (b"\xff\xfe", None, "it is not valid JSON"),
    "not an object": (b"[1, 2]", None, "JSON is a list, not an object"),
    "entry without dtype": ({"a": {"shape": [2]}}, None, "tensor 'a' needs 'dtype', 'shape' and 'data_offsets'"),
    "unknown dtype": ({"a": entry("X9")}, None, "tensor 'a' has an unknown dtype 'X9'"),
    "negative dim": ({"a": entry(shape=[-2])}, None, r"tensor 'a' has a bad shape \[-2\]"),
    "float dim": ({"a": entry(shape=[2.0])}, None, r"tensor 'a' has a bad shape \[2.0\]"),
    "begin after end": ({"a": entry(offsets=[8, 0])}, None, r"tensor 'a' has bad data_offsets \[8, 0\]"),
    "size mismatch": ({"a": entry(shape=[3])}, None, r"tensor 'a' spans 8 bytes .* needs 12"),
    "out of range": ({"a": entry(offsets=[8, 16])}, None, r"ends at byte \d+ \(tensor 'a'\), but the file has"),
    "overlap": ({"a": entry(), "b": entry(offsets=[4, 12])}, None, "tensors 'a' and 'b' overlap"),
    "duplicate": (b'{"a": {}, "a": {}}', None, "the name 'a' appears twice"),
    "bad metadata": ({"__metadata__": {"format": 1}}, None, "__metadata__ must map strings to strings"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_header(tmp_path: Path, case: str) -> None:
    header, length, message = CORRUPT[case]
    if case == "too short":
        (tmp_path / "config.json").write_text(json.dumps(make_config("llama")))
        (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    else:
        write_raw(tmp_path, header, data=bytes(12), length=length)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("offsets", [[0, 8], [4, 12]], ids=["trailing bytes", "a gap"])
def test_what_only_the_safetensors_library_refuses(tmp_path: Path, offsets: list) -> None:
    """Files the header checks let through but the format forbids (data bytes no tensor covers) are
    refused by safe_open; the error still names the file."""
    write_raw(tmp_path, {"a": entry(offsets=offsets)}, data=bytes(12))
    with pytest.raises(CheckpointError, match=r"model.safetensors: the safetensors library refuses the file"):
        open_checkpoint(tmp_path, validate=False)


def shard_of(folder: Path, name: str) -> str:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    out = write_checkpoint(tmp_path / "m", make_config("mixtral"), max_shard_bytes=20_000)
    shard = shard_of(out, "model.layers.1.self_attn.q_proj.weight")
    (out / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"names 1 shard\(s\) missing from .*'{shard}'"):
        open_checkpoint(out)


def test_index_disagreeing_with_shards(tmp_path: Path) -> None:
    out = write_checkpoint(tmp_path / "m", make_config("llama"), max_shard_bytes=20_000)
    first, last = shard_of(out, "model.embed_tokens.weight"), shard_of(out, "model.norm.weight")
    assert first != last
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = first
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"says tensor 'model.norm.weight' is in {first}, but that "
                                              rf"shard does not hold it \({last} does\)"):
        open_checkpoint(out)
    (out / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors.index.json"):
        open_checkpoint(out)


def rewrite(folder: Path, change: dict[str, torch.Tensor | None]) -> None:
    """Rewrite model.safetensors with some tensors replaced (or removed, for None)."""
    weights = dict(safe_open_all(folder / "model.safetensors"))
    for name, t in change.items():
        if t is None:
            del weights[name]
        else:
            weights[name] = t
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def safe_open_all(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(file, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def test_missing_tensor(mixtral_dir: Path) -> None:
    rewrite(mixtral_dir, {"model.layers.1.block_sparse_moe.experts.3.w2.weight": None})
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) that the mixtral config calls for: "
                                              r"'model.layers.1.block_sparse_moe.experts.3.w2.weight'"):
        open_checkpoint(mixtral_dir)
    ckpt = open_checkpoint(mixtral_dir, validate=False)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" not in ckpt
    assert len(ckpt) == len(ckpt.spec.tensors()) - 1


def test_wrong_shape(mixtral_dir: Path) -> None:
    rewrite(mixtral_dir, {"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' in model.safetensors "
                                              r"has shape \(64, 64\), but the config expects \(32, 64\)"):
        open_checkpoint(mixtral_dir)


@pytest.mark.parametrize(("dtype", "code"), [(torch.int8, "I8"), (torch.float64, "F64"),
                                             (torch.float8_e4m3fn, "F8_E4M3")])
def test_unsupported_dtype(mixtral_dir: Path, dtype: torch.dtype, code: str) -> None:
    name = "model.layers.1.block_sparse_moe.experts.0.w1.weight"
    rewrite(mixtral_dir, {name: torch.zeros(128, 64).to(dtype)})
    with pytest.raises(DTypeError, match=rf"'{name}' in model.safetensors is stored as {code} .*offloadkit "
                                         r"computes with bfloat16, float16 or float32"):
        open_checkpoint(mixtral_dir)
    ckpt = open_checkpoint(mixtral_dir, validate=False)  # opens; refuses the tensor itself on access
    assert ckpt.dtype_of(name) == {"I8": "int8", "F64": "float64", "F8_E4M3": "float8_e4m3fn"}[code]
    with pytest.raises(DTypeError, match=f"stored as {code}"):
        ckpt[name]


def test_rotary_buffers_are_ignored_silently_other_extras_with_a_warning(mixtral_dir: Path) -> None:
    rewrite(mixtral_dir, {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
                          "model.rotary_emb.inv_freq": torch.ones(8)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt = open_checkpoint(mixtral_dir)
    assert "model.rotary_emb.inv_freq" not in ckpt and "model.rotary_emb.inv_freq" in ckpt.extra_names
    rewrite(mixtral_dir, {"model.layers.0.mystery.weight": torch.ones(8)})
    with pytest.warns(UserWarning, match=r"ignoring 1 tensor\(s\) .*'model.layers.0.mystery.weight'"):
        open_checkpoint(mixtral_dir)


def test_header_reader_reports_offsets(mixtral_dir: Path) -> None:
    infos, metadata = read_header(mixtral_dir / "model.safetensors")
    assert metadata == {"format": "pt"}
    ordered = sorted(infos.values(), key=lambda i: i.start)
    assert all(a.stop == b.start for a, b in zip(ordered, ordered[1:], strict=False))  # contiguous, no gaps
    assert ordered[-1].stop == (mixtral_dir / "model.safetensors").stat().st_size
    assert ordered[0].start % 8 == 0
