"""`Scan`: one labelled head CT as every dataset adapter yields it and training consumes it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.geometry import Volume

CHILD_AGE_YEARS = 18.0  # under this age a patient is a child (reports by age, the `children` training focus)


def is_child(age_years: float | None) -> bool:
    """Known to be under CHILD_AGE_YEARS (False when the age is unknown)."""
    return age_years is not None and age_years < CHILD_AGE_YEARS


@dataclass
class Scan:
    scan_id: str
    patient_id: str  # split by this, never by slice
    volume: Volume
    labels: dict[str, int] | dict[str, float]  # vocabulary.LABELS -> scan-level 0/1 (or soft)
    slice_labels: np.ndarray | None = None  # (slices, len(LABELS)) 0/1, in volume order, when known
    masks: dict[str, np.ndarray] | None = None  # subtype ("any" if unknown) -> (slices, rows, columns) bool
    report: str | None = None  # free-text radiology report, when known
    derivation: str | None = None  # how the HU were obtained, when not read from a scanner's DICOM
    brain_window_only: bool = False  # HU known only inside the brain window (RSNA PNG slices)
    age_years: float | None = None  # the patient's age at the scan, where the source records it
    slice_fracture: np.ndarray | None = None  # (slices,) 0/1: a skull fracture on the slice, where known (CT-ICH)
