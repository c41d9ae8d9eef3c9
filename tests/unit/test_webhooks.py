"""Webhook payloads (no patient data unless configured) and which levels notify."""
import pytest

from node.webhooks import build_webhook_payload, should_notify
from tests.helpers import WEBHOOK_STUDY, findings_for


def test_patient_data_only_when_configured():
    findings = findings_for("1.2.3", "1.2.3.4", 0.93, volume=38.2)
    body = build_webhook_payload(findings, WEBHOOK_STUDY, include_patient=True, base_url="https://ich.example:8443/")
    assert body["patient"] == {"id": "PID-4711", "name": "DOE^JANE"} and body["accession_number"] == "ACC-99"
    assert body["links"]["worklist"] == "https://ich.example:8443/"
    assert body["links"]["series"] == "https://ich.example:8443/api/series/1.2.3.4"


@pytest.mark.parametrize(
    ("level", "min_level", "notify"),
    [
        ("STAT", "URGENT", True), ("URGENT", "URGENT", True), ("ROUTINE", "URGENT", False),
        ("URGENT", "STAT", False), ("STAT", "STAT", True), ("ROUTINE", "ROUTINE", True),
    ],
)
def test_should_notify(level, min_level, notify):
    assert should_notify(level, min_level) is notify
