"""Dashboards: the timeline explorer and the speedup board (figures as pure functions, thin widget wiring).

- :mod:`~offloadkit.viz.dashboards.timeline_explorer` — :class:`TimelineExplorer`: one step's four
  lanes (simulated, and measured beside it), each lane's utilisation, the bounding lane and the gap to
  the bound; exports what it shows as a Perfetto trace;
- :mod:`~offloadkit.viz.dashboards.speedup_board` — :class:`SpeedupBoard`: scheinfer's simulated
  speedup over llama.cpp, Fiddler or KTransformers on a models × profiles grid, measured rows beside.

Every figure's title says **simulated** (and on what) or **measured** (and on which machine).
"""

from offloadkit.viz.dashboards.speedup_board import (
    SpeedupBoard,
    SpeedupGrid,
    measured_grid,
    speedup_grid,
    speedup_grid_figure,
)
from offloadkit.viz.dashboards.timeline_explorer import (
    PROMPTS,
    Bound,
    TimelineExplorer,
    chrome_trace,
    explorer_figure,
    is_loopback,
    lane_utilisation,
    rebased,
    step_figures,
    step_timeline,
    timeline_from_chrome_trace,
    timeline_from_file,
)

__all__ = ["PROMPTS", "Bound", "SpeedupBoard", "SpeedupGrid", "TimelineExplorer", "chrome_trace", "explorer_figure",
           "is_loopback", "lane_utilisation", "measured_grid", "rebased", "speedup_grid", "speedup_grid_figure",
           "step_figures", "step_timeline", "timeline_from_chrome_trace", "timeline_from_file"]
