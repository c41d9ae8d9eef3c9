"""Library messages lose the values they quote; UIDs are logged only in a form that cannot carry a name."""
from __future__ import annotations

import io
import logging
import warnings

from pydicom import config
from pydicom.valuerep import validate_value

from ichnode.common.log_privacy import LibraryValueRedactor, keep_values_out_of_logs, redact
from ichnode.common.uids import loggable, path_name


def test_pydicom_complaint_keeps_the_vr_and_loses_the_value():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        keep_values_out_of_logs()
        assert any(isinstance(f, LibraryValueRedactor) for f in handler.filters)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            validate_value("CS", "CT\x10\x00PN\x08\x00DOE^JANE", config.WARN)  # what pydicom says on read
        logging.getLogger("pynetdicom.dul").error("Unable to decode %s", repr(b"DOE^JANE"))
    finally:
        root.removeHandler(handler)
        logging.captureWarnings(False)
    output = stream.getvalue()
    assert "Invalid value for VR CS: <value>" in output and "Unable to decode <value>" in output
    assert "DOE" not in output


def test_redact_keeps_words_and_drops_quoted_values():
    assert redact("Invalid value for VR UI: b'1.2\\x00DOE^JANE'.") == "Invalid value for VR UI: <value>."
    assert redact("no value here") == "no value here"


def test_loggable_uid_shows_plain_forms_and_hides_the_rest():
    assert loggable("ID_0a1b2c") == "'ID_0a1b2c'"
    assert loggable("1.2.3\x00DOE^JANE") == f"<14 characters, digest {path_name('1.2.3' + chr(0) + 'DOE^JANE')}>"
