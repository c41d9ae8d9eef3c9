"""No patient name or ID in the node's log, whatever a sender's malformed header holds (issue 11,
items 6 and 7): the node as a process, a pynetdicom sender, headers whose element lengths are wrong."""
from __future__ import annotations

import struct
from io import BytesIO
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config

from tests.helpers import ct_instance, new_uid

NAME, PATIENT_ID = "DOE^JANE", "MRN4711"


def swallowing(element: bytes) -> bytes:
    """A CT instance whose `element` (tag and VR as written) declares a length that swallows the
    elements after it up to the patient's name and ID, as the issue's scanner sent."""
    ds = ct_instance(new_uid(), 0)
    ds.PatientName, ds.PatientID = NAME, PATIENT_ID
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = bytearray(buffer.getvalue())
    start = data.index(element, 132 + 100)  # in the data set, past the file meta information
    end = data.index(PATIENT_ID.encode()) + len(PATIENT_ID) + 1
    struct.pack_into("<H", data, start + 6, end - (start + 8))
    return bytes(data)


def send(port: int, data: bytes) -> int:
    ds = dcmread(BytesIO(data))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds).Status
    finally:
        assoc.release()


def test_malformed_headers_carrying_a_patient_name_stay_out_of_the_log(node_factory, monkeypatch):
    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda value: (True, ""))  # let pynetdicom send the odd UID
    node = node_factory("node").start()
    # the case: the SOP Instance UID swallows Modality, Patient's Name and ID
    assert send(node.port, swallowing(b"\x08\x00\x18\x00UI")) == 0xA900
    # Modality swallows them (before, the series was stored and skipped: "modality CT..PN..DOE^JANE.. is not CT")
    assert send(node.port, swallowing(b"\x08\x00\x60\x00CS")) == 0xA900
    logs = node.logs()
    assert logs.count("NUL bytes inside its value: malformed header") == 2
    audit = (node.data_dir / "audit.log").read_text()
    for text in (logs, audit):
        assert NAME not in text and "DOE" not in text and PATIENT_ID not in text
