"""The audit trail (issue 11, item 6): a C-STORE from DCMTK storescu, a delivery to DCMTK storescp,
API reads and an acknowledgement each leave their JSON line in data_dir/audit.log, with no pixel
data and no patient name."""
from __future__ import annotations

import json
import subprocess

import pytest
from fastapi.testclient import TestClient

from node.api import create_app
from node.delivery import Deliverer
from tests.helpers import (MllpListener, audited_listener, Receiver, ack, ct_instance, dcmtk, free_port, new_uid, result_files,
                           wait_for)

TOKEN = "audit-test-token"


@pytest.fixture
def node(tmp_path, storescp):
    with audited_listener({
            "ICHNODE_DATA_DIR": str(tmp_path / "data"), "ICHNODE_PORT": str(free_port()), "ICHNODE_BIND": "127.0.0.1",
            "ICHNODE_API_TOKEN": TOKEN, "ICHNODE_DESTINATIONS": storescp.destination}) as running:
        yield running


def events(trail) -> list[dict]:
    return [json.loads(line) for line in trail.read_text().splitlines()]


def test_store_delivery_and_api_reads_are_audited(node, storescp, tmp_path):
    settings, store, trail = node
    series = new_uid()
    folder = tmp_path / "send"
    folder.mkdir()
    for i in range(3):
        ds = ct_instance(series, i)
        ds.PatientName = "AUDIT^PATIENT"
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
    sent = subprocess.run([dcmtk("storescu"), "-aet", "CT_SCANNER", "-aec", "ICHNODE", "+sd", "127.0.0.1",
                           str(settings.listener.port), str(folder)], capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    refused = subprocess.run([dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "NOT_US", "127.0.0.1",
                              str(settings.listener.port)], capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0  # called AE title not ours: rejected

    stored = wait_for(lambda: [e for e in events(trail) if e["event"] == "DICOM Instances Transferred"], 10,
                      what="the stored instances in the audit trail")
    assert [(e["action"], e["series_instance_uid"], e["instances"], e["peer_ae"], e["patient_id"]) for e in stored] \
        == [("C", series, 3, "CT_SCANNER", "P1")]
    associations = [e for e in events(trail) if e["event"] == "Association"]
    assert {(e["peer_ae"], e["outcome"]) for e in associations} == {("CT_SCANNER", 0), ("INTRUDER", 4)}

    result_series, paths = result_files(settings.storage, count=1)
    store.enqueue_delivery(result_series, 1, "dicom", storescp.destination, paths[0])
    ris, hook = MllpListener(ack("AA")), Receiver()
    try:
        store.enqueue_delivery(result_series, 1, "hl7", ris.endpoint,
                               "MSH|^~\\&|ICHNODE|ICHNODE|RIS|HOSP|20261123120000||ORU^R01|42|P|2.5.1\r")
        store.enqueue_delivery(result_series, 1, "webhook", hook.url, json.dumps({"event": "ich.result"}))
        assert Deliverer(store, settings).run_once() == 3
    finally:
        ris.close()
        hook.close()

    client = TestClient(create_app(store, settings, {}))
    assert client.get("/api/worklist").status_code == 401
    client.headers["Authorization"] = f"Bearer {TOKEN}"
    assert client.get("/api/studies").status_code == 200
    study_uid = stored[0]["study_instance_uid"]
    assert client.post(f"/api/studies/{study_uid}/ack", json={"by": "dr.reader"}).status_code == 200

    trail_events = events(trail)
    delivered = [e for e in trail_events if e["event"] == "DICOM Instances Transferred" and e["action"] == "R"]
    assert [(e["destination"], e["series_instance_uid"]) for e in delivered] == [(storescp.destination, result_series)]
    exports = {e["channel"]: e["destination"] for e in trail_events if e["event"] == "Export"}
    assert exports == {"hl7": ris.endpoint, "webhook": hook.url.split("/")[2]}  # a webhook by its host only
    assert [(e["outcome"], e["path"]) for e in trail_events if e["event"] == "User Authentication"] == [(4, "/api/worklist")]
    assert [(e["path"], e["user"]) for e in trail_events if e["event"] == "Query"] == [("/api/studies", "api_token")]
    (acknowledged,) = [e for e in trail_events if e["event"] == "Procedure Record"]
    assert (acknowledged["study_instance_uid"], acknowledged["acknowledged_by"], acknowledged["action"]) \
        == (study_uid, "dr.reader", "U")
    text = trail.read_text()
    assert "AUDIT^PATIENT" not in text and TOKEN not in text and "PixelData" not in text
    assert len(text) < 5000  # a few hundred bytes a line: no pixel data
