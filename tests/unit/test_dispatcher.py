"""The dispatcher against faults: an unreadable task result, a broker that cannot take tasks, a
failure that passes (disk full), and a retry by hand. Real Store, real Celery application with
the embedded queue and its file result backend; no worker."""
from __future__ import annotations

import errno
import logging
import time

import pytest
from fastapi.testclient import TestClient
from kombu.exceptions import OperationalError

from ichnode.common.config import load_settings
from ichnode.common.queue import make_celery
from node.api import create_app
from node.dispatcher import RETRY_LIMIT, Dispatcher
from node.store import Store
from tests.helpers import STUDY_UID, header


@pytest.fixture
def node(tmp_path):
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path)})
    store = Store(settings.storage.database_path)
    celery = make_celery(settings)
    yield settings, store, celery
    store.close()


def receive(store, series: str, count: int = 3) -> None:
    for i in range(count):
        store.record_instance(header(series, i), f"{STUDY_UID}/{series}/{i}.dcm", "SCANNER")


def result_file(celery, task_id: str):
    backend = celery.backend
    return backend._filename(backend.get_key_for_task(task_id)).decode()


def test_a_truncated_result_fails_that_series_only_and_it_is_retried(node, caplog):
    settings, store, celery = node
    receive(store, "1.1")
    receive(store, "1.2")
    dispatcher = Dispatcher(store, settings, celery, on_result=lambda *a: None)
    dispatcher.dispatch("1.1")
    dispatcher.dispatch("1.2")
    poisoned, healthy = store.series("1.1"), store.series("1.2")
    # what a full disk left of the worker's result before results were written atomically
    with open(result_file(celery, poisoned.task_id), "wb") as handle:
        handle.write(b'{"status": "SUCCESS", "result": {"series_uid": "1.1", "gener')
    celery.backend.mark_as_started(healthy.task_id, pid=1)

    now = time.time()
    dispatcher.poll(now)  # must not raise: one bad result is that series' problem
    failed = store.series("1.1")
    assert failed.state == "failed" and "cannot be read" in failed.reason and failed.retry_at > now
    assert store.series("1.2").state == "analysing"

    dispatcher.poll(failed.retry_at + 1)  # due: dispatched again, as a new generation with a new task
    again = store.series("1.1")
    assert again.state == "queued" and again.generation == poisoned.generation + 1 and again.sent_at
    assert again.attempts == 1


class BrokerDown:
    """A Celery stand-in whose broker refuses tasks until `up` is set."""

    def __init__(self, celery):
        self.celery = celery
        self.up = False
        self.sent: list[str] = []

    def send_task(self, name, args, task_id):
        if not self.up:
            raise OperationalError("Error 111 connecting to 127.0.0.1:6390. Connection refused.")
        self.sent.append(task_id)

    def AsyncResult(self, task_id):
        return self.celery.AsyncResult(task_id)


def test_broker_outage_series_wait_and_are_sent_within_seconds_of_its_return(node, caplog):
    settings, store, celery = node
    broker = BrokerDown(celery)
    dispatcher = Dispatcher(store, settings, broker, on_result=lambda *a: None)
    for uid in ("2.1", "2.2", "2.3"):
        receive(store, uid)
    caplog.set_level(logging.INFO, logger="ichnode.dispatcher")
    now = time.time()
    for uid in ("2.1", "2.2", "2.3"):
        dispatcher.dispatch(uid)
    for step in range(200):  # 100 s of the assembly loop's polls during the outage
        dispatcher.poll(now + step * 0.5)
    assert {s.series_uid for s in store.series_waiting_for_broker()} == {"2.1", "2.2", "2.3"}
    assert all(s.state == "queued" and s.reason.startswith("waiting for the broker") for s in
               store.series_in_state("queued"))
    health = dispatcher.waiting_for_broker()
    assert health.startswith("3 series waiting for the broker since") and "Connection refused" in health
    outage_lines = [r for r in caplog.records if "broker" in r.getMessage()]
    assert len(outage_lines) == 1  # one line per outage, not one per try or series

    broker.up = True
    back = now + 100
    dispatcher.poll(back + 30)  # the longest backoff: tried again within 30 s, not task_timeout_seconds
    assert sorted(broker.sent) == sorted(store.series(u).task_id for u in ("2.1", "2.2", "2.3"))
    assert store.series_waiting_for_broker() == [] and dispatcher.waiting_for_broker() is True
    assert all(s.sent_at and s.reason is None for s in store.series_in_state("queued"))
    assert [r.getMessage() for r in caplog.records if "broker" in r.getMessage()][-1].startswith(
        "broker reachable again")


def test_a_failure_that_passes_is_retried_with_backoff_not_while_the_disk_is_short(node):
    settings, store, celery = node
    receive(store, "3.1")
    shortage = ["disk full: 3 MB free, below storage.min_free_mb 10"]
    dispatcher = Dispatcher(store, settings, celery, on_result=lambda *a: None, disk_shortage=lambda: shortage[0])
    now = time.time()
    retries = []
    dispatcher.dispatch("3.1")
    for attempt in range(RETRY_LIMIT + 1):
        celery.backend.mark_as_failure(store.series("3.1").task_id, OSError(errno.ENOSPC, "No space left on device"))
        dispatcher.poll(now)
        failed = store.series("3.1")
        assert failed.state == "failed" and "No space left" in failed.reason and failed.attempts == attempt + 1
        retries.append(failed.retry_at and failed.retry_at - now)
        if failed.retry_at:
            dispatcher.poll(failed.retry_at + 1)
            assert store.series("3.1").state == "failed"  # the disk is still short: it waits
            shortage[0] = None
            dispatcher.poll(failed.retry_at + 1)
            assert store.series("3.1").state == "queued"
            shortage[0] = "disk full"
    assert retries[:RETRY_LIMIT] == sorted(retries[:RETRY_LIMIT]) and retries[0] >= 10  # backoff grows
    assert retries[RETRY_LIMIT] is None  # then it stays failed, for a person to retry


def test_a_failure_that_does_not_pass_is_not_retried_by_itself_but_by_hand(node):
    settings, store, celery = node
    receive(store, "4.1")
    dispatcher = Dispatcher(store, settings, celery, on_result=lambda *a: None)
    dispatcher.dispatch("4.1")
    celery.backend.mark_as_failure(store.series("4.1").task_id, RuntimeError("model weights corrupt"))
    dispatcher.poll()
    failed = store.series("4.1")
    assert failed.state == "failed" and failed.retry_at is None

    client = TestClient(create_app(store, settings))
    answer = client.post("/api/series/4.1/retry")
    assert answer.status_code == 202 and answer.json()["state"] == "failed"
    dispatcher.poll()
    assert store.series("4.1").state == "queued" and store.series("4.1").generation == failed.generation + 1
    assert client.post("/api/series/4.1/retry").status_code == 409  # queued: nothing to retry
    assert client.post("/api/series/9.9/retry").status_code == 404


def test_tasks_sent_before_an_outage_and_not_started_are_sent_again_after_it(node):
    settings, store, celery = node
    broker = BrokerDown(celery)
    broker.up = True
    dispatcher = Dispatcher(store, settings, broker, on_result=lambda *a: None)
    receive(store, "5.1")
    receive(store, "5.2")
    dispatcher.dispatch("5.1")  # sent; then Redis restarts empty
    broker.up = False
    time.sleep(0.01)
    dispatcher.dispatch("5.2")  # waits
    broker.up = True
    dispatcher.poll(time.time() + 60)
    task_1, task_2 = store.series("5.1").task_id, store.series("5.2").task_id
    assert sorted(broker.sent) == sorted([task_1, task_1, task_2])  # 5.1 once more: its message may be gone
    dispatcher.poll(time.time() + 120)
    assert len(broker.sent) == 3  # no outage, nothing sent again
