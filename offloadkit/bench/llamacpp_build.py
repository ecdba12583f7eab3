"""Build llama.cpp from source, natively optimised, as its users do: ``make llamacpp``.

offloadkit is held against llama.cpp on this machine, so llama.cpp must be built the way its users
build it: from source with CMake, ``-DGGML_NATIVE=ON`` (every instruction set this CPU has). The
source is the ``llama-cpp-python`` sdist, pinned (:data:`LLAMA_CPP_PYTHON`), whose ``vendor/llama.cpp``
is llama.cpp's own tree at the commit its CHANGELOG names; pip downloads it from PyPI like any other
dependency. (Debian's ``llama.cpp`` package was the other candidate: its version and build flags are
the distribution's, not pinned by us, and not on every image.) Steps, each skipped when already done:

1. ``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d build/llamacpp``;
2. ``vendor/llama.cpp`` extracted to ``build/llamacpp/src`` (with a stamp naming version and commit);
3. ``cmake -S src -B out -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON ...`` and
   ``cmake --build out --target llama-bench llama-simple``, logged to ``build/llamacpp/build.log``.

The build is cached: it is skipped when ``out/bin`` holds the binaries and the stamp beside them names
the same version, flags and CPU (a native build for one CPU may not run on another: these machines
change CPU from one day to the next). ``$OFFLOADKIT_LLAMACPP`` names a folder of binaries built
elsewhere and skips all of this. Missing cmake or a C++ compiler, a failed download or a failed build
raise :class:`BenchError` with the last lines of the log.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from tqdm.auto import tqdm

from offloadkit.errors import BenchError, OffloadkitError

LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ("llama-bench", "llama-simple")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF")
SOURCE_STAMP = ".offloadkit-source.json"
BUILD_STAMP = ".offloadkit-build.json"
_SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"


def build_root() -> Path:
    """``build/llamacpp`` of the repository (or of the cache, for a package installed without it)."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / "build" / "llamacpp"
    from offloadkit.bench.models import cache_dir

    return cache_dir() / "llamacpp"


def default_bin_dir() -> Path:
    return build_root() / "out" / "bin"


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def cpu_signature() -> str:
    """The CPU model and a hash of its feature flags: what a native build depends on."""
    model, flags = "unknown CPU", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return f"{model} [{hashlib.sha256(flags.encode()).hexdigest()[:12]}]"


# ---- the source ----------------------------------------------------------------------------------


def _download(root: Path) -> Path:
    tarball = root / f"{_SDIST}.tar.gz"
    if tarball.is_file():
        return tarball
    print(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} source distribution (llama.cpp's source) ...",
          flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not tarball.is_file():
        lines = (proc.stderr + proc.stdout).strip().splitlines()[-15:]
        raise BenchError(f"could not download llama.cpp's source ({' '.join(cmd)}):\n" + "\n".join(lines))
    return tarball


def _changelog_commit(tar: tarfile.TarFile) -> str:
    """The llama.cpp commit the sdist vendors, from its CHANGELOG (``update llama.cpp to ...@0c1e57098``)."""
    member = tar.extractfile(f"{_SDIST}/CHANGELOG.md")
    text = member.read().decode(errors="replace") if member else ""
    section = text.split(f"## [{LLAMA_CPP_PYTHON}]", 1)[-1].split("\n## [", 1)[0]
    found = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return found.group(1) if found else "unknown"


def ensure_source(root: Path) -> tuple[Path, dict[str, str]]:
    """``root/src``: llama.cpp's tree, extracted once; returns it and its stamp."""
    src = root / "src"
    stamp = src / SOURCE_STAMP
    if stamp.is_file() and (src / "CMakeLists.txt").is_file():
        info = json.loads(stamp.read_text())
        if info.get("llama_cpp_python") == LLAMA_CPP_PYTHON:
            return src, info
    root.mkdir(parents=True, exist_ok=True)
    tarball = _download(root)
    prefix = f"{_SDIST}/vendor/llama.cpp/"
    if src.exists():
        shutil.rmtree(src)
    with tarfile.open(tarball) as tar:
        commit = _changelog_commit(tar)
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and m.name != prefix + ".git":  # a stale submodule link: no git here
                m.name = m.name[len(prefix):]
                members.append(m)
        if not members:
            raise BenchError(f"{tarball} has no vendor/llama.cpp: not the llama-cpp-python sdist expected")
        for m in tqdm(members, desc="extracting llama.cpp", unit="file"):
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse links out of src
                tar.extract(m, src, filter="data")
            else:
                tar.extract(m, src)
    info = {"llama_cpp_python": LLAMA_CPP_PYTHON, "llama_cpp_commit": commit, "sdist": tarball.name}
    stamp.write_text(json.dumps(info, indent=1) + "\n")
    return src, info


# ---- the build -----------------------------------------------------------------------------------


def _check_tools() -> None:
    missing = [tool for tool, names in (("cmake", ("cmake",)), ("a C++ compiler", ("c++", "g++", "clang++")))
               if not any(shutil.which(n) for n in names)]
    if missing:
        raise BenchError(f"cannot build llama.cpp: {' and '.join(missing)} not found; install them "
                         f"(Debian/Ubuntu: apt-get install cmake g++; or pip install cmake) and run `make llamacpp` "
                         f"again")


def _run_logged(cmd: list[str], log: Path, what: str, bar: tqdm | None = None) -> None:
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            pct = re.match(r"\[\s*(\d+)%\]", line)
            if bar is not None and pct:
                bar.update(max(0, int(pct.group(1)) - bar.n))  # targets restart their count: keep the max
        proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"{what} failed (exit status {proc.returncode}); the end of {log}:\n{_tail(log)}")


def build_info(bin_dir: Path | None = None) -> dict[str, str]:
    """The stamp of the build in ``bin_dir`` (version, commit, flags, CPU), or ``{}`` without one."""
    stamp = (bin_dir or default_bin_dir()) / BUILD_STAMP
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return {}


def build_llamacpp(*, force: bool = False, jobs: int | None = None) -> Path:
    """Build llama-bench and llama-simple (once); returns the folder holding them."""
    env = os.environ.get("OFFLOADKIT_LLAMACPP")
    if env:
        print(f"OFFLOADKIT_LLAMACPP is set: using the llama.cpp binaries in {env} (not building)")
        return Path(env)
    root = build_root()
    src, source = ensure_source(root)
    out = root / "out"
    bin_dir = out / "bin"
    # The sdist carries no git history; left alone, cmake would ask git and find the enclosing repository's
    # (offloadkit's) commit and count. The commit is the CHANGELOG's; llama.cpp's build number is not known here.
    flags = [*CMAKE_FLAGS, f"-DLLAMA_BUILD_COMMIT={source['llama_cpp_commit']}", "-DLLAMA_BUILD_NUMBER=0"]
    wanted = {"llama_cpp_python": LLAMA_CPP_PYTHON, "llama_cpp_commit": source["llama_cpp_commit"],
              "cmake_flags": " ".join(flags), "cpu": cpu_signature()}
    have = build_info(bin_dir)
    binaries = [bin_dir / t for t in TARGETS]
    fresh = all(b.is_file() and b.stat().st_mtime >= (src / SOURCE_STAMP).stat().st_mtime for b in binaries)
    if not force and fresh and all(have.get(k) == v for k, v in wanted.items()):
        print(f"llama.cpp {have['llama_cpp_commit']} (llama-cpp-python {LLAMA_CPP_PYTHON}) already built in {bin_dir}")
        return bin_dir
    _check_tools()
    log = root / "build.log"
    log.write_text(f"offloadkit: building llama.cpp {source['llama_cpp_commit']} for {wanted['cpu']}\n")
    print(f"building llama.cpp {source['llama_cpp_commit']} (llama-cpp-python {LLAMA_CPP_PYTHON}), native for "
          f"{wanted['cpu']}; log: {log}", flush=True)
    (bin_dir / BUILD_STAMP).unlink(missing_ok=True)
    _run_logged(["cmake", "-S", str(src), "-B", str(out), *flags], log, "configuring llama.cpp (cmake)")
    with tqdm(total=100, desc="building llama.cpp", unit="%") as bar:
        _run_logged(["cmake", "--build", str(out), "-j", str(jobs or os.cpu_count() or 1), "--target", *TARGETS],
                    log, "building llama.cpp", bar)
    missing = [b.name for b in binaries if not b.is_file()]
    if missing:
        raise BenchError(f"the llama.cpp build finished without {', '.join(missing)}; the end of {log}:\n{_tail(log)}")
    (bin_dir / BUILD_STAMP).write_text(json.dumps(wanted, indent=1) + "\n")
    print(f"built llama.cpp {source['llama_cpp_commit']} in {bin_dir}")
    return bin_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offloadkit.bench.llamacpp_build",
                                     description="Build llama.cpp's llama-bench and llama-simple from source (cached).")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    args = parser.parse_args(argv)
    try:
        build_llamacpp(force=args.force, jobs=args.jobs)
    except OffloadkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
