"""nbval settings for the course notebooks.

Notebooks are stored without outputs, so nbval (``--nbval-lax``) only checks that every cell runs,
plus the cells marked ``# NBVAL_CHECK_OUTPUT``. Plotly and widget outputs carry random ids, so they
are never compared.
"""

import os

os.environ.setdefault("PLOTLY_RENDERER", "notebook_connected")


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += (
            "text/html",
            "application/vnd.plotly.v1+json",
            "application/vnd.jupyter.widget-view+json",
            "application/javascript",
        )
