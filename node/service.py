"""`NodeService`: the node's parts in one process, and the worker processes `serve` supervises.

Threads: the pynetdicom listener (one per connection), the assembly loop (series completion,
selection, task state), the delivery loop, and uvicorn for the HTTP API in the main thread.
At start the node opens its audit trail, records its configuration there and warns, one line
each, of every unsafe setting in force (`Settings.unsafe`).
"""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

import uvicorn
from pydicom import dcmread

from ichnode.common.config import Settings
from ichnode.common.queue import make_celery
from ichnode.common.vocabulary import CT_IMAGE_SOP_CLASSES
from node import audit
from node.api import create_app
from node.assembler import SeriesAssembler
from node.delivery import Deliverer, plan_deliveries
from node.dispatcher import Dispatcher
from node.headers import instance_header
from node.retention import purge_expired
from node.scp import start_listener
from node.spool import Spool
from node.store import Store

log = logging.getLogger("ichnode.node")

LOOP_SECONDS = 0.5
RETENTION_SECONDS = 3600.0  # how often expired series are purged
WORKER_RESTART_SECONDS = 5.0


def reindex_spool(spool: Spool, store: Store) -> int:
    """Record spooled files the store does not know (a crash between fsync and the record)."""
    known = store.spooled_paths()
    added = 0
    for path in spool.files():
        relative = spool.relative(path)
        if relative in known:
            continue
        try:
            header = instance_header(dcmread(path, stop_before_pixels=True))
        except Exception as exc:
            log.error("spooled file %s cannot be read, left in place: %s", path, exc)
            continue
        if header.sop_class_uid in CT_IMAGE_SOP_CLASSES:
            added += store.record_instance(header, relative, "(recovered)")
        else:  # a kept object of another SOP class
            added += store.record_other_object(header, relative, "(recovered)")
    if added:
        log.warning("recovered %d spooled instance(s) missing from the store", added)
    return added


class WorkerPool:
    """Worker processes (one task, one model per process), restarted on exit.

    `command` gives the command line of the worker with a name."""

    def __init__(self, count: int, command: Callable[[str], list[str]]):
        self.count = count
        self.command = command
        self.procs: list[subprocess.Popen | None] = [None] * count
        self.started: list[float] = [0.0] * count
        self.dead_pids: set[int] = set()
        self.last_death = 0.0  # when a worker was last seen dead

    def _spawn(self, index: int) -> None:
        self.procs[index] = subprocess.Popen(self.command(f"worker{index + 1}"))
        self.started[index] = time.time()
        log.info("worker %d started (pid %d)", index + 1, self.procs[index].pid)

    def start(self) -> None:
        for index in range(self.count):
            self._spawn(index)

    def check(self) -> bool:
        """Restart exited workers; True when all are running."""
        healthy = True
        for index, proc in enumerate(self.procs):
            if proc is None or proc.poll() is None:
                continue
            healthy = False
            if proc.pid not in self.dead_pids:
                self.dead_pids.add(proc.pid)
                self.last_death = time.time()
            if time.time() - self.started[index] >= WORKER_RESTART_SECONDS:
                log.error("worker %d (pid %d) exited with %s; restarting", index + 1, proc.pid, proc.returncode)
                self._spawn(index)
        return healthy

    def stop(self) -> None:
        for proc in self.procs:
            if proc and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


class NodeService:
    def __init__(self, settings: Settings, workers: WorkerPool | None = None):
        self.settings = settings
        self.store = Store(settings.storage.database_path)
        self.spool = Spool(settings.storage.spool_dir, settings.storage.min_free_bytes)
        self.celery = make_celery(settings)
        self.dispatcher = Dispatcher(
            self.store, settings, self.celery,
            on_result=lambda series, gen, findings: plan_deliveries(self.store, settings, series, gen, findings),
            disk_shortage=self.spool.free_space.shortage,
        )
        self.assembler = SeriesAssembler(self.store, settings, self.dispatcher.dispatch)
        self.deliverer = Deliverer(self.store, settings)
        self.workers = workers
        self.health: dict[str, object] = {"dicom_listener": "starting"}
        self.stopping = threading.Event()
        self.server = None
        self.threads: list[threading.Thread] = []

    def _loop(self, name: str, step, interval: float) -> None:
        while not self.stopping.is_set():
            try:
                step()
                self.health[name] = True
            except Exception as exc:  # keep running: the next pass retries, the reason is logged
                log.exception("%s loop: %s", name, exc)
                self.health[name] = f"error: {exc}"
            self.stopping.wait(interval)

    def _assembly_step(self) -> None:
        self.health["disk"] = self.spool.free_space.shortage() or True
        self.assembler.tick()
        if self.workers:
            self.health["workers"] = self.workers.check() or "a worker exited; restarting"
            self.dispatcher.poll(dead_worker_pids=self.workers.dead_pids, worker_died_at=self.workers.last_death)
        else:
            self.dispatcher.poll()
        self.health["broker"] = self.dispatcher.waiting_for_broker()

    def start(self) -> None:
        self.settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
        audit.open_audit_trail(self.settings)
        unsafe = self.settings.unsafe()
        for setting in unsafe:
            log.warning("unsafe setting: %s", setting)
        audit.application_started(self.settings, unsafe)
        reindex_spool(self.spool, self.store)
        self.server = start_listener(self.settings.listener, self.spool, self.store,
                                     self.assembler.association_released)
        self.health["dicom_listener"] = True
        if self.workers:
            self.workers.start()
        loops = (("assembly", self._assembly_step, LOOP_SECONDS),
                 ("delivery", self.deliverer.run_once, LOOP_SECONDS),
                 ("retention", lambda: purge_expired(self.store, self.spool, self.settings.storage), RETENTION_SECONDS))
        for name, step, interval in loops:
            thread = threading.Thread(target=self._loop, args=(name, step, interval), name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        if self.server:
            self.server.shutdown()
        for thread in self.threads:
            thread.join(timeout=10)
        if self.workers:
            self.workers.stop()
        self.store.close()
        audit.record("Application Activity", "E", action_type="stop")
        audit.close_audit_trail()

    def run(self) -> None:
        """Start everything and serve HTTP in this thread until SIGINT/SIGTERM."""
        # uvicorn re-raises SIGTERM after its own shutdown; exit through `finally` so workers stop too
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        self.start()
        app = create_app(self.store, self.settings, self.health, self.spool)
        # log_config=None: uvicorn's own logging.config.dictConfig would close every handler in place,
        # the audit trail's file among them, and give its lines another format than the node's
        config = uvicorn.Config(app, host=self.settings.http.bind, port=self.settings.http.port,
                                log_level=self.settings.log_level.lower(), access_log=False, log_config=None)
        try:
            uvicorn.Server(config).run()
        finally:
            log.info("shutting down")
            self.stop()
