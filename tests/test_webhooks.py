"""Webhook payloads and delivery against a real local HTTP receiver."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from node.errors import DeliveryError
from node.webhooks import build_webhook_payload, post_webhook, should_notify
from tests.test_worklist import findings_for

STUDY = {"study_uid": "1.2.3", "patient_id": "PID-4711", "patient_name": "DOE^JANE", "accession_number": "ACC-99"}


class Receiver:
    """An HTTP server on an ephemeral port that records POSTs and answers with `status`."""

    def __init__(self, status: int = 204, body: str = "", headers: dict | None = None):
        self.requests: list[dict] = []
        self.release = threading.Event()  # set to let a held request finish
        self.hold = False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"headers": dict(self.headers), "body": json.loads(raw)})
                if receiver.hold:
                    receiver.release.wait(5)
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/ich"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receive():
    receivers = []

    def start(**kwargs):
        receivers.append(Receiver(**kwargs))
        return receivers[-1]

    yield start
    for receiver in receivers:
        receiver.close()


def stat_findings() -> dict:
    return findings_for("1.2.3", "1.2.3.4", 0.93, volume=38.2)


def test_result_reaches_the_receiver_without_patient_data(receive):
    receiver = receive()
    post_webhook(receiver.url, build_webhook_payload(stat_findings(), STUDY, include_patient=False), timeout=5)

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


def test_patient_data_only_when_configured():
    body = build_webhook_payload(stat_findings(), STUDY, include_patient=True, base_url="https://ich.example:8443/")
    assert body["patient"] == {"id": "PID-4711", "name": "DOE^JANE"} and body["accession_number"] == "ACC-99"
    assert body["links"]["worklist"] == "https://ich.example:8443/"
    assert body["links"]["series"] == "https://ich.example:8443/api/series/1.2.3.4"


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
        post_webhook(receiver.url, build_webhook_payload(stat_findings(), STUDY, False), timeout=5)
    assert str(caught.value) == f"webhook {receiver.url}: {reason}"


def test_slow_receiver_times_out(receive):
    receiver = receive()
    receiver.hold = True
    with pytest.raises(DeliveryError, match=r"no response within 0.3 s"):
        post_webhook(receiver.url, build_webhook_payload(stat_findings(), STUDY, False), timeout=0.3)


def test_unreachable_receiver_is_a_delivery_error(receive):
    receiver = receive()
    receiver.close()
    with pytest.raises(DeliveryError, match="cannot connect"):
        post_webhook(receiver.url, build_webhook_payload(stat_findings(), STUDY, False), timeout=2)


@pytest.mark.parametrize(
    ("level", "min_level", "notify"),
    [
        ("STAT", "URGENT", True), ("URGENT", "URGENT", True), ("ROUTINE", "URGENT", False),
        ("URGENT", "STAT", False), ("STAT", "STAT", True), ("ROUTINE", "ROUTINE", True),
    ],
)
def test_should_notify(level, min_level, notify):
    assert should_notify(level, min_level) is notify


def test_should_notify_rejects_unknown_levels():
    with pytest.raises(ValueError, match="unknown priority level 'HIGH'"):
        should_notify("HIGH", "URGENT")
