"""`analyze_series`: DICOM files of one series -> findings and result objects on disk.

The one analysis path shared by the Celery task and `ichnode analyze`: load the Hounsfield
volume, run the detector, assign the priority, build the result objects, write them with
findings.json and PNG thumbnails of the heatmap captures into the result folder.
"""
from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from ichnode.common.analysis import Findings, WorkerStages
from ichnode.common.config import PriorityRule
from ichnode.common.result_folder import ResultFolder
from ichnode.common.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from worker.detector import Detector
from worker.findings import findings_from_output
from worker.priority import assign_priority
from worker.results import build_results
from worker.volume import load_series

log = logging.getLogger("ichnode.worker")


@dataclass
class Analysis:
    findings: Findings
    result_files: list[Path]  # DICOM objects to deliver, in sending order
    warnings: list[str]
    seconds: float
    stages: WorkerStages


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _thumbnail(ds, size: int = 256) -> bytes:
    image = Image.fromarray(ds.pixel_array)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def analyze_series(paths: Sequence[Path], detector: Detector, rule: PriorityRule, folder: ResultFolder) -> Analysis:
    started = time.monotonic()
    loaded = load_series(paths)
    for warning in loaded.warnings:
        log.warning("%s", warning)
    first = loaded.sources[0]
    loaded_at = time.monotonic()
    output = detector.detect(loaded.volume)
    priority = assign_priority(rule, output.probabilities, output.volumes_ml, output.difficult)
    findings = findings_from_output(
        str(first.StudyInstanceUID), str(first.SeriesInstanceUID), loaded.volume, output, priority
    )
    detected_at = time.monotonic()
    objects = build_results(loaded.sources, loaded.volume, output, findings)
    folder.path.mkdir(parents=True, exist_ok=True)
    result_files = []
    thumbnails = 0
    for ds in objects:
        ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        path = folder.object_file(ds.Modality, ds.SOPInstanceUID)
        _write_atomic(path, buffer.getvalue())
        result_files.append(path)
        if ds.Modality == "OT" or "SECONDARY" in (ds.get("ImageType") or []):
            _write_atomic(folder.thumbnail(thumbnails), _thumbnail(ds))
            thumbnails += 1
    _write_atomic(folder.findings_file, findings.model_dump_json(indent=2).encode())
    finished = time.monotonic()
    stages = WorkerStages(load=round(loaded_at - started, 3), detector=round(detected_at - loaded_at, 3),
                          result_objects=round(finished - detected_at, 3))
    return Analysis(findings, result_files, loaded.warnings, finished - started, stages)
