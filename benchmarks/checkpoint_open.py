"""What opening a checkpoint costs: ``safe_open`` (offloadkit now) against the hand-written map before it.

    python benchmarks/checkpoint_open.py [--model DIR] [--rounds 5]

Issue 8 replaced offloadkit's own safetensors reader (an ``mmap`` of each file, tensors as
``numpy.frombuffer`` views) with ``safetensors.safe_open(..., framework="pt").get_tensor``. This script
measures both on the same checkpoint, each run in a fresh process, the two readers alternated in every
round, with the file's pages in the page cache ("hot") and evicted from it first with
``posix_fadvise(DONTNEED)`` ("cold"). Per run it records:

- ``open`` + ``views``: ``open_checkpoint`` (header checks, spec checks) and then a view of every
  tensor, as wrapping the weights in ``ReferenceModel`` does;
- ``touch``: reading one expert tensor whole (``.float().sum()``), the first real use;
- the growth of resident memory after the views, split as the kernel counts it: private (``RssAnon``,
  what a copy of the weights would cost) and file-backed (``RssFile``, page-cache pages mapped in).

Without ``--model`` it writes a random Mixtral-shaped bf16 checkpoint of ~456 MB (4 layers, hidden 1024,
8 experts of 2048) to a temporary folder and deletes it afterwards. Figures are **measured** on this
machine, which is shared and noisy: compare the two readers within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READERS = ("safe_open", "mmap (before)")


# ---- the child: one measurement in a fresh process -----------------------------------------------


def _rss() -> tuple[int, int]:
    """(private, file-backed) resident bytes of this process, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["RssAnon"].split()[0]) * 1024, int(fields["RssFile"].split()[0]) * 1024


def _use_the_old_reader() -> None:
    """Put back the reader offloadkit had before issue 8: one private ``mmap`` per file, each tensor a
    ``numpy.frombuffer`` view on it (header checks unchanged: the same ``read_header``)."""
    import numpy as np
    import torch

    from offloadkit.model import checkpoint, safetensors_io

    raw = {torch.bfloat16: np.int16, torch.float16: np.float16, torch.float32: np.float32}

    class MmapFile(safetensors_io.SafetensorsFile):
        def __init__(self, path: str | Path) -> None:
            self.path = Path(path)
            self.infos, self.metadata = safetensors_io.read_header(self.path)
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._bytes = np.frombuffer(self._map, dtype=np.uint8)
            self._handle = self._map

        def tensor(self, name: str) -> torch.Tensor:
            info = self.infos[name]
            dtype = safetensors_io.COMPUTE_DTYPES[info.st_dtype]
            view = self._bytes[info.start:info.stop].view(raw[dtype])
            return torch.from_numpy(view).view(dtype).reshape(info.shape)

        def close(self) -> None:
            self._bytes = self._handle = None

    checkpoint.SafetensorsFile = MmapFile


def child(reader: str, folder: str, probe: str) -> None:
    import numpy  # noqa: F401 (imported before the first reading, so that their own pages are not counted)
    import torch

    from offloadkit.model.checkpoint import open_checkpoint

    if reader == "mmap (before)":
        _use_the_old_reader()
    anon0, file0 = _rss()
    t0 = time.perf_counter()
    ckpt = open_checkpoint(folder)
    t1 = time.perf_counter()
    views = {name: ckpt[name] for name in ckpt}
    t2 = time.perf_counter()
    anon1, file1 = _rss()
    total = views[probe].float().sum().item()
    t3 = time.perf_counter()
    assert torch.isfinite(torch.tensor(total))
    print(json.dumps({"open_s": t1 - t0, "views_s": t2 - t1, "touch_s": t3 - t2, "tensors": len(views),
                      "anon_mb": (anon1 - anon0) / 1e6, "file_mb": (file1 - file0) / 1e6}))


# ---- the parent: rounds, alternation, the table ----------------------------------------------------


def evict(files: list[Path]) -> None:
    """Drop the files' clean pages from the page cache (no root needed; other files are untouched)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def run_child(reader: str, folder: Path, probe: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", reader, str(folder), probe],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_model(where: Path) -> Path:
    from offloadkit.model.writer import make_config, write_checkpoint

    config = make_config("mixtral", layers=4, hidden=1024, heads=16, kv_heads=4, experts=8,
                         intermediate=2048, vocab=8000, dtype="bfloat16")
    return write_checkpoint(where / "mixtral-shaped", config, seed=1)


def mean_sd(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    m = statistics.fmean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a checkpoint folder (default: write a ~456 MB one)")
    parser.add_argument("--rounds", type=int, default=5, help="runs per reader and cache state (default 5)")
    parser.add_argument("--child", nargs=3, metavar=("READER", "FOLDER", "PROBE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if not Path("/proc/self/status").exists():
        sys.exit("this benchmark reads /proc/self/status: Linux only")

    import safetensors

    from offloadkit.model.checkpoint import open_checkpoint

    with tempfile.TemporaryDirectory(prefix="ckpt-open-") as tmp:
        folder = args.model or write_model(Path(tmp))
        with open_checkpoint(folder) as ckpt:
            files, nbytes, n = ckpt.files, ckpt.nbytes, len(ckpt)
            experts = [name for name in ckpt if ".experts." in name or ".mlp." in name]
            probe = experts[-1] if experts else list(ckpt)[-1]
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for cache in ("cold", "hot"):
                for reader in READERS:
                    (evict if cache == "cold" else warm)(files)
                    results.setdefault((cache, reader), []).append(run_child(reader, folder, probe))

    print(f"opening {folder}: {n} tensors, {nbytes / 1e6:.0f} MB in {len(files)} file(s), then one view of "
          f"every tensor; touch = {probe}.float().sum()")
    print(f"measured on {platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"logical CPUs), safetensors {safetensors.__version__}; mean ± sd of {args.rounds} runs each, "
          f"readers alternated\n")
    print(f"{'cache':<5} {'reader':<14} {'open ms':>13} {'views ms':>13} {'touch ms':>13} "
          f"{'RssAnon +MB':>13} {'RssFile +MB':>13}")
    for (cache, reader), runs in results.items():
        col = {k: [r[k] for r in runs] for k in runs[0]}
        print(f"{cache:<5} {reader:<14} {mean_sd(col['open_s'], 1e3):>13} {mean_sd(col['views_s'], 1e3):>13} "
              f"{mean_sd(col['touch_s'], 1e3):>13} {mean_sd(col['anon_mb']):>13} {mean_sd(col['file_mb']):>13}")


if __name__ == "__main__":
    main()
