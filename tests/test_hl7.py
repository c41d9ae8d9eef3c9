"""ORU^R01 content and MLLP delivery against a real MLLP listener socket."""
import socket
import threading

import hl7
import pytest

from node.config import Settings
from node.errors import DeliveryError
from node.hl7 import build_oru, control_id, send_mllp
from tests.test_worklist import findings_for

STUDY = {
    "study_uid": "1.2.3", "patient_id": "PID|42", "patient_name": "O'NEIL^MARY&ANN^^DR^PHD",
    "accession_number": "ACC-7^X", "study_date": "20261123",
}


class MllpListener:
    """A one-thread MLLP peer on an ephemeral port; `reply(message)` gives the raw ACK or None."""

    def __init__(self, reply):
        self.reply = reply
        self.received: list[hl7.Message] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:  # one message per connection, as the node sends them, until closed
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                buffer = b""
                while b"\x1c\x0d" not in buffer:
                    buffer += conn.recv(65536)
                assert buffer.startswith(b"\x0b")
                message = hl7.parse(buffer[1:buffer.index(b"\x1c\x0d")].decode("utf-8"))
                self.received.append(message)
                answer = self.reply(message)
                if answer is None:  # say nothing until the sender gives up
                    conn.recv(1)
                    continue
                conn.sendall(b"\x0b" + answer.encode("utf-8") + b"\x1c\x0d")

    def close(self):
        self.server.close()
        self.thread.join(5)


@pytest.fixture
def listen():
    listeners = []

    def start(reply):
        listeners.append(MllpListener(reply))
        return listeners[-1]

    yield start
    for listener in listeners:
        listener.close()


def ack(code: str, *extra: str, control_id: str | None = None):
    def reply(message: hl7.Message) -> str:
        sent_id = control_id or str(message.segment("MSH")(10))
        return "\r".join(["MSH|^~\\&|RIS|HOSP|ICHNODE||20261123120000||ACK^R01^ACK|9|P|2.5.1",
                          "|".join(["MSA", code, sent_id, *extra[:1]]), *extra[1:]]) + "\r"
    return reply


def observations(message: hl7.Message) -> dict[str, str]:
    return {seg.extract_field(1, 3, 1, 1): seg.extract_field(1, 5, 1, 1) for seg in message.segments("OBX")}


def test_oru_reaches_the_ris_with_patient_order_priority_and_values(listen):
    findings = findings_for("1.2.3", "1.2.3.4", 0.93, volume=38.2)
    listener = listen(lambda message: str(message.create_ack("AA")))
    send_mllp(listener.endpoint, build_oru(findings, STUDY, "ST MARY'S & CO"), timeout=5)

    (message,) = listener.received
    assert message["MSH.9.1.1"] == "ORU" and message["MSH.9.1.2"] == "R01" and message["MSH.12"] == "2.5.1"
    assert message["MSH.4"] == "ST MARY'S & CO"  # escaped on the wire, intact after parsing
    assert message["PID.3"] == "PID|42"
    assert [message[f"PID.5.1.{n}"] for n in (1, 2, 4, 5)] == [
        "O'NEIL", "MARY&ANN", "PHD", "DR"]  # DICOM prefix^suffix -> HL7 suffix^prefix
    assert message["OBR.2"] == message["OBR.3"] == "ACC-7^X"
    assert message["OBR.5"] == "S" and message["OBR.27.1.6"] == "S" and message["OBR.25"] == "P"
    assert message["NTE.3"] == "NOT FOR DIAGNOSTIC USE - triage aid"
    values = observations(message)
    assert values["PROB-any"] == "0.9300" and values["PROB-IPH"] == "0.8370" and values["PROB-SDH"] == "0.0400"
    assert values["VOL-any"] == "38.20"
    assert values["260870009"] == "STAT" and values["PRIOSCORE"] == "2.9300"
    assert values["PRIORATIONALE"].startswith(f"ICH probability 0.93 >= {Settings().stat_probability:.2f}")
    assert values["DIFFICULT"] == "N"
    assert values["111001"] == "ich-ensemble" and values["111003"] == "1.0.0"
    assert values["110180"] == "1.2.3" and values["112002"] == "1.2.3.4"
    assert [seg.extract_field(1, 1, 1, 1) for seg in message.segments("OBX")] == [
        str(n) for n in range(1, len(values) + 1)]


@pytest.mark.parametrize(("p_any", "order_priority"), [(0.5, "A"), (0.05, "R")])
def test_order_priority_follows_the_level(p_any, order_priority):
    message = hl7.parse(build_oru(findings_for("1.2.3", "1.2.3.4", p_any), STUDY, "X"))
    assert message["OBR.5"] == order_priority and message["OBR.27.1.6"] == order_priority


def test_text_with_delimiters_and_line_breaks_cannot_break_the_message():
    findings = findings_for("1.2.3", "1.2.3.4", 0.5)
    findings["priority"]["rationale"] = "a|b^c&d~e\\f\rOBX|99|ST|FAKE"
    text = build_oru(findings, STUDY, "X")
    message = hl7.parse(text)
    assert len(message.segments("OBX")) == len(observations(message)) and "FAKE" not in observations(message)
    assert observations(message)["PRIORATIONALE"] == "a|b^c&d~e\\f OBX|99|ST|FAKE"


def test_control_id_is_deterministic_per_result():
    first = findings_for("1.2.3", "1.2.3.4", 0.5)
    again = dict(first, seconds=99.0, warnings=["late slice"])  # timing is not part of the result
    other = findings_for("1.2.3", "1.2.3.4", 0.6)
    assert control_id(first) == control_id(again) != control_id(other)
    assert hl7.parse(build_oru(first, STUDY, "X"))["MSH.10"] == control_id(first)
    assert len(control_id(first)) <= 20


def test_commit_accept_is_success(listen):
    listener = listen(ack("CA"))
    send_mllp(listener.endpoint, build_oru(findings_for("1.2", "1.2.1", 0.1), STUDY, "X"), timeout=5)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (ack("AE", "Unknown accession", "ERR|||207^Application internal error^HL70357|E||||No order ACC-7"),
         "ACK AE (application error): Unknown accession; No order ACC-7"),
        (ack("AR"), "ACK AR (application reject): no reason given"),
        (ack("CR", "", "ERR|||200^Unsupported message type^HL70357"), "ACK CR (commit reject): Unsupported message type"),
        (ack("AA", control_id="someone-else"), "ACK is for message 'someone-else'"),
        (lambda message: "not hl7", "unreadable ACK"),
    ],
)
def test_negative_or_wrong_ack_is_a_delivery_error(listen, reply, reason):
    listener = listen(reply)
    with pytest.raises(DeliveryError, match="^HL7 to 127.0.0.1:[0-9]+: ") as caught:
        send_mllp(listener.endpoint, build_oru(findings_for("1.2", "1.2.1", 0.9), STUDY, "X"), timeout=5)
    assert reason in str(caught.value)


def test_closed_port_is_a_delivery_error():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        endpoint = f"127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(DeliveryError, match="connection refused"):
        send_mllp(endpoint, build_oru(findings_for("1.2", "1.2.1", 0.9), STUDY, "X"), timeout=2)


def test_silent_peer_times_out(listen):
    listener = listen(lambda message: None)
    with pytest.raises(DeliveryError, match=r"no ACK within 0.3 s"):
        send_mllp(listener.endpoint, build_oru(findings_for("1.2", "1.2.1", 0.9), STUDY, "X"), timeout=0.3)
    assert len(listener.received) == 1


def test_bad_endpoint_is_a_delivery_error():
    with pytest.raises(DeliveryError, match="is not host:port"):
        send_mllp("ris.example", build_oru(findings_for("1.2", "1.2.1", 0.9), STUDY, "X"))
