"""The ICH detector as a plain library: a Hounsfield volume in, findings out.

It knows nothing of Celery, DICOM networking or the node. Training, `ichnode analyze` and the
worker all call :func:`load_detector` then :meth:`Detector.detect`.
"""
from __future__ import annotations

from pathlib import Path

from ichnode.common.vocabulary import LABELS, SUBTYPES
from worker.detector.interface import Detector, DetectorOutput, ModelLoadError

__all__ = ["LABELS", "SUBTYPES", "Detector", "DetectorOutput", "ModelLoadError", "load_detector"]


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
