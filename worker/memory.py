"""Peak resident memory of the worker process per stage of a series.

Linux keeps a process's peak resident set (VmHWM in /proc/self/status); writing 5 to
/proc/self/clear_refs resets it to the current resident set, so a reset at a stage's start and a
read at its end give that stage's peak. Where either is unavailable the peaks are None.
"""
from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak() -> bool:
    """Start a new peak at the current resident set; False where the system cannot."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float | None:
    """The peak resident set since the last reset (or since the process started), in MB."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return None
