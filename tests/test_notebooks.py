"""The course notebooks: jupytext pairs in sync, stored in git without outputs, importing the package.

A notebook is two files paired by ``notebooks/jupytext.toml``: ``NN_name.py`` (py:percent, the source a
reviewer reads and ruff lints) and ``NN_name.ipynb`` (what JupyterLab opens). With jupytext installed,
saving either side in JupyterLab rewrites the other.

"Stored without outputs" is checked on what git stores (the index: the staged or committed blob),
never on the working file: running the course in JupyterLab saves outputs into the working
``.ipynb``, and that must not fail the tests. ``make lab`` installs the nbstripout filter named in
``.gitattributes``, so ``git add`` stores the notebook stripped; ``make nbtest`` runs nbval on
notebooks rebuilt from the ``.py`` sources in a temporary folder. The last test proves both in a
scratch repository.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
SOURCES = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py"))
SYNC_HINT = ".venv/bin/jupytext --sync notebooks/{name}.py && .venv/bin/nbstripout notebooks/{name}.ipynb"


# ---- the checks, on any repository (the scratch one of the last test too) --------------------------

def cells_of(path: Path) -> list[tuple[str, str]]:
    """(cell type, source) of every cell, as jupytext reads the file (a .py or an .ipynb)."""
    return [(c.cell_type, c.source) for c in jupytext.read(path).cells]


def pair_problems(source: Path) -> list[str]:
    """What differs between ``NN_name.py`` and its ``.ipynb``, cell by cell (empty: in sync)."""
    ipynb = source.with_suffix(".ipynb")
    if not ipynb.exists():
        return [f"{source.name} has no {ipynb.name}"]
    py, nb = cells_of(source), cells_of(ipynb)
    problems = [f"cell {i}: {a[0]} in {source.name}, {b[0]} in {ipynb.name}" + (" (sources differ)" if
                a[1] != b[1] else "") for i, (a, b) in enumerate(zip(py, nb, strict=False)) if a != b]
    if len(py) != len(nb):
        problems.append(f"{len(py)} cells in {source.name}, {len(nb)} in {ipynb.name}")
    return problems


def stored_text(path: Path) -> str:
    """The notebook as git stores it (the index), or the working file where git does not track it yet."""
    repo = path.parent
    r = subprocess.run(["git", "show", f":./{path.name}"], cwd=repo, capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else path.read_text()


def stored_problems(text: str) -> list[str]:
    """Why a stored notebook is not clean: outputs, execution counts, unstable ids, or anything else
    nbstripout would still strip (the stored text must be nbstripout's own output)."""
    nb = nbformat.reads(text, as_version=4)
    problems = [f"cell {i} has outputs or an execution count" for i, c in enumerate(nb.cells)
                if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    problems += [f"cell {i} has id {c.get('id')!r}, not {str(i)!r}" for i, c in enumerate(nb.cells)
                 if c.get("id") != str(i)]
    stripped = subprocess.run([sys.executable, "-m", "nbstripout", "-t"], input=text, capture_output=True,
                              text=True, check=True).stdout
    if not problems and stripped != text:
        problems.append("nbstripout would still change it (metadata)")
    return problems


# ---- the course's notebooks -----------------------------------------------------------------------

def test_there_are_notebooks_and_each_has_its_pair():
    assert NOTEBOOKS and SOURCES, "notebooks/ holds no notebooks"
    assert [p.stem for p in NOTEBOOKS] == [p.stem for p in SOURCES], "every NN_name.ipynb needs its NN_name.py"
    config = (NOTEBOOKS_DIR / "jupytext.toml").read_text()
    assert 'formats = "ipynb,py:percent"' in config


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_pair_is_in_sync(source):
    problems = pair_problems(source)
    assert not problems, "; ".join(problems) + f". Sync them: {SYNC_HINT.format(name=source.stem)}"
    assert jupytext.read(source).metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_notebook_is_clean_and_imports_the_package(path):
    problems = stored_problems(stored_text(path))
    assert not problems, (f"{path.name} as git stores it: " + "; ".join(problems) + ". Strip it "
                          f"(.venv/bin/nbstripout {path.relative_to(NOTEBOOKS_DIR.parent)}) and git add it again, "
                          "or run `make lab` once: it installs the filter that does this on every git add")
    code = [c.source for c in jupytext.read(path).cells if c.cell_type == "code"]
    assert any("offloadkit" in c for c in code), f"{path.name} does not import offloadkit"


# ---- running the course does not break the tests --------------------------------------------------

def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          capture_output=True, text=True, check=True)


def _run_it_in_jupyterlab(path: Path, run: int = 1) -> None:
    """What JupyterLab saves after running a notebook: outputs, counts and fresh random cell ids."""
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        cell.id = f"a{i}f3e{run}"
        if cell.cell_type == "code":
            cell.execution_count = i + run
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"run {run}: 33.1 GB/s\n")]
    nbformat.write(nb, path)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_outputs_saved_by_jupyterlab_fail_nothing_and_the_filter_keeps_them_out_of_git(tmp_path):
    repo = tmp_path / "course"
    repo.mkdir()
    source = SOURCES[0]
    for f in (source, NOTEBOOKS_DIR / "jupytext.toml"):
        shutil.copy(f, repo / f.name)
    ipynb = repo / source.with_suffix(".ipynb").name
    # the notebook as a fresh clone has it: built from its .py, stripped
    built = jupytext.writes(jupytext.read(source), fmt="ipynb")
    ipynb.write_text(subprocess.run([sys.executable, "-m", "nbstripout", "-t"], input=built, capture_output=True,
                                    text=True, check=True).stdout)
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "clean")

    _run_it_in_jupyterlab(ipynb)
    assert stored_problems(ipynb.read_text())  # the working file has outputs now...
    assert not stored_problems(stored_text(ipynb))  # ...but git stores the clean notebook: the check passes
    assert not pair_problems(repo / source.name)  # outputs are no cells: the pair is still in sync

    _git(repo, "add", ipynb.name)  # no filter installed: git stores the outputs, and the check says so
    assert any("outputs" in p for p in stored_problems(stored_text(ipynb)))

    # what `make lab` runs: the filter named in .gitattributes strips every notebook on `git add`
    subprocess.run([sys.executable, "-m", "nbstripout", "--install", "--attributes", ".gitattributes"],
                   cwd=repo, check=True, capture_output=True)
    _git(repo, "add", "--renormalize", ipynb.name)  # what is staged already goes through it again
    assert not stored_problems(stored_text(ipynb))
    _run_it_in_jupyterlab(ipynb, run=2)  # and every later run of the course
    _git(repo, "add", ipynb.name)
    assert not stored_problems(stored_text(ipynb))
    assert stored_problems(ipynb.read_text())  # the working file keeps its outputs for the user
    assert _git(repo, "status", "--porcelain", "--", ipynb.name).stdout == ""  # git sees nothing to commit
    assert "filter=nbstripout" in (repo / ".gitattributes").read_text()
