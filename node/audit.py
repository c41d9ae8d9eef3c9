"""The audit trail: who sent, received, read or acknowledged what, one JSON line per event.

Lines go to `data_dir/audit.log` (opened O_APPEND, one write per line, so lines from threads never
interleave) and, with `[audit] syslog`, to syslog as well. Events are modelled on the DICOM audit
messages (PS3.15 A.5.3): `event` names one, `action` is its Event Action Code (C create, R read,
U update, E execute) and `outcome` its Event Outcome Indicator (0 success, 4 minor failure):

  Application Activity         the node started (its configuration, secrets masked, and the unsafe
                               settings in force) or stopped
  Association                  an association accepted (0) or rejected (4): peer AE title and
                               address, TLS or not (ichnode's own event; PS3.15 has none for it)
  Security Alert               a TLS handshake that failed
  User Authentication          an API request refused for its token (4)
  DICOM Instances Transferred  C: instances stored, one line per series and association or
                               STOW-RS request, with the Patient ID; R: a result object delivered,
                               naming the destination
  Export                       a result sent by HL7 or webhook (a webhook named by its host only)
  Query                        an API read of patient data, naming the caller (`api_token`, or
                               `anonymous` without a token) and address
  Procedure Record             a study acknowledged on the worklist, and by whom (U)

No line carries pixel data or a patient's name; the Patient ID appears only where instances of
one patient were stored.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from ichnode.common.config import HostPort, Settings
from node.headers import InstanceHeader

AUDIT = logging.getLogger("ichnode.audit")
AUDIT.propagate = False  # audit lines go to the audit trail only, never into the node's log
AUDIT.setLevel(logging.INFO)

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8


def record(event: str, action: str = "E", outcome: int = SUCCESS, **fields) -> None:
    """Write one audit line (nowhere until `open_audit_trail`, as in tests of single parts)."""
    line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event,
            "action": action, "outcome": outcome, **fields}
    AUDIT.info("%s", json.dumps(line, default=str, ensure_ascii=False))


def instances_stored(headers: Iterable[InstanceHeader], **source) -> None:
    """One `DICOM Instances Transferred` line per series of `headers`, from `source` (peer AE and
    address, or the STOW-RS client)."""
    counts: Counter[tuple[str, str, str | None]] = Counter()
    for header in headers:
        counts[(header.study_instance_uid, header.series_instance_uid, header.patient_id)] += 1
    for (study, series, patient_id), count in counts.items():
        record("DICOM Instances Transferred", "C", study_instance_uid=study, series_instance_uid=series,
               patient_id=patient_id, instances=count, **source)


class JsonLinesFile(logging.Handler):
    """Appends each record's message as one line with a single write(2) on an O_APPEND descriptor."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, (record.getMessage() + "\n").encode("utf-8"))
        except OSError:
            self.handleError(record)

    def close(self) -> None:
        os.close(self.fd)
        super().close()


def _syslog_handler(target: str) -> logging.Handler:
    if target.startswith("/"):
        return logging.handlers.SysLogHandler(address=target)
    endpoint = HostPort.parse(target)
    return logging.handlers.SysLogHandler(address=(endpoint.host, endpoint.port))


def open_audit_trail(settings: Settings) -> Path:
    """Send audit lines to data_dir/audit.log (and syslog when configured); returns the file's path."""
    close_audit_trail()
    path = settings.storage.data_dir / "audit.log"
    AUDIT.addHandler(JsonLinesFile(path))
    if settings.audit.syslog:
        handler = _syslog_handler(settings.audit.syslog)
        handler.ident = "ichnode-audit: "
        AUDIT.addHandler(handler)
    return path


def close_audit_trail() -> None:
    for handler in list(AUDIT.handlers):
        AUDIT.removeHandler(handler)
        handler.close()


def application_started(settings: Settings, unsafe: list[str]) -> None:
    """The start event: the configuration in force, secrets masked, and its unsafe settings."""
    config = settings.model_dump(mode="json")  # SecretStr keys are masked by pydantic
    if settings.http.api_token:
        config["http"]["api_token"] = "**********"
    record("Application Activity", "E", action_type="start", pid=os.getpid(), started=time.time(),
           configuration=config, unsafe_settings=unsafe)
