"""The HTTP API on a real Store: studies, series with states and reasons, token, health."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ichnode.common.config import load_settings
from node.api import create_app
from node.store import Store
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
