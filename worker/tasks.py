"""Celery tasks of the worker: small, idempotent, carrying references, never pixel data.

`analyze_series` gets a series UID, its dispatch generation and the instance paths relative to
data_dir (a shared path when workers run on other hosts). Running it twice writes the same
files with the same UIDs (result UIDs derive from the source series and the model version).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from celery.signals import worker_init

from node.config import load_settings
from worker.celery_app import ANALYZE_TASK, make_celery
from worker.detector import load_detector
from worker.pipeline import analyze_series as run_analysis
from worker.priority import PriorityRule
from worker.volume import VolumeError

log = logging.getLogger("ichnode.worker")

settings = load_settings()
app = make_celery(settings)
_detector = None


def detector():
    """The detector, loaded once per worker process."""
    global _detector
    if _detector is None:
        _detector = load_detector(settings.model_path, settings.device)
    return _detector


@worker_init.connect
def _load_model(**_):
    """Load at start-up, so missing or corrupt weights stop the worker before it takes a task."""
    detector()


@app.task(name=ANALYZE_TASK)
def analyze_series(series_uid: str, generation: int, instance_paths: list[str]) -> dict:
    data_dir = settings.data_dir.resolve()
    paths = [settings.spool_dir / p for p in instance_paths]
    out_dir = settings.results_dir / series_uid
    log.info("analysing series %s (generation %d, %d instances) pid %d",
             series_uid, generation, len(paths), os.getpid())
    try:
        analysis = run_analysis(paths, detector(), PriorityRule.from_settings(settings), out_dir)
    except VolumeError as exc:
        log.warning("series %s not analysed: %s", series_uid, exc)
        return {"series_uid": series_uid, "generation": generation, "skipped": str(exc)}
    log.info("series %s analysed in %.1f s: %s", series_uid, analysis.seconds,
             analysis.findings.priority.level)
    return {
        "series_uid": series_uid,
        "generation": generation,
        "findings": analysis.findings.as_json(),
        "result_files": [str(Path(p).resolve().relative_to(data_dir)) for p in analysis.result_files],
        "warnings": analysis.warnings,
        "seconds": round(analysis.seconds, 2),
    }
