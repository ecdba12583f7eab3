"""Test-wide settings: hypothesis profiles, and seeded random generators so that every run draws the same inputs.

- ``CI`` set in the environment (``.ci/run`` exports ``CI=1``) loads the ``ci`` hypothesis profile:
  ``derandomize=True``, so CI tries the same examples on every run and a red build is reproducible, not
  a bad draw. Without it, the ``dev`` profile explores new random examples on each local run; choose
  them with ``pytest --hypothesis-seed=N`` to reproduce one. Neither has a deadline: this shared
  machine's timings are too noisy for one to mean anything.
- ``no_leftover_threads``: a test that starts threads (the hybrid engine's lanes, the loopback device's
  streams) fails if any is still running a few seconds after it ended.
- Every test starts with torch's, numpy's and Python's global generators seeded (``OFFLOADKIT_TEST_SEED``,
  default 0), so a test that draws with ``torch.randn`` draws the same inputs whichever tests ran before
  it. Set ``OFFLOADKIT_TEST_SEED`` to try other draws: the float tests' bounds (tests/numerics.py) hold
  for any input, so a failure under another seed is a finding, not noise.
"""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

SEED = int(os.environ.get("OFFLOADKIT_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def seeded_generators() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)


@pytest.fixture
def no_leftover_threads():
    """Fail the test if threads it started are still running a few seconds after it ended."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while (left := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not left, f"threads left running: {sorted(t.name for t in left)}"
