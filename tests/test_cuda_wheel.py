"""The CUDA sources ship inside the wheel: build one from a copy of the repository, check that every
``kernels/*.cu`` file is in it, and that the installed package finds them through importlib.resources.
(A few seconds: setuptools without build isolation, on a temporary copy so the tree is not touched.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".*", "build", "dist", "*.egg-info", "__pycache__", "notebooks", "tests", "benchmarks", "data"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-q", "-w", str(tmp / "dist")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (found,) = (tmp / "dist").glob("offloadkit-*.whl")
    return found


def test_top_level_kernels_folder_is_the_packaged_one():
    assert (REPO / "kernels").resolve() == (REPO / "offloadkit" / "kernels" / "cuda" / "src").resolve()


def test_wheel_holds_every_kernel_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (REPO / "kernels").iterdir() if p.suffix in (".cu", ".cuh", ".hpp"))
    assert {"expert_swiglu.cu", "common.cuh", "attention_decode.cu"} <= set(sources)
    missing = [s for s in sources if f"offloadkit/kernels/cuda/src/{s}" not in names]
    assert not missing, f"not in {wheel.name}: {missing}"


def test_installed_wheel_finds_its_kernels(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)  # a pure-Python wheel, unpacked, is an install
    code = ("import offloadkit, offloadkit.kernels.cuda.nvrtc as n; print(offloadkit.__file__); "
            "print(','.join(n.kernel_names())); print(len(n.read_source('expert_swiglu')))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    where, kernels, size = r.stdout.split()
    assert where.startswith(str(tmp_path)), f"imported {where}, not the wheel's copy"
    assert "expert_swiglu" in kernels.split(",") and int(size) > 1000
