"""The HTTP API on a real Store: studies, series with states and reasons, token, health."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ichnode.common.config import load_settings
from ichnode.common.analysis import WorkerStages
from node.api import create_app
from node.latency import stage_seconds
from node.store import DeliveryRow, Store
from tests.helpers import findings_for, header


@pytest.fixture
def store_and_settings(tmp_path):
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path), "ICHNODE_API_TOKEN": "s3cret"})
    store = Store(settings.storage.database_path)
    for i in range(3):
        store.record_instance(header("1.2.3.4", i), f"p{i}", "SCANNER")
    store.record_instance(header("1.2.3.9", 0, body_part="CHEST"), "q", "SCANNER")
    store.mark_skipped("1.2.3.9", "not a head series (BodyPartExamined 'CHEST')")
    store.mark_queued("1.2.3.4", "t1")
    store.mark_result("1.2.3.4", 1, "done", findings_for("1.2.3", "1.2.3.4", 0.9), None)
    yield store, settings
    store.close()


def test_api_requires_the_bearer_token_when_set(store_and_settings):
    store, settings = store_and_settings
    client = TestClient(create_app(store, settings, {"dicom_listener": True}))
    assert client.get("/api/studies").status_code == 401
    assert client.get("/api/studies", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/healthz").status_code == 200  # health stays open for monitoring


def test_study_shows_each_series_state_reason_and_findings(store_and_settings):
    store, settings = store_and_settings
    client = TestClient(create_app(store, settings, {}), headers={"Authorization": "Bearer s3cret"})
    study = client.get("/api/studies/1.2.3").json()
    by_uid = {s["series_instance_uid"]: s for s in study["series"]}
    assert by_uid["1.2.3.4"]["state"] == "done" and by_uid["1.2.3.4"]["findings"]["probabilities"]["any"] == 0.9
    assert by_uid["1.2.3.4"]["timings"]["queued"] and by_uid["1.2.3.4"]["timings"]["analysed"]
    assert by_uid["1.2.3.9"]["state"] == "skipped"
    assert by_uid["1.2.3.9"]["findings"] == {"skipped": "not a head series (BodyPartExamined 'CHEST')"}
    assert study["accession_number"] == "A1"
    assert client.get("/api/studies/9.9").status_code == 404
    assert client.get("/api/series/1.2.3.4").json()["deliveries"] == []


def test_health_reports_a_failing_part(store_and_settings):
    store, settings = store_and_settings
    client = TestClient(create_app(store, settings, {"dicom_listener": True, "delivery": "error: disk full"}))
    response = client.get("/healthz")
    assert response.status_code == 503 and "disk full" in response.text


def test_metrics_are_exposed(store_and_settings):
    store, settings = store_and_settings
    client = TestClient(create_app(store, settings, {}))
    assert "ichnode_instances_received_total" in client.get("/metrics").text


def test_latency_per_stage_from_the_last_instance_to_the_last_acknowledgement(store_and_settings):
    store, settings = store_and_settings
    findings = findings_for("1.2.3", "1.2.3.4", 0.9).model_copy(
        update={"stages": WorkerStages(load=1.0, detector=3.0, result_objects=0.5)})
    series = store.series("1.2.3.4").model_copy(update={
        "last_received_at": 100.0, "completed_at": 101.5, "analysed_at": 110.0, "findings": findings})

    def item(id_: int, sent_at: float | None, generation: int = 1) -> DeliveryRow:
        return DeliveryRow(id=id_, series_uid="1.2.3.4", generation=generation, channel="dicom", target="PACS@h:104",
                           payload=f"r{id_}", state="sent" if sent_at else "pending", attempts=1,
                           next_attempt_at=0.0, last_error=None, created_at=110.0, sent_at=sent_at, refusals=0)

    pending = stage_seconds(series, [item(1, 112.0), item(2, None)])
    assert (pending.completion_wait, pending.queue, pending.load, pending.detector, pending.result_objects) == (
        1.5, 4.0, 1.0, 3.0, 0.5)
    assert pending.delivery is None and pending.total is None  # not every destination has acknowledged
    delivered = stage_seconds(series, [item(1, 112.0), item(2, 113.0), item(3, None, generation=0)])
    assert (delivered.delivery, delivered.total) == (3.0, 13.0)  # an older generation's item does not count
    assert stage_seconds(series, []).total == 10.0  # nothing to deliver: up to the result
    client = TestClient(create_app(store, settings, {}), headers={"Authorization": "Bearer s3cret"})
    shown = client.get("/api/series/1.2.3.4").json()["timings"]
    assert set(shown["stages"]) == {"completion_wait", "queue", "load", "detector", "result_objects", "delivery",
                                    "total"}
