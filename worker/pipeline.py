"""`analyze_series`: DICOM files of one series -> findings and result objects on disk.

The one analysis path shared by the Celery task and `ichnode analyze`: load the Hounsfield
volume, check that it is a head CT without contrast, run the detector, assign the priority, build
the result objects, write them with findings.json and PNG thumbnails of the heatmap captures into
the result folder.

Head and contrast: where the headers do not name the head (ichnode.common.header_words; the
node's selection lets such a series through), the images decide (worker.head_ct) and a volume
that is not a head is not analysed. Contrast, in the headers or the images, is not analysed
either, unless `analyse_contrast` is set: then it is, with a warning. The image evidence is
logged either way.
"""
from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from ichnode.common.analysis import Findings, WorkerStagePeaks, WorkerStages
from ichnode.common.config import PriorityRule
from ichnode.common.header_words import contrast_in_headers, head_in_headers
from ichnode.common.result_folder import ResultFolder
from ichnode.common.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from worker.detector import Detector
from worker.findings import findings_from_output
from worker.head_ct import examine
from worker.memory import peak_mb, reset_peak
from worker.priority import assign_priority
from worker.results import build_results
from worker.volume import load_series

log = logging.getLogger("ichnode.worker")


class NotAnalysed(Exception):
    """A series the worker does not analyse although it loads: not a head, or contrast-enhanced."""


@dataclass
class Analysis:
    findings: Findings
    result_files: list[Path]  # DICOM objects to deliver, in sending order
    warnings: list[str]
    seconds: float
    stages: WorkerStages
    peak_memory_mb: WorkerStagePeaks | None


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


def _text(ds, *keywords: str) -> str:
    return " ".join(str(ds.get(k) or "") for k in keywords).strip()


def _check_head_and_contrast(first, volume, analyse_contrast: bool) -> list[str]:
    """Raises NotAnalysed for a volume that is not a head or shows contrast; the warnings to add."""
    series = first.SeriesInstanceUID
    images = examine(volume)
    named = head_in_headers(_text(first, "BodyPartExamined"),
                            _text(first, "SeriesDescription", "ProtocolName", "StudyDescription"))
    log.info("series %s: headers %s; images %s: %s", series, "name the head" if named else "do not name the head",
             "show a head" if images.head else "do not show a head", images.head_reason)
    if not named and not images.head:
        raise NotAnalysed(f"not a head CT by its images (the headers do not say): {images.head_reason}")
    contrast = contrast_in_headers(_text(first, "ContrastBolusAgent"), _text(first, "SeriesDescription"))
    contrast = contrast or images.contrast
    if contrast is None:
        return []
    if not analyse_contrast:
        raise NotAnalysed(f"contrast-enhanced ({contrast}); set series.analyse_contrast to analyse it")
    return [f"contrast-enhanced ({contrast}): analysed because series.analyse_contrast is set; "
            "the detector was trained on non-contrast CT, so dense vessels may read as blood"]


class _StageMeter:
    """Seconds and the process's peak resident memory (worker/memory.py) of consecutive stages."""

    def __init__(self) -> None:
        self.started = self._mark = time.monotonic()
        self._peaks_known = reset_peak()
        self.seconds: dict[str, float] = {}
        self._peaks: dict[str, float | None] = {}

    def end(self, stage: str) -> None:
        """The stage under way ends now and the next one starts."""
        now = time.monotonic()
        self.seconds[stage] = round(now - self._mark, 3)
        self._peaks[stage] = peak_mb()
        reset_peak()
        self._mark = now

    @property
    def total(self) -> float:
        return self._mark - self.started

    def peaks(self) -> WorkerStagePeaks | None:
        known = self._peaks_known and None not in self._peaks.values()
        return WorkerStagePeaks(**self._peaks) if known else None


def analyze_series(paths: Sequence[Path], detector: Detector, rule: PriorityRule, folder: ResultFolder,
                   analyse_contrast: bool = False) -> Analysis:
    meter = _StageMeter()
    loaded = load_series(paths)
    for warning in loaded.warnings:
        log.warning("%s", warning)
    first = loaded.sources[0]
    for warning in _check_head_and_contrast(first, loaded.volume, analyse_contrast):
        log.warning("series %s: %s", first.SeriesInstanceUID, warning)
        loaded.warnings.append(warning)
    meter.end("load")
    output = detector.detect(loaded.volume)
    priority = assign_priority(rule, output.probabilities, output.volumes_ml, output.difficult)
    findings = findings_from_output(
        str(first.StudyInstanceUID), str(first.SeriesInstanceUID), loaded.volume, output, priority
    )
    meter.end("detector")
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
    meter.end("result_objects")
    return Analysis(findings, result_files, loaded.warnings, meter.total, WorkerStages(**meter.seconds), meter.peaks())
