"""The detector's interface: a Hounsfield volume in, a :class:`DetectorOutput` out, and the error
raised when its model cannot be loaded. Kept apart from the package's `__init__` so the modules
that implement it import it without importing their own package."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from worker.geometry import Volume


@dataclass
class DetectorOutput:
    """What the detector says about one volume. Arrays follow the volume's slice order."""

    probabilities: dict[str, float]  # keys LABELS, calibrated scan-level probabilities 0..1
    slice_scores: np.ndarray  # (slices,) probability of any ICH per slice
    slice_probabilities: np.ndarray  # (slices, len(LABELS))
    heatmaps: np.ndarray  # (slices, rows, columns) float32 0..1, in the volume's grid
    masks: dict[str, np.ndarray]  # subtype -> (slices, rows, columns) bool, in the volume's grid
    volumes_ml: dict[str, float]  # keys LABELS where segmented
    difficult: bool  # a probability near the operating threshold: a human should look closely
    model_name: str
    model_version: str
    member_outputs: dict[str, dict[str, float]] = field(default_factory=dict)  # per member, for the SR
    parameters: dict[str, str] = field(default_factory=dict)  # algorithm parameters, for TID 4019


class Detector(Protocol):
    name: str
    version: str

    def detect(self, volume: Volume, timings: dict[str, float] | None = None, brain_window_only: bool = False) -> DetectorOutput: ...


class ModelLoadError(RuntimeError):
    """The model files are missing, corrupt or do not match their manifest."""
