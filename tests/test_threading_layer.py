"""Numba's threading layer: the CPU kernels run on a thread-safe one (TBB or OpenMP), chosen by offloadkit
even where Numba would take workqueue, and refuse to run on workqueue, which aborts the process when two
threads enter parallel kernels at once (see offloadkit.kernels.cpu.threading_layer).

The cases that choose a layer run in a fresh interpreter: a process starts its layer once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numba
import pytest
import torch

from offloadkit.errors import OffloadkitError
from offloadkit.kernels.cpu import ExpertWeights, expert_rows
from offloadkit.kernels.cpu import threading_layer as tl


def small_expert(seed: int = 0, hidden: int = 96, inter: int = 160):
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(*shape, generator=g).bfloat16() for shape in ((inter, hidden), (inter, hidden), (hidden, inter))]
    return w, torch.randn(3, hidden, generator=g)


def reference(w, x, rows):
    """The expert slice from its formula, in f64: ``W2[:, r0:r1] (silu(W1[r0:r1] x) * W3[r0:r1] x)``."""
    g, u, d = (t.double() for t in w)
    r0, r1 = rows
    h = torch.nn.functional.silu(x.double() @ g[r0:r1].T) * (x.double() @ u[r0:r1].T)
    return (h @ d[:, r0:r1].T).float()


def test_the_kernels_run_on_a_threadsafe_layer_and_two_threads_may_call_them():
    w, x = small_expert()
    weights = ExpertWeights.from_torch(*w)
    assert numba.threading_layer() in ("tbb", "omp")
    rows = [(0, 160), (7, 101)]
    results: dict[tuple[int, int], list] = {r: [] for r in rows}
    errors: list[BaseException] = []

    def work(r):
        try:
            for _ in range(50):
                results[r].append(expert_rows(x, weights, r).copy())  # the parallel decode kernel
        except BaseException as e:  # noqa: BLE001 - surfaced below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in rows]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in rows:
        assert len(results[r]) == 50
        for y in results[r]:
            torch.testing.assert_close(torch.from_numpy(y), reference(w, x, r), rtol=1e-4, atol=1e-4)


CONCURRENT_CALLS = """
import sys, threading
import numba, torch
try:
    from offloadkit.kernels.cpu import ExpertWeights, expert_rows
except Exception as e:
    print("REFUSED", type(e).__name__, e)
    sys.exit(3)
g = torch.Generator().manual_seed(0)
w = ExpertWeights.from_torch(*(torch.randn(*s, generator=g).bfloat16() for s in ((512, 256), (512, 256), (256, 512))))
x = torch.randn(2, 256, generator=g)
expected = expert_rows(x, w)
bad = []
def work():
    for _ in range(300):
        if abs(expert_rows(x, w) - expected).max() > 1e-4:
            bad.append(1)
threads = [threading.Thread(target=work) for _ in range(3)]
for t in threads: t.start()
for t in threads: t.join()
print("LAYER", numba.threading_layer(), "BAD", len(bad))
"""


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_offloadkit_overrides_a_priority_that_would_pick_workqueue():
    """With workqueue first in Numba's priority, Numba alone starts workqueue, and three threads in the
    kernels at once abort the process. offloadkit asks for a thread-safe layer instead."""
    r = run_python(CONCURRENT_CALLS, NUMBA_THREADING_LAYER_PRIORITY="workqueue omp tbb")
    if r.returncode == 3:
        pytest.skip(f"no thread-safe Numba threading layer on this machine: {r.stdout.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split()[-4:-2] in (["LAYER", "omp"], ["LAYER", "tbb"]) and r.stdout.split()[-1] == "0", r.stdout


def test_a_user_who_asks_for_workqueue_is_refused_before_any_kernel_runs():
    r = run_python("import offloadkit.kernels.cpu", NUMBA_THREADING_LAYER="workqueue")
    assert r.returncode != 0
    assert "ThreadingLayerError: Numba's threading layer is 'workqueue', which aborts the process" in r.stderr
    assert "unset NUMBA_THREADING_LAYER (or set it to 'omp' or 'tbb')" in r.stderr


def test_without_tbb_or_openmp_the_refusal_says_what_to_install(monkeypatch):
    """Numba has not started a layer; asked for 'threadsafe', it finds none (as on a machine with neither)."""
    def not_started():
        raise ValueError("Threading layer is not initialized.")

    def no_layer():
        raise ValueError("No threading layer could be loaded.\nHINT:\nIntel TBB is required, try:\n$ pip install tbb")

    monkeypatch.setattr(numba.config, "THREADING_LAYER", "default")
    monkeypatch.setattr(numba, "threading_layer", not_started)
    monkeypatch.setattr(numba, "get_num_threads", no_layer)
    with pytest.raises(tl.ThreadingLayerError) as caught:
        tl.require_threadsafe_layer()
    message = str(caught.value)
    assert numba.config.THREADING_LAYER == "threadsafe"  # what offloadkit asked Numba for
    assert "asked for 'threadsafe'; No threading layer could be loaded." in message
    assert "pip install tbb" in message and "libgomp" in message
    assert isinstance(caught.value, OffloadkitError)


def test_a_layer_already_running_as_workqueue_is_refused(monkeypatch):
    monkeypatch.setattr(numba, "threading_layer", lambda: "workqueue")
    with pytest.raises(tl.ThreadingLayerError, match="'workqueue', which aborts the process"):
        tl.require_threadsafe_layer()
    monkeypatch.setattr(numba, "threading_layer", lambda: "tbb")
    assert tl.require_threadsafe_layer() == "tbb"
