"""The ICH detector as a plain library: a Hounsfield volume in, findings out.

It knows nothing of Celery, DICOM networking or the node. Training, `ichnode analyze` and the
worker all call :func:`load_detector` then :meth:`Detector.detect`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from worker.geometry import Volume

#: Output order of every member and of the ensemble.
SUBTYPES: tuple[str, ...] = ("EDH", "IPH", "IVH", "SAH", "SDH")
LABELS: tuple[str, ...] = ("any",) + SUBTYPES


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


def load_detector(path: Path | None = None, device: str = "auto") -> Detector:
    """The ensemble in `path` (a directory with manifest.json, or the manifest itself).

    None loads the shipped demo weights. Raises :class:`ModelLoadError` naming the file and
    problem when anything is missing or corrupt, so the node can fail at start-up.
    """
    from worker.detector.detector import EnsembleDetector, resolve_device
    from worker.detector.store import SHIPPED_DIR, load_model

    model_dir = SHIPPED_DIR if path is None else Path(path)
    if model_dir.is_file():
        model_dir = model_dir.parent
    torch_device = resolve_device(device)
    ensemble, manifest = load_model(model_dir, torch_device)
    return EnsembleDetector(ensemble, manifest, torch_device)
