"""Webhook delivery against a real local HTTP receiver."""
import json

import pytest

from ichnode.common.analysis import SeriesFindings
from node.errors import DeliveryError
from node.webhooks import build_webhook_payload, post_webhook
from tests.helpers import WEBHOOK_STUDY, findings_for


def stat_findings() -> SeriesFindings:
    return findings_for("1.2.3", "1.2.3.4", 0.93, volume=38.2)


def test_result_reaches_the_receiver_without_patient_data(receive):
    receiver = receive()
    post_webhook(receiver.url, build_webhook_payload(stat_findings(), WEBHOOK_STUDY, include_patient=False), timeout=5)

    (request,) = receiver.requests
    assert request["headers"]["Content-Type"] == "application/json"
    body = request["body"]
    assert body["event"] == "ich.result" and body["disclaimer"] == "NOT FOR DIAGNOSTIC USE - triage aid"
    assert body["study_instance_uid"] == "1.2.3" and body["series_instance_uid"] == "1.2.3.4"
    assert body["priority"]["level"] == "STAT" and body["probabilities"]["any"] == 0.93
    assert body["volumes_ml"]["any"] == 38.2 and body["difficult"] is False
    assert body["key_slices"] == ["1.2.3.4.9.1", "1.2.3.4.9.2"]
    assert body["links"]["series"] == "/api/series/1.2.3.4"
    assert body["links"]["thumbnails"] == ["/api/series/1.2.3.4/thumbnails/0.png",
                                           "/api/series/1.2.3.4/thumbnails/1.png"]
    text = json.dumps(body)
    assert "patient" not in body and "accession_number" not in body
    assert not any(value in text for value in ("PID-4711", "DOE", "ACC-99"))


@pytest.mark.parametrize(
    ("status", "headers", "reason"),
    [
        (500, {}, "HTTP 500 Internal Server Error: database down"),
        (404, {}, "HTTP 404 Not Found: database down"),
        (302, {"Location": "https://elsewhere.example/"}, "HTTP 302 Found to https://elsewhere.example/: database down"),
    ],
)
def test_non_2xx_is_a_delivery_error_with_the_reason(receive, status, headers, reason):
    receiver = receive(status=status, body="database\n down", headers=headers)
    with pytest.raises(DeliveryError) as caught:
        post_webhook(receiver.url, build_webhook_payload(stat_findings(), WEBHOOK_STUDY, False), timeout=5)
    assert str(caught.value) == f"webhook {receiver.url}: {reason}"


def test_slow_receiver_times_out(receive):
    receiver = receive()
    receiver.hold = True
    with pytest.raises(DeliveryError, match=r"no response within 0.3 s"):
        post_webhook(receiver.url, build_webhook_payload(stat_findings(), WEBHOOK_STUDY, False), timeout=0.3)


def test_unreachable_receiver_is_a_delivery_error(receive):
    receiver = receive()
    receiver.close()
    with pytest.raises(DeliveryError, match="cannot connect"):
        post_webhook(receiver.url, build_webhook_payload(stat_findings(), WEBHOOK_STUDY, False), timeout=2)
