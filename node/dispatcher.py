"""`Dispatcher`: the node's side of the queue.

`dispatch` queues a complete, chosen series; `poll` follows the queued tasks through the result
backend (queued -> analysing -> done | failed | skipped), hands finished results to delivery, and
re-queues a series whose task was lost: its worker process died (seen by `serve`), or it did not
finish within `task_timeout_seconds`.

When the broker cannot take a task (Redis down, the embedded queue's disk full) the series stays
queued without `sent_at` and is sent again with backoff (`BrokerOutage`: seconds, one log line
when the outage starts and one when it ends); /healthz names the waiting series. When it is back,
tasks sent before the outage that no worker started are sent again (a Redis restarted without
persistence lost them). A series whose
analysis failed for a cause that passes (disk full, worker lost, an unreadable result) is
dispatched again with backoff, up to `RETRY_LIMIT` times and never while the disk is below its
watermark; any failed series can be retried by hand (`retry` in the store, POST
/api/series/{uid}/retry). A result that cannot be read fails that one series, never the loop.
"""
from __future__ import annotations

import errno
import logging
import time
from typing import Callable

from celery import Celery
from kombu.exceptions import DecodeError, KombuError
from pydantic import ValidationError
from redis.exceptions import RedisError

from ichnode.common.analysis import AnalysisResult, SeriesFindings, Skipped
from ichnode.common.config import Settings
from ichnode.common.queue import ANALYZE_TASK
from node.latency import observe, stage_seconds
from node.metrics import ANALYSIS_SECONDS, SERIES, SERIES_WAITING_FOR_BROKER
from node.store import SeriesRow, Store

log = logging.getLogger("ichnode.dispatcher")

#: The broker or result backend cannot be reached or cannot take a task (kombu wraps most transport
#: errors; the embedded queue's raise ChannelError, e.g. on a full disk).
BROKER_ERRORS = (KombuError, RedisError, OSError)
#: A task result that cannot be read: cut short or garbled.
UNREADABLE_RESULT = (ValueError, KeyError, TypeError, DecodeError)
BROKER_BACKOFF_SECONDS = (1.0, 30.0)  # first and longest wait between tries while the broker is out
RETRY_BACKOFF_SECONDS = (10.0, 300.0)  # the same for re-analysing a series that failed for a passing cause
RETRY_LIMIT = 5  # automatic re-analyses of a series before it stays failed
PASSING_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def backoff(attempt: int, bounds: tuple[float, float]) -> float:
    """Exponential: bounds[0] for the first attempt (0), doubling up to bounds[1]."""
    return min(bounds[1], bounds[0] * 2 ** attempt)


def passes(error: object) -> bool:
    """Whether a task's failure may pass by itself: a full disk, or a worker lost mid-task."""
    return (isinstance(error, OSError) and error.errno in PASSING_ERRNOS) or type(error).__name__ == "WorkerLostError"


class BrokerOutage:
    """Whether the broker takes tasks, as the dispatcher last saw it; logs each outage once."""

    def __init__(self):
        self.since: float | None = None  # when the current outage began
        self.error = ""
        self.tries = 0
        self.next_try = 0.0

    def failed(self, exc: Exception, now: float) -> None:
        if self.since is None:
            self.since = now
            log.error("broker unreachable (%s: %s): series wait in the store and are sent again when it is back",
                      type(exc).__name__, exc)
        self.error = f"{type(exc).__name__}: {exc}"
        self.next_try = now + backoff(self.tries, BROKER_BACKOFF_SECONDS)
        self.tries += 1

    def reached(self, now: float) -> float | None:
        """The broker answered; returns when the outage that this ends began, if one did."""
        since = self.since
        if since is not None:
            log.warning("broker reachable again after %.0f s", now - since)
        self.since, self.error, self.tries, self.next_try = None, "", 0, 0.0
        return since

    def may_try(self, now: float) -> bool:
        return now >= self.next_try


class Dispatcher:
    def __init__(self, store: Store, settings: Settings, celery: Celery,
                 on_result: Callable[[SeriesRow, int, SeriesFindings], None],
                 disk_shortage: Callable[[], str | None] = lambda: None):
        self.store = store
        self.task_timeout_seconds = settings.queue.task_timeout_seconds
        self.celery = celery
        self.on_result = on_result  # (series, generation, findings) -> deliver
        self.disk_shortage = disk_shortage  # why the disk is below its watermark, or None
        self.broker = BrokerOutage()

    def dispatch(self, series_uid: str, last_received_at: float | None = None) -> None:
        generation = self.store.series(series_uid).generation + 1
        task_id = f"analyze-{series_uid}-g{generation}"
        if self.store.mark_queued(series_uid, task_id, last_received_at) is None:
            return  # an instance arrived meanwhile: the assembler will come back to it
        series = self.store.series(series_uid)
        if self.broker.since is None:
            self._send(series, time.time())
        else:  # the broker is out: the next successful try sends it with the others
            self.store.mark_waiting_for_broker(series_uid, generation, f"waiting for the broker: {self.broker.error}")

    def _send(self, series: SeriesRow, now: float) -> bool:
        """Hand the series' task to the broker; False when it cannot take it (the series waits)."""
        uid, generation = series.series_uid, series.generation
        try:
            count = self._publish(series)
        except BROKER_ERRORS as exc:
            self.broker.failed(exc, now)
            self.store.mark_waiting_for_broker(uid, generation, f"waiting for the broker: {self.broker.error}")
            return False
        self.store.mark_sent(uid, generation)
        SERIES.labels(state="queued").inc()
        log.info("series %s queued (generation %d, %d instances)", uid, generation, count)
        self._broker_reached(now)
        return True

    def _publish(self, series: SeriesRow) -> int:
        """Send the series' task (its id names the dispatch, so sending it again is harmless)."""
        paths = [instance.path for instance in self.store.instances(series.series_uid)]
        self.celery.send_task(ANALYZE_TASK, args=[series.series_uid, series.generation, paths],
                              task_id=series.task_id)
        return len(paths)

    def _broker_reached(self, now: float) -> None:
        """After an outage, send again the tasks sent before it that no worker has started: a broker
        that restarted without persistence (Redis) lost them, and they would wait for the time-out."""
        since = self.broker.reached(now)
        if since is None:
            return
        resent = 0
        try:
            for series in self.store.series_in_state("queued"):
                if series.sent_at and series.sent_at < since and self.celery.AsyncResult(series.task_id).state == \
                        "PENDING":
                    self._publish(series)
                    resent += 1
        except BROKER_ERRORS as exc:  # out again: the next return sends them
            self.broker.failed(exc, now)
        if resent:
            log.warning("sent %d task(s) again that were queued before the outage and not started", resent)

    def requeue(self, series_uid: str, why: str) -> None:
        log.warning("series %s re-queued: %s", series_uid, why)
        self.dispatch(series_uid)

    def waiting_for_broker(self) -> str | bool:
        """For /healthz: True, or the series waiting for the broker and why."""
        waiting = self.store.series_waiting_for_broker()
        SERIES_WAITING_FOR_BROKER.set(len(waiting))
        if not waiting:
            return True
        since = f" since {time.strftime('%H:%M:%S', time.localtime(self.broker.since))}" if self.broker.since else ""
        return f"{len(waiting)} series waiting for the broker{since}: {self.broker.error or 'not sent yet'}"

    def poll(self, now: float | None = None, dead_worker_pids: set[int] = frozenset(),
             worker_died_at: float = 0.0) -> None:
        """Send what waits for the broker, re-dispatch failed series that are due, and follow every
        queued task. `dead_worker_pids` and `worker_died_at` come from `serve`: a task started by a
        dead worker, or waiting since before a worker died (it may have been taken from the
        embedded queue), is queued again."""
        now = time.time() if now is None else now
        if not self.broker.may_try(now):
            return
        for series in self.store.series_waiting_for_broker():
            if not self._send(series, now):
                return  # still out: try again after the backoff
        if not self.disk_shortage():
            for series in self.store.series_due_for_retry(now):
                self.requeue(series.series_uid, f"retry {series.attempts} after: {series.reason}")
        try:
            followed = False
            for series in self.store.series_in_state("queued", "analysing"):
                if series.state == "queued" and series.sent_at is None:
                    continue  # waits for the broker (dispatched during this pass while it was out)
                self._follow(series, now, dead_worker_pids, worker_died_at)
                followed = True
            if followed:
                self._broker_reached(now)
        except BROKER_ERRORS as exc:  # the result backend is out: the broker is too, or soon will be
            self.broker.failed(exc, now)

    def _follow(self, series: SeriesRow, now: float, dead_worker_pids: set[int], worker_died_at: float) -> None:
        uid, generation = series.series_uid, series.generation
        result = self.celery.AsyncResult(series.task_id)
        try:
            state = result.state
        except UNREADABLE_RESULT as exc:  # e.g. a result file cut short by a full disk
            self._fail(series, f"its task result cannot be read: {type(exc).__name__}: {exc}", now, passing=True)
            return
        if state == "PENDING" and series.queued_at < worker_died_at:
            self.requeue(uid, "a worker process died; it may have taken this task")
            return
        if state == "STARTED":
            info = result.info if isinstance(result.info, dict) else {}
            if info.get("pid") in dead_worker_pids:
                self.requeue(uid, f"worker process {info.get('pid')} died while analysing it")
                return
            if series.state == "queued":
                self.store.mark_analysing(uid, generation, now)
        elif state == "SUCCESS":
            try:
                self._finish(series, AnalysisResult.model_validate(result.result))
            except ValidationError as exc:  # a worker of another version: its result cannot be read
                self._fail(series, f"result does not match the contract: {exc.errors()[0]['msg']}", now)
            return
        elif state in ("FAILURE", "REVOKED"):
            self._fail(series, f"{type(result.result).__name__}: {result.result}", now, passes(result.result))
            return
        since = series.started_at or series.queued_at or now
        if now - since > self.task_timeout_seconds:
            self.requeue(uid, f"no result after {self.task_timeout_seconds:.0f} s")

    def _fail(self, series: SeriesRow, why: str, now: float, passing: bool = False) -> None:
        """A failed analysis; one whose cause may pass is retried with backoff, up to RETRY_LIMIT times."""
        uid, attempt = series.series_uid, series.attempts
        retry_at = now + backoff(attempt, RETRY_BACKOFF_SECONDS) if passing and attempt < RETRY_LIMIT else None
        reason = f"analysis failed: {why}"
        if retry_at:
            log.error("series %s %s; retry %d of %d in %.0f s", uid, reason, attempt + 1, RETRY_LIMIT, retry_at - now)
        else:
            log.error("series %s %s; not retried by itself (POST /api/series/<uid>/retry does)", uid, reason)
        if self.store.mark_result(uid, series.generation, "failed", None, reason, retry_at):
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
