"""worker/memory.py: a stage's peak resident memory, reset at its start."""
from __future__ import annotations

import numpy as np
import pytest

from worker.memory import peak_mb, reset_peak


def test_a_stage_peak_counts_what_it_allocated_and_the_next_stage_starts_from_what_is_resident():
    if not reset_peak() or peak_mb() is None:
        pytest.skip("this system keeps no resettable peak resident set (not Linux)")
    before = peak_mb()
    block = np.ones(200 * 1024 * 1024 // 8)  # 200 MB, every page touched
    during = peak_mb()
    assert during - before >= 150
    del block
    assert reset_peak()
    assert peak_mb() < during - 150  # the freed block no longer counts for the next stage
