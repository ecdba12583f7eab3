"""Plotly figures of the course and the CLI; each title says measured, simulated or computed, and on what.

- :mod:`~offloadkit.viz.anatomy` — where a model's bytes are, which experts its tokens chose;
- :mod:`~offloadkit.viz.hardware` — profiles through the cost model: rooflines with their roofs, the catalog;
- :mod:`~offloadkit.viz.timeline` — a step's lanes, one bar per task, the legend below with every kind;
- :mod:`~offloadkit.viz.cpu_kernels` — the CPU expert against this machine's memory read (notebook 04);
- :mod:`~offloadkit.viz.plan_tuner` — the what-if panel: plans, speeds, speedups and GPU memory (notebook 06);
- :mod:`~offloadkit.viz.assignment` — one step's GG / CG / CC split, expert counts, the step scrubber (notebook 07);
- :mod:`~offloadkit.viz.benchmarks` — scheinfer's speedups from the simulated paper experiment beside the measured
  offloadkit / llama.cpp ratios of this machine, the speedup explorer (notebook 09).
- :mod:`~offloadkit.viz.dashboards` — the timeline explorer (one step's lanes, simulated and measured, their
  utilisation and the bound; Perfetto export) and the speedup board (models × profiles grid);
- :mod:`~offloadkit.viz.controls` and :func:`~offloadkit.viz.timeline.sync_figure` — what the widgets share.

They draw; they never measure or simulate (the notebooks and commands do, and pass the results in), except
the two widgets, which re-plan and re-simulate when a control moves (their titles say simulated, and on what).
"""
