"""ORU^R01 content: segments, escaping, order priority and a deterministic control id."""
import hl7
import pytest

from node.errors import DeliveryError
from node.hl7 import build_oru, control_id, send_mllp
from tests.helpers import HL7_STUDY, findings_for, oru_observations


@pytest.mark.parametrize(("p_any", "order_priority"), [(0.5, "A"), (0.05, "R")])
def test_order_priority_follows_the_level(p_any, order_priority):
    message = hl7.parse(build_oru(findings_for("1.2.3", "1.2.3.4", p_any), HL7_STUDY, "X"))
    assert message["OBR.5"] == order_priority and message["OBR.27.1.6"] == order_priority


def test_text_with_delimiters_and_line_breaks_cannot_break_the_message():
    findings = findings_for("1.2.3", "1.2.3.4", 0.5)
    findings.priority = findings.priority.model_copy(update={"rationale": "a|b^c&d~e\\f\rOBX|99|ST|FAKE"})
    text = build_oru(findings, HL7_STUDY, "X")
    message = hl7.parse(text)
    assert len(message.segments("OBX")) == len(oru_observations(message)) and "FAKE" not in oru_observations(message)
    assert oru_observations(message)["PRIORATIONALE"] == "a|b^c&d~e\\f OBX|99|ST|FAKE"


def test_control_id_is_deterministic_per_result():
    first = findings_for("1.2.3", "1.2.3.4", 0.5)
    again = first.model_copy(update={"seconds": 99.0, "warnings": ["late slice"]})  # timing is not part of the result
    other = findings_for("1.2.3", "1.2.3.4", 0.6)
    assert control_id(first) == control_id(again) != control_id(other)
    assert hl7.parse(build_oru(first, HL7_STUDY, "X"))["MSH.10"] == control_id(first)
    assert len(control_id(first)) <= 20


def test_bad_endpoint_is_a_delivery_error():
    with pytest.raises(DeliveryError, match="is not host:port"):
        send_mllp("ris.example", build_oru(findings_for("1.2", "1.2.1", 0.9), HL7_STUDY, "X"))
