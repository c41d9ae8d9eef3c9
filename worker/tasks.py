"""The worker's Celery task: small, idempotent, carrying references, never pixel data.

`analyze_series` gets a series UID, its dispatch generation and the instance paths relative to
the spool directory under data_dir (a shared path when workers run on other hosts), and returns
an :class:`~ichnode.common.analysis.AnalysisResult` whose result files are relative to data_dir.
Running it twice writes the same files with the same UIDs (result UIDs derive from the source
series and the model version).
"""
from __future__ import annotations

import logging
import os

import torch
from celery import Celery

from ichnode.common.analysis import AnalysisResult, SeriesFindings, Skipped
from ichnode.common.config import Settings
from ichnode.common.queue import ANALYZE_QUEUE, ANALYZE_TASK, make_celery
from worker.detector import Detector, load_detector
from worker.pipeline import NotAnalysed, analyze_series
from worker.volume import VolumeError

log = logging.getLogger("ichnode.worker")


def create_worker_app(settings: Settings, detector: Detector) -> Celery:
    """The Celery application with the analysis task, which runs `detector`."""
    app = make_celery(settings)
    storage = settings.storage

    @app.task(name=ANALYZE_TASK, pydantic=True)
    def analyze(series_uid: str, generation: int, instance_paths: list[str]) -> AnalysisResult:
        paths = [storage.spool_dir / p for p in instance_paths]
        log.info("analysing series %s (generation %d, %d instances) pid %d",
                 series_uid, generation, len(paths), os.getpid())
        try:
            analysis = analyze_series(paths, detector, settings.priority, storage.result_folder(series_uid),
                                      settings.series.analyse_contrast)
        except (VolumeError, NotAnalysed) as exc:
            log.warning("series %s not analysed: %s", series_uid, exc)
            return AnalysisResult(series_uid=series_uid, generation=generation, outcome=Skipped(skipped=str(exc)))
        log.info("series %s analysed in %.1f s: %s", series_uid, analysis.seconds, analysis.findings.priority.level)
        data_dir = storage.data_dir.resolve()
        findings = SeriesFindings(
            **dict(analysis.findings),
            result_files=[str(p.resolve().relative_to(data_dir)) for p in analysis.result_files],
            warnings=analysis.warnings,
            seconds=round(analysis.seconds, 2),
            stages=analysis.stages,
            peak_memory_mb=analysis.peak_memory_mb,
        )
        return AnalysisResult(series_uid=series_uid, generation=generation, outcome=findings)

    return app


def run_worker(settings: Settings, name: str = "worker", cpu_threads: int = 0) -> None:
    """Load the model (missing or corrupt weights stop the worker before it takes a task), then
    serve the analysis queue in this process, one task at a time, on `cpu_threads` threads (0:
    torch's default, every core)."""
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    detector = load_detector(settings.detector.model_path, settings.detector.device)
    app = create_worker_app(settings, detector)
    app.worker_main(["worker", "--pool=solo", "-Q", ANALYZE_QUEUE, "-n", f"{name}@%h",
                     f"--loglevel={settings.log_level}"])
