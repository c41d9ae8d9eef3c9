"""DICOMweb against real HTTP peers: STOW-RS delivery to a local stub archive, and both directions
with a real Orthanc and its DICOMweb plugin, run by the tests in a private network namespace."""
from __future__ import annotations

import errno
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import pytest
from dicomweb_client import DICOMwebClient
from pydicom import Dataset, dcmread
from pynetdicom.sop_class import CTImageStorage
from python_multipart.multipart import parse_options_header

from ichnode.common.config import load_settings
from node.delivery import Deliverer
from node.store import DeliveryRow, Store
from tests.helpers import (
    ANALYSIS_BUDGET,
    KOS_CLASS,
    ORTHANC_PASSWORD,
    ORTHANC_USER,
    SC_CLASSES,
    SEG_CLASS,
    SR_CLASSES,
    Orthanc,
    ct_instance,
    done,
    free_port,
    private_network,
    result_files,
    series_uid_of,
    study_uid_of,
    wait_for,
)

# --- STOW-RS delivery to a stub archive ------------------------------------------------------


class StowStub:
    """A DICOMweb server on 127.0.0.1 that answers each STOW-RS request as `answers` says for the SOP
    Instance UID it carries (status, content type, body); any other instance is stored (200)."""

    def __init__(self):
        self.answers: dict[str, tuple[int, str, bytes]] = {}
        self.warnings: dict[str, int] = {}  # SOP Instance UID -> Warning Reason of a stored instance
        self.requests: list[dict] = []  # {"authorization": ..., "sop_uids": [...]}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                _, params = parse_options_header(self.headers["Content-Type"])
                delimiter = b"--" + params[b"boundary"]
                parts = [p.split(b"\r\n\r\n", 1)[1][:-2] for p in body.split(delimiter)[1:-1]]
                uids = [str(dcmread(BytesIO(p), stop_before_pixels=True).SOPInstanceUID) for p in parts]
                stub.requests.append({"authorization": self.headers.get("Authorization"), "sop_uids": uids})
                status, content_type, answer = next((stub.answers[uid] for uid in uids if uid in stub.answers),
                                                    (200, "application/dicom+json; charset=utf-8", None))
                if answer is None:
                    answer = stored_response(uids, stub.warnings).to_json().encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"stow:http://127.0.0.1:{self.server.server_port}/dicom-web"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def stored_response(uids: list[str], warnings: dict[str, int]) -> Dataset:
    response = Dataset()
    response.ReferencedSOPSequence = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = uid
        if uid in warnings:
            item.WarningReason = warnings[uid]
        response.ReferencedSOPSequence.append(item)
    return response


def refused_response(uid: str, reason: int) -> bytes:
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = uid
    item.FailureReason = reason
    response = Dataset()
    response.FailedSOPSequence = [item]
    return response.to_json().encode()


@pytest.fixture
def stow_stub():
    stub = StowStub()
    yield stub
    stub.close()


def outbox(store: Store, series: str) -> dict[str, DeliveryRow]:
    """The series' outbox items by the SOP Instance UID in their file name."""
    return {Path(item.payload).stem.removeprefix("CT_"): item for item in store.deliveries(series)}


def test_a_refused_object_fails_alone_with_the_servers_reason_and_is_retried(tmp_path, stow_stub, caplog):
    secret = "bearer-secret-4711"
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path / "data"),
                                      "ICHNODE_DESTINATIONS": stow_stub.endpoint, "ICHNODE_STOW_TOKEN": secret})
    store = Store(settings.storage.database_path)
    series, paths = result_files(settings.storage, count=4)
    for path in paths:
        store.enqueue_delivery(series, 1, "dicom", str(settings.delivery.destinations[0]), path)
    conflict, bad, warned, fine = [Path(p).stem.removeprefix("CT_") for p in paths]
    stow_stub.answers = {conflict: (409, "application/dicom+json", refused_response(conflict, 0xA900)),
                         bad: (400, "text/plain", b"part 1: cannot parse the data set")}
    stow_stub.warnings = {warned: 0xB000}

    with caplog.at_level("DEBUG"):
        assert Deliverer(store, settings).run_once() == 2
    items = outbox(store, series)
    assert items[conflict].state == "pending"
    assert "HTTP 409" in items[conflict].last_error
    assert "Failure Reason 0xA900 (data set does not match SOP class)" in items[conflict].last_error
    assert items[bad].state == "pending" and "HTTP 400" in items[bad].last_error
    assert "cannot parse the data set" in items[bad].last_error
    assert items[warned].state == "sent"
    assert "Warning Reason 0xB000 (coercion of data elements)" in items[warned].last_error
    assert items[fine].state == "sent" and items[fine].last_error is None
    # one object per request, each with the bearer token, which no log line shows
    assert sorted(uid for r in stow_stub.requests for uid in r["sop_uids"]) == sorted([conflict, bad, warned, fine])
    assert all(len(r["sop_uids"]) == 1 and r["authorization"] == f"Bearer {secret}" for r in stow_stub.requests)
    assert secret not in caplog.text

    stow_stub.answers = {}  # the archive takes them now
    stow_stub.requests.clear()
    assert Deliverer(store, settings).run_once(now=time.time() + 3600) == 2
    assert all(item.state == "sent" for item in store.deliveries(series))
    assert sorted(uid for r in stow_stub.requests for uid in r["sop_uids"]) == sorted([conflict, bad])
    store.close()


def test_an_unreachable_archive_leaves_every_object_pending_with_the_reason(tmp_path):
    endpoint = f"stow:http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path / "data"), "ICHNODE_DESTINATIONS": endpoint})
    store = Store(settings.storage.database_path)
    series, paths = result_files(settings.storage, count=3)
    for path in paths:
        store.enqueue_delivery(series, 1, "dicom", endpoint, path)
    assert Deliverer(store, settings).run_once() == 0
    items = store.deliveries(series)
    assert all(i.state == "pending" and i.attempts == 1 and "ConnectionError" in i.last_error for i in items)
    store.close()


# --- against a real DICOMweb server: Orthanc with its DICOMweb plugin -------------------------


def test_orthanc_is_reachable_only_inside_its_private_network(tmp_path):
    outside: dict[str, int] = {}
    started, probed = threading.Event(), threading.Event()

    def probe() -> None:  # this thread starts before the switch, so it stays in the host namespace
        started.wait(60)
        with socket.socket() as sock:
            sock.settimeout(2)
            outside["connect"] = sock.connect_ex(("127.0.0.1", server.port))
        probed.set()

    threading.Thread(target=probe, daemon=True).start()
    with private_network():
        server = Orthanc(tmp_path / "orthanc")
        try:
            started.set()
            probed.wait(30)
            assert server.answers()  # from inside: it answers
        finally:
            server.stop()
    assert outside["connect"] == errno.ECONNREFUSED


def orthanc_environment(orthanc: Orthanc) -> dict[str, str]:
    return {"ICHNODE_DESTINATIONS": f"stow:{orthanc.url}", "ICHNODE_STOW_USERNAME": ORTHANC_USER,
            "ICHNODE_STOW_PASSWORD": ORTHANC_PASSWORD}


def test_results_sent_by_stow_appear_in_orthanc_once(tmp_path, orthanc):
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path / "data"), **orthanc_environment(orthanc)})
    store = Store(settings.storage.database_path)
    series, paths = result_files(settings.storage, count=3)
    target = str(settings.delivery.destinations[0])
    for path in paths:
        store.enqueue_delivery(series, 1, "dicom", target, path)
    assert Deliverer(store, settings).run_once() == 3
    assert all(item.state == "sent" and item.last_error is None for item in store.deliveries(series))
    expected = {dcmread(settings.storage.data_dir / p).SOPInstanceUID: CTImageStorage for p in paths}
    study_uid = dcmread(settings.storage.data_dir / paths[0]).StudyInstanceUID
    assert orthanc.instances(study_uid) == expected

    for path in paths:  # a re-analysis delivers the same UIDs again: the archive keeps one copy each
        store.enqueue_delivery(series, 2, "dicom", target, path)
    assert Deliverer(store, settings).run_once() == 3
    assert orthanc.instances(study_uid) == expected
    store.close()


def test_an_object_orthanc_refuses_fails_alone_with_its_reason_and_the_others_arrive(tmp_path):
    """A real archive refusing one instance: Orthanc with a 1 MB storage quota cannot take a 2 MB
    object. Debian's DICOMweb plugin 1.7 then answers HTTP 200 and lists the instance in neither
    ReferencedSOPSequence nor FailedSOPSequence (newer plugins answer 400 with Failure Reason 0xA700,
    as the stub test above covers): not listed as stored is a failure too."""
    with private_network():
        orthanc = Orthanc(tmp_path / "orthanc", MaximumStorageSize=1)
        try:
            settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path / "data"), **orthanc_environment(orthanc)})
            store = Store(settings.storage.database_path)
            series, small = result_files(settings.storage, count=3)
            large = ct_instance(series, 99)
            large.Rows = large.Columns = 1024
            large.PixelData = bytes(1024 * 1024 * 2)
            large_path = settings.storage.result_folder(series).object_file("CT", large.SOPInstanceUID)
            large.save_as(large_path, enforce_file_format=True)
            target = str(settings.delivery.destinations[0])
            for path in [str(large_path.relative_to(settings.storage.data_dir)), *small]:  # the refused one first
                store.enqueue_delivery(series, 1, "dicom", target, path)

            assert Deliverer(store, settings).run_once() == 3
            items = outbox(store, series)
            refused = items.pop(large.SOPInstanceUID)
            assert refused.state != "sent"
            assert "HTTP 200 OK: the Store Instances Response does not list the object as stored" in refused.last_error
            assert all(item.state == "sent" and item.last_error is None for item in items.values())
            assert set(orthanc.instances(large.StudyInstanceUID)) == set(items)  # QIDO: the three, not the refused one
            store.close()
        finally:
            orthanc.stop()


def test_a_study_pushed_by_stow_is_analysed_and_its_results_reach_orthanc(orthanc, node_factory, positive_series):
    node = node_factory("serve", ICHNODE_WORKERS="1", **orthanc_environment(orthanc)).start()
    client = DICOMwebClient(f"http://127.0.0.1:{node.http_port}/dicom-web")
    datasets = [dcmread(path) for path in sorted(positive_series.iterdir())]
    response = client.store_instances(datasets)
    assert len(response.ReferencedSOPSequence) == 40 and "FailedSOPSequence" not in response
    series_uid, study_uid = series_uid_of(positive_series), study_uid_of(positive_series)
    assert node.series(series_uid)["instances"] == 40  # the request answered after every instance was stored

    series = wait_for(lambda: done(node, series_uid), ANALYSIS_BUDGET, what="analysis of the STOW-RS study")
    result_uids = set(series["findings"]["result_uids"].values())
    stored = wait_for(lambda: (lambda found: found if result_uids <= set(found) else None)(orthanc.instances(study_uid)),
                      60, what="the results in Orthanc")
    classes = {stored[uid] for uid in result_uids}
    assert SEG_CLASS in classes and KOS_CLASS in classes and classes & SR_CLASSES and classes & SC_CLASSES
    wait_for(lambda: all(d["state"] == "sent" for d in node.series(series_uid)["deliveries"]), 30,
             what="the outbox to record every object as sent")
