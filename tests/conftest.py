"""Shared fixtures: phantom series on disk, real peers (DCMTK, Redis, MLLP, HTTP, Orthanc) and running node
processes. Tests under tests/integration talk to real peers and are marked `integration`."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import (
    REDIS_URL,
    MllpListener,
    NodeProcess,
    Orthanc,
    Receiver,
    StoreSCP,
    private_network,
    write_phantom,
)

INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items):
    for item in items:
        if INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def positive_series(tmp_path_factory) -> Path:
    """A 40-slice positive phantom series (256 x 256) on disk."""
    return write_phantom(tmp_path_factory.mktemp("series"), 101, positive=True, matrix=256, n_slices=40)


@pytest.fixture(scope="session")
def negative_series(tmp_path_factory) -> Path:
    return write_phantom(tmp_path_factory.mktemp("series"), 202, positive=False, matrix=256, n_slices=40)


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


@pytest.fixture
def listen():
    """Start MLLP listeners with `listen(reply)`; they are closed after the test."""
    listeners = []

    def start(reply):
        listeners.append(MllpListener(reply))
        return listeners[-1]

    yield start
    for listener in listeners:
        listener.close()


@pytest.fixture
def receive():
    """Start webhook receivers with `receive(status=..., body=..., headers=...)`; closed after the test."""
    receivers = []

    def start(**kwargs):
        receivers.append(Receiver(**kwargs))
        return receivers[-1]

    yield start
    for receiver in receivers:
        receiver.close()


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


@pytest.fixture
def orthanc(tmp_path):
    with private_network():
        server = Orthanc(tmp_path / "orthanc")
        yield server
        server.stop()
