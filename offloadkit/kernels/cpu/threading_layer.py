"""Numba's threading layer, chosen before any CPU kernel runs: one that several threads may enter at once.

Numba runs ``@njit(parallel=True)`` loops on a *threading layer*: TBB, OpenMP (``omp``) or its own
``workqueue``. Left to itself it takes the first that loads, in the order of
``NUMBA_THREADING_LAYER_PRIORITY`` (tbb, omp, workqueue by default), so a machine with neither TBB nor
an OpenMP runtime silently gets workqueue. Workqueue is not thread-safe: two threads in parallel
kernels at the same time abort the whole process ("Numba workqueue threading layer is terminating:
Concurrent access has been detected"). offloadkit's hybrid executor calls the CPU kernels from more
than one thread (the CPU lane next to the threads that feed the GPU), so this module asks Numba for a
``threadsafe`` layer (TBB, else OpenMP), starts it, and checks what it got.

:func:`require_threadsafe_layer` runs when :mod:`offloadkit.kernels.cpu.primitives` is imported, which
every module with a parallel kernel imports first. It refuses, with
:class:`ThreadingLayerError` saying what to install, where only workqueue can run, and where the
layer runs as workqueue anyway (a user's ``NUMBA_THREADING_LAYER=workqueue``, or a parallel Numba
function run before offloadkit was imported): it never lets a kernel run on a layer that can abort
the process.
"""

from __future__ import annotations

import numba

from offloadkit.errors import ThreadingLayerError

#: The layers that may be entered from several threads at once.
THREADSAFE_LAYERS = ("tbb", "omp")

INSTALL_HINT = ("install TBB (pip install tbb) or an OpenMP runtime (Linux: libgomp, e.g. apt install libgomp1; "
                "macOS: pip install intel-openmp)")


def require_threadsafe_layer() -> str:
    """Start Numba's threading layer as a thread-safe one, and return its name (``"tbb"`` or ``"omp"``).

    Asks for ``threadsafe`` unless the user chose a layer (``NUMBA_THREADING_LAYER``); only checks when
    the layer is already running. Raises :class:`ThreadingLayerError` when what runs is not thread-safe.
    """
    try:
        layer = numba.threading_layer()  # already started: by an earlier call, or by the user's own code
    except ValueError:  # not started yet: choose now, before any parallel kernel runs
        if str(numba.config.THREADING_LAYER).lower() == "default":  # nobody chose: choose thread-safe
            numba.config.THREADING_LAYER = "threadsafe"
        try:
            numba.get_num_threads()  # starts the layer (Numba's public way to do so)
        except ValueError as e:  # "No threading layer could be loaded"
            raise ThreadingLayerError(
                f"Numba found no thread-safe threading layer for offloadkit's CPU kernels (asked for "
                f"{numba.config.THREADING_LAYER!r}; {_first_line(e)}). They are called from several threads at "
                f"once, which Numba's workqueue layer cannot take: {INSTALL_HINT}") from e
        layer = numba.threading_layer()
    if layer not in THREADSAFE_LAYERS:
        raise ThreadingLayerError(
            f"Numba's threading layer is {layer!r}, which aborts the process when two threads run parallel "
            f"kernels at once, as offloadkit's CPU kernels do. NUMBA_THREADING_LAYER asked for it "
            f"({numba.config.THREADING_LAYER!r}), or a parallel Numba function ran before offloadkit was "
            f"imported: unset NUMBA_THREADING_LAYER (or set it to 'omp' or 'tbb') and import offloadkit "
            f"before other parallel Numba code; if neither layer loads, {INSTALL_HINT}")
    return layer


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


__all__ = ["INSTALL_HINT", "THREADSAFE_LAYERS", "ThreadingLayerError", "require_threadsafe_layer"]
