"""`Dispatcher`: the node's side of the queue.

`dispatch` queues a complete, chosen series; `poll` follows the queued tasks through the result
backend (queued -> analysing -> done | failed | skipped), hands finished results to delivery, and
re-queues a series whose task was lost: its worker process died (seen by `serve`), or it did not
finish within `task_timeout_seconds`.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from celery import Celery
from pydantic import ValidationError

from ichnode.common.analysis import AnalysisResult, SeriesFindings, Skipped
from ichnode.common.config import Settings
from ichnode.common.queue import ANALYZE_TASK
from node.latency import observe, stage_seconds
from node.metrics import ANALYSIS_SECONDS, SERIES
from node.store import SeriesRow, Store

log = logging.getLogger("ichnode.dispatcher")


class Dispatcher:
    def __init__(self, store: Store, settings: Settings, celery: Celery,
                 on_result: Callable[[SeriesRow, int, SeriesFindings], None]):
        self.store = store
        self.task_timeout_seconds = settings.queue.task_timeout_seconds
        self.celery = celery
        self.on_result = on_result  # (series, generation, findings) -> deliver

    def dispatch(self, series_uid: str, last_received_at: float | None = None) -> None:
        generation = self.store.series(series_uid).generation + 1
        task_id = f"analyze-{series_uid}-g{generation}"
        if self.store.mark_queued(series_uid, task_id, last_received_at) is None:
            return  # an instance arrived meanwhile: the assembler will come back to it
        paths = [instance.path for instance in self.store.instances(series_uid)]
        try:
            self.celery.send_task(ANALYZE_TASK, args=[series_uid, generation, paths], task_id=task_id)
        except Exception as exc:  # broker down: the time-out re-queues it
            log.error("series %s: could not be queued (%s); will retry", series_uid, exc)
            return
        SERIES.labels(state="queued").inc()
        log.info("series %s queued (generation %d, %d instances)", series_uid, generation, len(paths))

    def requeue(self, series_uid: str, why: str) -> None:
        log.warning("series %s re-queued: %s", series_uid, why)
        self.dispatch(series_uid)

    def poll(self, now: float | None = None, dead_worker_pids: set[int] = frozenset(),
             worker_died_at: float = 0.0) -> None:
        """Follow every queued task. `dead_worker_pids` and `worker_died_at` come from `serve`:
        a task started by a dead worker, or waiting since before a worker died (it may have been
        taken from the embedded queue), is queued again."""
        now = time.time() if now is None else now
        for series in self.store.series_in_state("queued", "analysing"):
            uid, generation = series.series_uid, series.generation
            result = self.celery.AsyncResult(series.task_id)
            state = result.state
            if state == "PENDING" and series.queued_at < worker_died_at:
                self.requeue(uid, "a worker process died; it may have taken this task")
                continue
            if state == "STARTED":
                info = result.info if isinstance(result.info, dict) else {}
                if info.get("pid") in dead_worker_pids:
                    self.requeue(uid, f"worker process {info.get('pid')} died while analysing it")
                    continue
                if series.state == "queued":
                    self.store.mark_analysing(uid, generation, now)
            elif state == "SUCCESS":
                try:
                    self._finish(series, AnalysisResult.model_validate(result.result))
                except ValidationError as exc:  # a worker of another version: its result cannot be read
                    self._fail(uid, generation, f"result does not match the contract: {exc.errors()[0]['msg']}")
                continue
            elif state in ("FAILURE", "REVOKED"):
                self._fail(uid, generation, f"{type(result.result).__name__}: {result.result}")
                continue
            since = series.started_at or series.queued_at or now
            if now - since > self.task_timeout_seconds:
                self.requeue(uid, f"no result after {self.task_timeout_seconds:.0f} s")

    def _fail(self, series_uid: str, generation: int, why: str) -> None:
        reason = f"analysis failed: {why}"
        log.error("series %s %s", series_uid, reason)
        if self.store.mark_result(series_uid, generation, "failed", None, reason):
            SERIES.labels(state="failed").inc()

    def _finish(self, series: SeriesRow, result: AnalysisResult) -> None:
        uid, generation = series.series_uid, result.generation
        if isinstance(result.outcome, Skipped):
            reason = result.outcome.skipped
            if self.store.mark_result(uid, generation, "skipped", None, reason):
                SERIES.labels(state="skipped").inc()
            log.info("series %s skipped by the worker: %s", uid, reason)
            return
        findings = result.outcome
        if not self.store.mark_result(uid, generation, "done", findings, None):
            log.info("series %s: result of generation %d superseded, not delivered", uid, generation)
            return
        SERIES.labels(state="done").inc()
        ANALYSIS_SECONDS.observe(findings.seconds or 0)
        log.info("series %s done: %s %s", uid, findings.priority.level, findings.probabilities)
        self.on_result(series, generation, findings)
        # "total" is known here only when nothing is to be delivered; else the last delivery observes it
        observe(stage_seconds(self.store.series(uid), self.store.deliveries(uid)),
                "completion_wait", "queue", "load", "detector", "result_objects", "total")
