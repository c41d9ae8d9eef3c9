"""UIDs as senders write them: kept exactly as received, never used as a path.

Scanners, PACS and anonymisers send UIDs outside the DICOM grammar (PS3.5 9.1: digits and dots,
no leading zeros, at most 64 characters): hex digests, ``ID_...``, leading zeros, longer values.
ichnode stores and references them unchanged, so its results join the study the sender knows,
and names files and folders by a digest of the UID instead, so no UID text reaches a path.

The node's own identity in DICOM is here too: its Implementation Class UID and Version Name, sent
in every association (listener and delivery) and written in the meta information of its result
files (docs/CONFORMANCE.md).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import re
import warnings

UID_MAX_LENGTH = 64
#: PS3.7 D.3.3.2. ichnode has no registered UID root, so, as for its result UIDs, it is pydicom's root
#: with a hash suffix: generate_uid(entropy_srcs=["ichnode", "Implementation Class UID"]).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.18059516941770858967332473654253152217"


def _version() -> str:
    try:
        return importlib.metadata.version("ichnode")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


NODE_VERSION = _version()
#: Implementation Version Name (VR SH, at most 16 characters).
IMPLEMENTATION_VERSION_NAME = f"ICHNODE_{NODE_VERSION}"[:16]
_PLAIN_UID = re.compile(r"[0-9A-Za-z._-]{1,128}")
_UID_GRAMMAR = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
PATH_NAME_LENGTH = 32  # hex digits of the SHA-256 of a UID (128 bits)
# what pydicom and pynetdicom log or warn for each non-conformant UID value they meet
_LIBRARY_UID_COMPLAINT = re.compile(r"for VR UI\b|^Non-conformant '[^']*' value")


def is_conformant(uid: str) -> bool:
    """True for a UID of the DICOM grammar: digits and dots, no leading zeros, 64 characters at most."""
    return len(uid) <= UID_MAX_LENGTH and _UID_GRAMMAR.match(uid) is not None


def loggable(uid: str) -> str:
    """`uid` as a log line may show it: quoted when it holds only letters, digits, dots, dashes and
    underscores (hex digests, ``ID_...``, leading zeros), else its length and digest, so that bytes
    of a malformed header (a patient's name among them) never reach the log."""
    if _PLAIN_UID.fullmatch(uid):
        return repr(uid)
    return f"<{len(uid)} characters, digest {path_name(uid)}>"


def path_name(uid: str) -> str:
    """The file or folder name that stands for `uid`: the same for the same UID, safe whatever it holds."""
    return hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:PATH_NAME_LENGTH]


def _not_a_uid_complaint(record: logging.LogRecord) -> bool:
    return not _LIBRARY_UID_COMPLAINT.search(record.getMessage())


def quiet_library_uid_complaints() -> None:
    """Drop pydicom's and pynetdicom's complaint about each non-conformant UID value (one per
    instance and attribute); the node reports such UIDs itself, once per study (node.intake)."""
    warnings.filterwarnings("ignore", message=r".*for VR UI\b")
    for name in ("pydicom", "pynetdicom.utils"):  # the loggers that say it (a filter holds for its own logger only)
        logging.getLogger(name).addFilter(_not_a_uid_complaint)
