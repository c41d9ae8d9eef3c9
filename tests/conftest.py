"""Shared fixtures: real peers (DCMTK, Redis), phantom series, and a running node process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("ICHNODE_TEST_REDIS", "redis://127.0.0.1:6379/15")


def dcmtk(tool: str) -> str:
    """DCMTK's own binary (pynetdicom installs Python tools of the same names on PATH)."""
    path = Path("/usr/bin") / tool
    if not path.exists():
        pytest.fail(f"DCMTK {tool} missing: run deploy/test.sh (it installs dcmtk)")
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def analyze(folder: Path, out: Path) -> subprocess.CompletedProcess:
    """`ichnode analyze folder --out out` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "node.cli", "analyze", str(folder), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dicom3tools' dciodvfy reports for one file (warnings are not errors)."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def write_phantom(folder: Path, seed: int, **kwargs) -> Path:
    """A phantom study's DICOM files in folder/<seed>/; returns that folder."""
    from training.phantom import make_study

    study = make_study(seed, **kwargs)
    out = folder / f"phantom-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    for ds in study.datasets:
        ds.save_as(out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return out


@pytest.fixture(scope="session")
def positive_series(tmp_path_factory) -> Path:
    """A 40-slice positive phantom series (256 x 256) on disk."""
    return write_phantom(tmp_path_factory.mktemp("series"), 101, positive=True, matrix=256, n_slices=40)


@pytest.fixture(scope="session")
def negative_series(tmp_path_factory) -> Path:
    return write_phantom(tmp_path_factory.mktemp("series"), 202, positive=False, matrix=256, n_slices=40)


class StoreSCP:
    """DCMTK storescp as a result destination (a stand-in PACS)."""

    def __init__(self, folder: Path, port: int | None = None, ae_title: str = "PACS"):
        self.folder = folder
        self.port = port or free_port()
        self.ae_title = ae_title
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def start(self) -> "StoreSCP":
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.folder), "+B", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _listening(self.port), 10, what=f"storescp on {self.port}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def received_headers(self) -> list:
        """Headers of the files storescp has finished writing (a file still arriving is skipped)."""
        from pydicom import dcmread

        headers = []
        for path in self.received():
            try:
                headers.append(dcmread(path, stop_before_pixels=True))
            except Exception:
                continue
        return headers


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def storescp(tmp_path):
    scp = StoreSCP(tmp_path / "pacs").start()
    yield scp
    scp.stop()


@pytest.fixture
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"no Redis at {REDIS_URL}: run deploy/test.sh (it starts one)")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


class NodeProcess:
    """`ichnode <command>` as a real process with its own data dir and ports."""

    def __init__(self, tmp: Path, command: str = "serve", **env: str):
        self.port = free_port()
        self.http_port = free_port()
        self.data_dir = tmp / "node-data"
        self.log = tmp / f"ichnode-{command}-{self.port}.log"
        self.command = command
        self.env = dict(os.environ,
                        ICHNODE_PORT=str(self.port), ICHNODE_HTTP_PORT=str(self.http_port),
                        ICHNODE_DATA_DIR=str(self.data_dir), ICHNODE_AE_TITLE="ICHNODE",
                        ICHNODE_BIND="127.0.0.1", ICHNODE_HTTP_BIND="127.0.0.1", ICHNODE_QUIET_SECONDS="3")
        self.env.pop("ICHNODE_CONFIG", None)
        self.env.update(env)
        self.procs: list[subprocess.Popen] = []

    def start(self, wait: bool = True) -> "NodeProcess":
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "node.cli", self.command], cwd=ROOT, env=self.env,
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True))
        if wait:
            wait_for(lambda: self.healthy() or self._exited(), 60, what="the node's /healthz")
            assert not self._exited(), f"ichnode {self.command} exited:\n{self.log.read_text()[-3000:]}"
        return self

    def start_worker(self) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", "worker"], cwd=ROOT, env=self.env,
                                stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _exited(self) -> bool:
        return self.procs[0].poll() is not None

    def healthy(self) -> bool:
        try:
            return self.get("/healthz")["status"] == "ok"
        except Exception:
            return False

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as response:
            return json.loads(response.read())

    def series(self, series_uid: str) -> dict:
        return self.get(f"/api/series/{series_uid}")

    def storescu(self, folder: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [dcmtk("storescu"), "-aec", "ICHNODE", "+sd", "+r", *extra, "127.0.0.1", str(self.port), str(folder)],
            capture_output=True, text=True, timeout=120)

    def pynetdicom_storescu(self, folder: Path) -> subprocess.CompletedProcess:
        """The README's pynetdicom command line."""
        return subprocess.run(
            [sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(self.port), str(folder),
             "-aec", "ICHNODE", "-r"], capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture
def node_factory(tmp_path):
    nodes: list[NodeProcess] = []

    def make(command: str = "serve", **env) -> NodeProcess:
        node = NodeProcess(tmp_path, command, **env)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


def series_uid_of(folder: Path) -> str:
    from pydicom import dcmread

    first = next(p for p in sorted(folder.iterdir()) if p.suffix == ".dcm")
    return str(dcmread(first, stop_before_pixels=True).SeriesInstanceUID)


def study_uid_of(folder: Path) -> str:
    from pydicom import dcmread

    first = next(p for p in sorted(folder.iterdir()) if p.suffix == ".dcm")
    return str(dcmread(first, stop_before_pixels=True).StudyInstanceUID)


