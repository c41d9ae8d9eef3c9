"""Keeping patient data out of the logs, library messages included.

pydicom warns (and logs) about a value it cannot accept with the value itself, e.g.
``Invalid value for VR UI: b'1.2.3\\x10\\x00\\x10\\x00PN\\x08\\x00DOE^JANE'`` when a malformed header's
element swallows the next ones; pynetdicom logs the bytes of a PDU it could not decode.
`redact` replaces every quoted value in such a message; `keep_values_out_of_logs` applies it to
each record of pydicom, pynetdicom and Python warnings (routed into logging) that reaches the log
handlers, so the line stays (which VR, which element, what went wrong) and the value goes.
"""
from __future__ import annotations

import logging
import re

#: A Python repr of a str or bytes value, as libraries quote values in their messages.
_QUOTED = re.compile(r"""b?'(?:[^'\\\n]|\\.)*'|b?"(?:[^"\\\n]|\\.)*\"""")
LIBRARY_LOGGERS = ("pydicom", "pynetdicom", "py.warnings")
REDACTED = "<value>"


def redact(text: str) -> str:
    """`text` with every quoted value replaced by ``<value>``."""
    return _QUOTED.sub(REDACTED, text)


class LibraryValueRedactor(logging.Filter):
    """A handler filter: records of the library loggers lose their quoted values and tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in LIBRARY_LOGGERS:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
            record.msg, record.args = redact(message), None
            record.exc_info = record.exc_text = None
        return True


def keep_values_out_of_logs() -> None:
    """Route Python warnings into logging and filter every handler of the root logger."""
    logging.captureWarnings(True)
    redactor = LibraryValueRedactor()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, LibraryValueRedactor) for f in handler.filters):
            handler.addFilter(redactor)
