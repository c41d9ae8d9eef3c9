"""ORU^R01 delivery over MLLP against a real listener socket."""
import socket

import pytest

from ichnode.common.config import Settings
from node.errors import DeliveryError
from node.hl7 import build_oru, send_mllp
from tests.helpers import HL7_STUDY, ack, findings_for, oru_observations


def test_oru_reaches_the_ris_with_patient_order_priority_and_values(listen):
    findings = findings_for("1.2.3", "1.2.3.4", 0.93, volume=38.2)
    listener = listen(lambda message: str(message.create_ack("AA")))
    send_mllp(listener.endpoint, build_oru(findings, HL7_STUDY, "ST MARY'S & CO"), timeout=5)

    (message,) = listener.received
    assert message["MSH.9.1.1"] == "ORU" and message["MSH.9.1.2"] == "R01" and message["MSH.12"] == "2.5.1"
    assert message["MSH.4"] == "ST MARY'S & CO"  # escaped on the wire, intact after parsing
    assert message["PID.3"] == "PID|42"
    assert [message[f"PID.5.1.{n}"] for n in (1, 2, 4, 5)] == [
        "O'NEIL", "MARY&ANN", "PHD", "DR"]  # DICOM prefix^suffix -> HL7 suffix^prefix
    assert message["OBR.2"] == message["OBR.3"] == "ACC-7^X"
    assert message["OBR.5"] == "S" and message["OBR.27.1.6"] == "S" and message["OBR.25"] == "P"
    assert message["NTE.3"] == "NOT FOR DIAGNOSTIC USE - triage aid"
    values = oru_observations(message)
    assert values["PROB-any"] == "0.9300" and values["PROB-IPH"] == "0.8370" and values["PROB-SDH"] == "0.0400"
    assert values["VOL-any"] == "38.20"
    assert values["260870009"] == "STAT" and values["PRIOSCORE"] == "2.9300"
    assert values["PRIORATIONALE"].startswith(f"ICH probability 0.93 >= {Settings().priority.stat_probability:.2f}")
    assert values["DIFFICULT"] == "N"
    assert values["111001"] == "ich-ensemble" and values["111003"] == "1.0.0"
    assert values["110180"] == "1.2.3" and values["112002"] == "1.2.3.4"
    assert [seg.extract_field(1, 1, 1, 1) for seg in message.segments("OBX")] == [
        str(n) for n in range(1, len(values) + 1)]


def test_commit_accept_is_success(listen):
    listener = listen(ack("CA"))
    send_mllp(listener.endpoint, build_oru(findings_for("1.2", "1.2.1", 0.1), HL7_STUDY, "X"), timeout=5)


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
        send_mllp(listener.endpoint, build_oru(findings_for("1.2", "1.2.1", 0.9), HL7_STUDY, "X"), timeout=5)
    assert reason in str(caught.value)


def test_closed_port_is_a_delivery_error():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        endpoint = f"127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(DeliveryError, match="connection refused"):
        send_mllp(endpoint, build_oru(findings_for("1.2", "1.2.1", 0.9), HL7_STUDY, "X"), timeout=2)


def test_silent_peer_times_out(listen):
    listener = listen(lambda message: None)
    with pytest.raises(DeliveryError, match=r"no ACK within 0.3 s"):
        send_mllp(listener.endpoint, build_oru(findings_for("1.2", "1.2.1", 0.9), HL7_STUDY, "X"), timeout=0.3)
    assert len(listener.received) == 1
