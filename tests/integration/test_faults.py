"""The node against faults of its surroundings (docs/RELIABILITY.md): a full disk (a real 40 MB
tmpfs, filled and freed) and a broker outage (a private redis-server stopped and started again).
Mounting needs root, as deploy/test.sh runs."""
from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path
from urllib.error import HTTPError

import pytest
import redis

from ichnode.common.config import load_settings
from ichnode.common.queue import ANALYZE_QUEUE, make_celery
from node.spool import CHECK_SECONDS
from tests.helpers import ANALYSIS_BUDGET, done, free_port, listening, series_uid_of, wait_for

MB = 1024 * 1024


@pytest.fixture
def small_fs(tmp_path):
    """A 40 MB tmpfs, unmounted after the test."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk tests (needs root, as deploy/test.sh runs): "
                    f"{mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(folder: Path, leave_bytes: int) -> Path:
    """A file that leaves `leave_bytes` free on folder's file system."""
    stat = os.statvfs(folder)
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave_bytes))
    return filler


def health(node) -> tuple[int, dict]:
    try:
        return 200, node.get("/healthz")
    except HTTPError as error:
        import json

        return error.code, json.loads(error.read())["detail"]


def metric(node, name: str) -> float | None:
    for line in node.get_text("/metrics").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_results_are_whole_or_absent_on_a_full_disk(small_fs):
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(small_fs)})
    backend = make_celery(settings).backend
    backend.mark_as_started("task-1", pid=4711)
    fill(small_fs, 0)
    with pytest.raises(OSError) as raised:  # the worker's result does not fit
        backend.store_result("task-1", {"generation": 1, "findings": "x" * 65536}, "SUCCESS")
    assert raised.value.errno == errno.ENOSPC
    results = settings.storage.broker_dir / "results"
    meta = backend.get_task_meta("task-1")  # the earlier state, whole: readable, not poison
    assert meta["status"] == "STARTED" and meta["result"]["pid"] == 4711
    assert not [p for p in os.listdir(results) if p.endswith(".partial")]  # nothing half written left


def test_full_disk_refuses_with_a700_says_why_and_resumes_by_itself(node_factory, small_fs, negative_series):
    node = node_factory("serve", ICHNODE_DATA_DIR=str(small_fs / "data"), ICHNODE_MIN_FREE_MB="8",
                        ICHNODE_WORKERS="1").start()
    filler = fill(small_fs, 4 * MB)  # below the watermark
    time.sleep(2 * CHECK_SECONDS)  # the listener reads free space at most every CHECK_SECONDS

    refused = node.storescu(negative_series, "-nh", "-v")  # -nh: try every instance; -v: each answer
    answers = refused.stdout + refused.stderr
    assert answers.count("OutOfResources") == 40, answers[-2000:]
    assert node.get("/api/studies") == []  # nothing was taken
    status, body = wait_for(lambda: (lambda h: h if h[0] == 503 else None)(health(node)), 10,
                            what="/healthz to report the disk")
    assert body["checks"]["disk"].startswith("disk full:") and "storage.min_free_mb 8" in body["checks"]["disk"]
    assert metric(node, "ichnode_disk_below_min_free") == 1.0
    assert 'ichnode_instances_received_total{outcome="refused 0xA700"} 40.0' in node.get_text("/metrics")

    filler.unlink()  # space back: no restart
    wait_for(lambda: health(node)[0] == 200, 10, what="/healthz ok again")
    assert metric(node, "ichnode_disk_below_min_free") == 0.0
    sent = node.storescu(negative_series)
    assert sent.returncode == 0, sent.stderr
    series = wait_for(lambda: done(node, series_uid_of(negative_series)), ANALYSIS_BUDGET, what="analysis")
    assert series["instances"] == 40
    assert node.logs().count("instances are refused (0xA700)") == 1  # one line per shortage, not per instance


class PrivateRedis:
    """redis-server on a free port of its own, without persistence, that a test may stop and start."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "PrivateRedis":
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: listening(self.port), 10, what="redis-server")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def queued_tasks(self) -> int:
        return redis.Redis(port=self.port).llen(ANALYZE_QUEUE)


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path / "redis").start()
    yield server
    server.stop()


def test_broker_outage_series_wait_visibly_and_go_within_seconds_of_its_return(node_factory, private_redis,
                                                                                negative_series, capsys):
    node = node_factory("node", ICHNODE_BROKER_URL=private_redis.url).start()  # no worker: the queue is the point
    private_redis.stop()

    started = time.monotonic()
    sent = node.storescu(negative_series)
    store_seconds = time.monotonic() - started
    assert sent.returncode == 0, sent.stderr  # C-STORE does not depend on the broker
    series_uid = series_uid_of(negative_series)
    assert node.series(series_uid)["instances"] == 40
    waiting = wait_for(lambda: (lambda s: s if (s["reason"] or "").startswith("waiting for the broker") else None)(
        node.series(series_uid)), 30, what="the series to wait for the broker")
    assert waiting["state"] == "queued"
    status, body = wait_for(lambda: (lambda h: h if h[0] == 503 else None)(health(node)), 10,
                            what="/healthz to report the broker")
    assert body["checks"]["broker"].startswith("1 series waiting for the broker")
    assert metric(node, "ichnode_series_waiting_for_broker") == 1.0
    time.sleep(20)  # the outage goes on: the node keeps trying, quietly

    private_redis.start()  # same port, empty (no persistence)
    back = time.monotonic()
    wait_for(lambda: private_redis.queued_tasks() == 1, 45, what="the task in Redis after its return")
    dispatched_after = time.monotonic() - back
    assert node.series(series_uid)["reason"] is None
    wait_for(lambda: health(node)[0] == 200, 10, what="/healthz ok again")
    outage_lines = [line for line in node.logs().splitlines() if "broker" in line.lower() or "redis" in line.lower()]
    assert len(outage_lines) <= 4, "\n".join(outage_lines)  # one when it went, one when it came back
    with capsys.disabled():
        print(f"\n[broker outage] storescu of 40 instances during the outage: {store_seconds:.1f} s; "
              f"dispatched {dispatched_after:.1f} s after Redis returned; {len(outage_lines)} log lines about it")
