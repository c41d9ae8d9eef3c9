"""HL7 v2.5.1 ORU^R01 to the RIS over MLLP: the triage result as observations on the order.

`build_oru` writes MSH, PID (patient from the DICOM), OBR (the accession number as placer and
filler order number, the triage level as order priority S/A/R in OBR-5 and OBR-27), a NTE with
the disclaimer, and one OBX per value: probabilities, volumes, priority level / score /
rationale, the difficult-case flag, model name and version, study and series UIDs. Results are
sent as preliminary (P): a triage aid, never the signed report. Codes follow docs/CONFORMANCE.md;
docs/INTEGRATION.md lists every OBX.

`send_mllp` sends one message and waits for its ACK; retries belong to the delivery outbox.
"""
from __future__ import annotations

import hashlib
import json
import socket
import time
from datetime import datetime, timezone

import hl7

from ichnode.common.analysis import Findings
from ichnode.common.config import HostPort
from ichnode.common.vocabulary import (
    DIFFICULT_CASE_CODE,
    DISCLAIMER,
    LABEL_NAMES,
    LEVEL_MEANINGS,
    LOCAL_CODING_SCHEME as LOCAL,
    PRIORITY_RATIONALE_CODE,
    PRIORITY_SCORE_CODE,
)
from node.errors import DeliveryError
from node.store import StudyRow

ORDER_PRIORITY = {"STAT": "S", "URGENT": "A", "ROUTINE": "R"}  # HL7 table 0027
ACK_MEANINGS = {
    "AE": "application error", "AR": "application reject",
    "CE": "commit error", "CR": "commit reject",
}
START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\x0d"
# the parts of findings.json that make a result distinct; timing and warnings are not
_CONTENT_KEYS = ("series_instance_uid", "probabilities", "volumes_ml", "priority", "difficult", "model",
                 "result_uids")


def escape(text: object) -> str:
    """Text for one HL7 component: delimiters as escape sequences, line breaks as spaces."""
    value = "" if text is None else str(text)
    for char, sequence in (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        value = value.replace(char, sequence)
    return " ".join(value.splitlines())


def _composite(*components: object) -> str:
    return "^".join(escape(c) for c in components).rstrip("^")


def _person_name(dicom_name: str | None) -> str:
    """DICOM PN family^given^middle^prefix^suffix -> HL7 XPN family^given^middle^suffix^prefix."""
    if not dicom_name:
        return ""
    family, given, middle, prefix, suffix = (dicom_name.split("=")[0].split("^") + [""] * 5)[:5]
    return _composite(family, given, middle, suffix, prefix)


def _segment(name: str, fields: dict[int, str]) -> str:
    """One segment from {field number: encoded value}; MSH counts its field separator as field 1."""
    first = 2 if name == "MSH" else 1
    values = [fields.get(n, "") for n in range(first, max(fields) + 1)]
    return "|".join([name, *values])


def control_id(findings: Findings) -> str:
    """Deterministic MSH-10 (20 characters): the same result always gets the same id."""
    content = json.dumps(findings.model_dump(mode="json", include=set(_CONTENT_KEYS)), sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:20]


def _observations(findings: Findings) -> list[tuple[str, str, str, str]]:
    """(value type, OBX-3 identifier, OBX-5 value, OBX-6 units) for each reported value."""
    probability_unit = _composite("{probability}", "probability", "UCUM")
    ml = _composite("ml", "milliliter", "UCUM")
    labels = sorted(findings.probabilities, key=lambda k: (k != "any", k))  # any, EDH, IPH, ...
    rows = [
        ("NM", _composite(f"PROB-{label}", f"Probability of {LABEL_NAMES.get(label, label)}", LOCAL),
         f"{findings.probabilities[label]:.4f}", probability_unit)
        for label in labels
    ]
    rows += [
        ("NM", _composite(f"VOL-{label}", f"Estimated volume of {LABEL_NAMES.get(label, label)}", LOCAL),
         f"{volume:.2f}", ml)
        for label, volume in sorted(findings.volumes_ml.items(), key=lambda kv: (kv[0] != "any", kv[0]))
    ]
    priority, model = findings.priority, findings.model
    level = priority.level
    rows += [
        ("CWE", _composite("260870009", "Priority", "SCT"), _composite(level, LEVEL_MEANINGS[level], LOCAL), ""),
        ("NM", _composite(*PRIORITY_SCORE_CODE, LOCAL), f"{priority.score:.4f}", _composite("1", "no units", "UCUM")),
        ("ST", _composite(*PRIORITY_RATIONALE_CODE, LOCAL), escape(priority.rationale), ""),
        ("CWE", _composite(*DIFFICULT_CASE_CODE, LOCAL),
         _composite("Y", "Yes", "HL70136") if findings.difficult else _composite("N", "No", "HL70136"), ""),
        ("ST", _composite("111001", "Algorithm Name", "DCM"), escape(model.name), ""),
        ("ST", _composite("111003", "Algorithm Version", "DCM"), escape(model.version), ""),
        ("ST", _composite("110180", "Study Instance UID", "DCM"), escape(findings.study_instance_uid), ""),
        ("ST", _composite("112002", "Series Instance UID", "DCM"), escape(findings.series_instance_uid), ""),
    ]
    return rows


def build_oru(findings: Findings, study: StudyRow, sending_facility: str) -> str:
    """The ORU^R01 for one analysed series; segments end with CR."""
    level = findings.priority.level
    now = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S+0000")
    accession = escape(study.accession_number)
    segments = [
        _segment("MSH", {2: "^~\\&", 3: "ICHNODE", 4: escape(sending_facility), 7: now,
                         9: "ORU^R01^ORU_R01", 10: control_id(findings), 11: "P", 12: "2.5.1",
                         18: "UNICODE UTF-8"}),
        _segment("PID", {1: "1", 3: escape(study.patient_id), 5: _person_name(study.patient_name)}),
        _segment("OBR", {1: "1", 2: accession, 3: accession,
                         4: _composite("ICHTRIAGE", "AI intracranial hemorrhage triage (head CT)", LOCAL),
                         5: ORDER_PRIORITY[level], 7: escape(study.study_date), 22: now, 24: "CT",
                         25: "P", 27: "^^^^^" + ORDER_PRIORITY[level]}),
        _segment("NTE", {1: "1", 2: "L", 3: DISCLAIMER}),
    ]
    for set_id, (value_type, identifier, value, units) in enumerate(_observations(findings), start=1):
        segments.append(_segment("OBX", {1: str(set_id), 2: value_type, 3: identifier, 5: value, 6: units,
                                         11: "P", 14: now}))
    return "\r".join(segments) + "\r"


def _read_frame(sock: socket.socket, deadline: float) -> bytes:
    buffer = b""
    while END_BLOCK not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise DeliveryError("connection closed before the ACK arrived")
        buffer += chunk
    start = buffer.find(START_BLOCK)
    if start < 0:
        raise DeliveryError("reply is not MLLP framed (no start block 0x0B)")
    return buffer[start + 1:buffer.index(END_BLOCK)]


def _error_text(err: hl7.Segment) -> str:
    """ERR-8 (user message), else the text of ERR-3 (HL7 error code), else the raw segment."""
    for field, component in ((8, 1), (3, 2)):
        try:
            text = err.extract_field(1, field, 1, component)  # unescaped
        except IndexError:  # not present in this ERR
            continue
        if text:
            return text
    return str(err)


def _check_ack(reply: bytes, sent_id: str) -> None:
    try:
        ack = hl7.parse(reply.decode("utf-8", errors="replace"))
        msa = ack.segment("MSA")
    except (hl7.ParseException, KeyError, IndexError) as exc:
        raise DeliveryError(f"unreadable ACK ({type(exc).__name__}): {reply[:200]!r}") from None
    code, acked_id = str(msa(1)), str(msa(2)) if len(msa) > 2 else ""
    if acked_id != sent_id:
        raise DeliveryError(f"ACK is for message {acked_id!r}, not {sent_id!r}")
    if code in ("AA", "CA"):
        return
    reasons = [ack.unescape(str(msa(3)))] if len(msa) > 3 else []
    reasons += [_error_text(segment) for segment in ack if str(segment(0)) == "ERR"]
    detail = "; ".join(r for r in reasons if r) or "no reason given"
    meaning = ACK_MEANINGS.get(code, "unknown acknowledgment code")
    raise DeliveryError(f"ACK {code} ({meaning}): {detail}")


def send_mllp(endpoint: str, message: str, timeout: float = 10.0) -> None:
    """Send one message to `host:port` and wait for its ACK; DeliveryError says why it failed.

    Returns on AA/CA. `timeout` bounds the whole exchange (connect, send, ACK).
    """
    try:
        target = HostPort.parse(endpoint)
        sent_id = str(hl7.parse(message).segment("MSH")(10))
    except (ValueError, hl7.ParseException, KeyError) as exc:
        raise DeliveryError(f"HL7 to {endpoint}: cannot send: {exc}") from None
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout) as sock:
            sock.sendall(START_BLOCK + message.encode("utf-8") + END_BLOCK)
            reply = _read_frame(sock, deadline)
        _check_ack(reply, sent_id)
    except DeliveryError as exc:
        raise DeliveryError(f"HL7 to {endpoint}: {exc}") from None
    except ConnectionRefusedError:
        raise DeliveryError(f"HL7 to {endpoint}: connection refused") from None
    except TimeoutError:
        raise DeliveryError(f"HL7 to {endpoint}: no ACK within {timeout:g} s") from None
    except OSError as exc:
        raise DeliveryError(f"HL7 to {endpoint}: {exc.strerror or exc}") from None
