"""The control-panel mechanics the interactive widgets share: read the controls, set several, redraw once.

A widget such as :class:`~offloadkit.viz.plan_tuner.PlanTuner` or
:class:`~offloadkit.viz.benchmarks.SpeedupExplorer` holds a dict of ipywidgets controls and one
``_update`` that recomputes and redraws its figures. :class:`ControlPanel` wires the controls to that
``_update`` and gives every such widget the same ``values()`` and ``set(**values)`` (several changes,
one redraw: what notebooks and tests call), so each widget module keeps only what it draws.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets


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


__all__ = ["ControlPanel"]
