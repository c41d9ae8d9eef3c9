"""The listener under hostile or broken peers: idle and trickling sockets, garbled PDUs, the
association limit (issue 11, item 2). Real peers: DCMTK echoscu/storescu, plain sockets."""
from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from ichnode.common.config import load_settings
from ichnode.common.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.scp import start_listener
from node.spool import Spool
from node.store import Store
from tests.helpers import ANALYSIS_BUDGET, dcmtk, done, free_port, series_uid_of, wait_for

ACSE_SECONDS = 3


@pytest.fixture
def listener(tmp_path):
    settings = load_settings(environ={
        "ICHNODE_DATA_DIR": str(tmp_path / "data"), "ICHNODE_PORT": str(free_port()), "ICHNODE_BIND": "127.0.0.1",
        "ICHNODE_ACSE_TIMEOUT_SECONDS": str(ACSE_SECONDS), "ICHNODE_MAX_ASSOCIATIONS": "2"})
    store = Store(settings.storage.database_path)
    running = start_listener(settings.listener, Spool(settings.storage.spool_dir), store)
    yield settings.listener
    running.shutdown()
    store.close()


def echo(port: int) -> subprocess.CompletedProcess:
    """DCMTK echoscu that gives up after 2 s to connect, to negotiate and for the C-ECHO response."""
    return subprocess.run([dcmtk("echoscu"), "-aec", "ICHNODE", "-to", "2", "-ta", "2", "-td", "2",
                           "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30)


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True when the node closes the connection within `within` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):  # an A-ABORT may come first
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_idle_and_trickling_sockets_neither_block_an_echo_nor_keep_their_slot(listener):
    port = listener.port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    trickling = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    stop = threading.Event()

    def trickle():  # an A-ASSOCIATE-RQ header announcing 1000 bytes, then one byte a second
        for sock in trickling:
            sock.sendall(struct.pack(">BBL", 0x01, 0x00, 1000))
        while not stop.wait(1.0):
            for sock in trickling:
                try:
                    sock.send(b"\x00")
                except OSError:
                    pass

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        answered = echo(port)
        assert answered.returncode == 0, answered.stdout + answered.stderr
        # every one of the 100 loses its connection at the ACSE timeout, trickling or not
        assert all(closed_by_peer(sock, ACSE_SECONDS + 5) for sock in idle + trickling)
    finally:
        stop.set()
        thread.join(5)
        for sock in idle + trickling:
            sock.close()
    assert echo(port).returncode == 0


def test_max_associations_counts_negotiated_associations(listener):
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", listener.port, ae_title="ICHNODE") for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        third = ae.associate("127.0.0.1", listener.port, ae_title="ICHNODE")
        assert third.is_rejected  # A-ASSOCIATE-RJ transient, local limit exceeded
        assert (third.acceptor.primitive.result, third.acceptor.primitive.diagnostic) == (0x02, 0x02)
    finally:
        for assoc in held:
            assoc.release()
    assert echo(listener.port).returncode == 0


def test_an_undecodable_pdu_is_answered_with_an_a_abort(listener):
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
        sock.sendall(b"\xdd" * 40)  # no such PDU type
        assert sock.recv(10)[:1] == b"\x07"  # A-ABORT


GARBLE = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x01\x00\x00\x00\x00\x10" + b"\xff" * 16, b"\xdd" * 40,
          b"\x01\x00\x00\x00\x00\x44\x00\x01\x00\x00" + b"\xff" * 32 + b"\x00" * 36, b"\x07\x00\x00\x00\x00\x02\x00",
          b"\x01\x00\xff\xff\xff\xff\x00\x01", b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x02\x01\x00", b"\x16\x03\x01"]


def garble(port: int, count: int) -> None:
    """`count` connections, each sending one garbled PDU and closing, 8 at a time. The connect
    timeout is long: on a loaded machine the listen queue fills and a dropped SYN is retried after
    1, 2, 4, 8 s while the node keeps accepting."""
    def one(index: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(GARBLE[index % len(GARBLE)])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


def test_garbled_connections_then_a_study_is_analysed_and_audited(node_factory, storescp, positive_series):
    node = node_factory("serve", ICHNODE_WORKERS="1", ICHNODE_DESTINATIONS=storescp.destination).start()
    garble(node.port, 5000)
    sent = node.storescu(positive_series)
    assert sent.returncode == 0, sent.stderr
    series_uid = series_uid_of(positive_series)
    wait_for(lambda: done(node, series_uid), ANALYSIS_BUDGET, what="analysis")

    # the audit trail: the sender's association, the 40 instances it stored, each result delivered
    def trail() -> list[dict]:
        return [json.loads(line) for line in (node.data_dir / "audit.log").read_text().splitlines()]

    def delivered() -> list[dict]:
        return [e for e in trail() if e["event"] == "DICOM Instances Transferred" and e["action"] == "R"]

    sent_results = wait_for(lambda: len(delivered()) >= 4 and delivered(), 60, what="deliveries in the audit trail")
    assert {e["destination"] for e in sent_results} == {storescp.destination}
    assert all(e["series_instance_uid"] == series_uid for e in sent_results)
    events = trail()
    assert events[0]["event"] == "Application Activity" and events[0]["configuration"]["listener"]["port"] == node.port
    assert any("api_token is empty" in line for line in events[0]["unsafe_settings"])
    assert any(e["event"] == "Association" and e["peer_ae"] == "STORESCU" for e in events)
    stored = [e for e in events if e["event"] == "DICOM Instances Transferred" and e["action"] == "C"]
    assert [(e["series_instance_uid"], e["instances"], e["peer_ae"]) for e in stored] == [(series_uid, 40, "STORESCU")]
    # the results carry the node's own implementation identity in their file meta information
    result = dcmread(next((node.data_dir / "results").rglob("*.dcm")), stop_before_pixels=True)
    assert result.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert result.file_meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    logs = node.logs()
    assert "WARNING ichnode.node: unsafe setting: http.api_token is empty" in logs  # the start-up warning
    assert "Traceback" not in logs and "Exception in thread" not in logs
    garbled = [line for line in logs.splitlines() if "invalid or incomplete PDU" in line]
    assert garbled and len(garbled) < 200  # one line per connection, at most one a second
    assert all("association aborted" in line for line in garbled)
