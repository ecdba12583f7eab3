"""The control-panel mechanics the interactive widgets share: read the controls, set several, redraw once.

A widget such as :class:`~offloadkit.viz.plan_tuner.PlanTuner` or
:class:`~offloadkit.viz.benchmarks.SpeedupExplorer` holds a dict of ipywidgets controls and one
``_update`` that recomputes and redraws its figures. :class:`ControlPanel` wires the controls to that
``_update`` and gives every such widget the same ``values()`` and ``set(**values)`` (several changes,
one redraw: what notebooks and tests call), so each widget module keeps only what it draws.

The other shared pieces: :func:`put_trace` / :func:`trace` (update a figure's trace by its ``meta``
key in place, or add it; find it again), :func:`progress` (a ``tqdm.auto`` bar for long work behind a
widget: a sweep, a measurement), and ``_ipython_display_`` (a panel shows its ``widget``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import ipywidgets as widgets
import plotly.graph_objects as go

T = TypeVar("T")


def put_trace(fig: go.Figure, key: str, make: Any, row: int | None = None, col: int | None = None,
              **props: Any) -> Any:
    """Update the trace whose ``meta`` is ``key`` in place, or add it (``make``: a trace class); return it."""
    for t in fig.data:
        if t.meta == key:
            t.update(**props)
            return t
    fig.add_trace(make(meta=key, **props), row=row, col=col)
    return fig.data[-1]


def trace(fig: go.Figure, key: str) -> Any:
    """The trace of ``fig`` drawn for ``key`` (its ``meta``)."""
    return next(t for t in fig.data if t.meta == key)


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """``items`` behind a ``tqdm.auto`` progress bar (a widget bar in Jupyter, text elsewhere)."""
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, leave=False)


class ControlPanel:
    """Mix-in: ``self.controls`` (name -> ipywidget) redraw through ``self._update()`` on every change."""

    controls: dict[str, widgets.ValueWidget]
    _hold: bool = False

    def _watch_controls(self) -> None:
        """Call once the controls exist: every change of a control's value redraws."""
        self._hold = False
        for control in self.controls.values():
            control.observe(self._on_change, names="value")

    def values(self) -> dict[str, Any]:
        return {k: c.value for k, c in self.controls.items()}

    def set(self, **values: Any) -> None:
        """Change several controls, then redraw once (``widget.set(phase="decode", model=...)``)."""
        unknown = set(values) - set(self.controls)
        if unknown:
            raise KeyError(f"no control {', '.join(sorted(unknown))}: the controls are {', '.join(self.controls)}")
        self._hold = True
        try:
            for k, v in values.items():
                self.controls[k].value = v
        finally:
            self._hold = False
        self._update()

    def _on_change(self, change: dict) -> None:
        if not self._hold:
            self._update()

    def _update(self) -> None:
        raise NotImplementedError

    def _ipython_display_(self) -> None:
        """Jupyter shows the panel's ``widget`` (an attribute, or a method that builds it)."""
        from IPython.display import display

        w = getattr(self, "widget")  # noqa: B009 - the subclass defines it
        display(w() if callable(w) else w)


__all__ = ["ControlPanel", "progress", "put_trace", "trace"]
