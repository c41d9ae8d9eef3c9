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

from node.config import Settings
from node.metrics import ANALYSIS_SECONDS, SERIES
from node.store import Store
from worker.celery_app import ANALYZE_TASK

log = logging.getLogger("ichnode.dispatcher")


class Dispatcher:
    def __init__(self, store: Store, settings: Settings, celery: Celery,
                 on_result: Callable[[dict, int, dict], None]):
        self.store = store
        self.settings = settings
        self.celery = celery
        self.on_result = on_result  # (series, generation, findings) -> deliver

    def dispatch(self, series_uid: str, last_received_at: float | None = None) -> None:
        series = self.store.series(series_uid)
        generation = series["generation"] + 1
        task_id = f"analyze-{series_uid}-g{generation}"
        if self.store.mark_queued(series_uid, task_id, last_received_at) is None:
            return  # an instance arrived meanwhile: the assembler will come back to it
        paths = [h["path"] for h in self.store.instance_headers(series_uid)]
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
            uid, generation = series["series_uid"], series["generation"]
            result = self.celery.AsyncResult(series["task_id"])
            state = result.state
            if state == "PENDING" and series["queued_at"] < worker_died_at:
                self.requeue(uid, "a worker process died; it may have taken this task")
                continue
            if state == "STARTED":
                info = result.info if isinstance(result.info, dict) else {}
                if info.get("pid") in dead_worker_pids:
                    self.requeue(uid, f"worker process {info.get('pid')} died while analysing it")
                    continue
                if series["state"] == "queued":
                    self.store.mark_analysing(uid, generation, now)
            elif state == "SUCCESS":
                self._finish(series, result.result)
                continue
            elif state in ("FAILURE", "REVOKED"):
                reason = f"analysis failed: {type(result.result).__name__}: {result.result}"
                log.error("series %s %s", uid, reason)
                if self.store.mark_result(uid, generation, "failed", None, reason):
                    SERIES.labels(state="failed").inc()
                continue
            since = series["started_at"] or series["queued_at"] or now
            if now - since > self.settings.task_timeout_seconds:
                self.requeue(uid, f"no result after {self.settings.task_timeout_seconds:.0f} s")

    def _finish(self, series: dict, result: dict) -> None:
        uid, generation = series["series_uid"], series["generation"]
        if "skipped" in result:
            if self.store.mark_result(uid, generation, "skipped", None, result["skipped"]):
                SERIES.labels(state="skipped").inc()
            log.info("series %s skipped by the worker: %s", uid, result["skipped"])
            return
        findings = dict(result["findings"], result_files=result["result_files"],
                        warnings=result.get("warnings", []), seconds=result.get("seconds"))
        if not self.store.mark_result(uid, generation, "done", findings, None):
            log.info("series %s: result of generation %d superseded, not delivered", uid, generation)
            return
        SERIES.labels(state="done").inc()
        ANALYSIS_SECONDS.observe(result.get("seconds") or 0)
        log.info("series %s done: %s %s", uid, findings["priority"]["level"], findings["probabilities"])
        self.on_result(series, generation, findings)
