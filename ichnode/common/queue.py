"""The queue between node and workers: the task and queue names and the Celery application both
sides build from the configuration (the node sends tasks, the workers run them).

Embedded broker (default, one machine): kombu's filesystem transport and Celery's file result
backend under data_dir, messages and results written atomically (ichnode.common.embedded_broker),
so `ichnode serve` needs no service. Redis (`broker_url=redis://…`): broker and result backend for
workers on other hosts.

Tasks are acknowledged late. With Redis, a task whose worker dies is delivered again after the
visibility timeout (`task_timeout_seconds`). The embedded broker removes a message when a worker
takes it, so there `serve`, which supervises its workers, re-queues what a dead worker may have
held. Either way the node re-queues a series with no result after `task_timeout_seconds`.
"""
from __future__ import annotations

from celery import Celery
from celery.backends.redis import RedisBackend

from ichnode.common import embedded_broker
from ichnode.common.config import Settings

#: The task that analyses one series: args (series UID, generation, instance paths relative to
#: the spool directory); returns an ichnode.common.analysis.AnalysisResult as JSON.
ANALYZE_TASK = "ichnode.analyze_series"
ANALYZE_QUEUE = "ichnode.analyze"
BROKER_CONNECT_SECONDS = 2  # a broker that does not answer by then counts as out


class PolledRedisBackend(RedisBackend):
    """Celery's Redis result backend without a subscription to the result of each task sent: the
    node polls task states instead, and subscriptions to a Redis that is out retry and log in a
    loop of their own (thousands of lines an outage)."""

    def on_task_call(self, producer, task_id):
        pass


def make_celery(settings: Settings) -> Celery:
    """The Celery application for `settings`; for the embedded broker, creates its folders."""
    app = Celery("ichnode")
    queue = settings.queue
    if queue.broker_url:
        broker, backend = queue.broker_url, f"{__name__}:PolledRedisBackend+{queue.broker_url}"
        transport_options = {"visibility_timeout": int(queue.task_timeout_seconds),
                             "socket_connect_timeout": BROKER_CONNECT_SECONDS}
    else:
        broker_dir = settings.storage.broker_dir
        queue_dir = broker_dir / "queue"
        processed_dir = broker_dir / "processed"
        control_dir = broker_dir / "control"
        results_dir = broker_dir / "results"
        for folder in (queue_dir, processed_dir, control_dir, results_dir):
            folder.mkdir(parents=True, exist_ok=True)
        broker, backend = embedded_broker.register(), embedded_broker.result_backend_url(results_dir)
        transport_options = {
            "data_folder_in": str(queue_dir.resolve()),
            "data_folder_out": str(queue_dir.resolve()),
            "processed_folder": str(processed_dir.resolve()),
            "control_folder": str(control_dir.resolve()),
            "store_processed": False,
        }
    app.conf.update(
        broker_url=broker,
        result_backend=backend,
        broker_transport_options=transport_options,
        result_backend_transport_options=transport_options if queue.broker_url else {},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=BROKER_CONNECT_SECONDS,
        redis_socket_connect_timeout=BROKER_CONNECT_SECONDS,
        task_publish_retry=False,  # the node's dispatcher retries with backoff, without holding up its loop
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_extended=True,
        result_expires=7 * 24 * 3600,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        task_routes={ANALYZE_TASK: {"queue": ANALYZE_QUEUE}},
        task_default_queue=ANALYZE_QUEUE,
    )
    return app
