"""The DICOM listener: C-ECHO and C-STORE SCP, one plain handler per event.

The C-STORE handler parses the header only (pixel data is not decompressed here), writes the
received bytes to the spool, fsyncs, records the instance, and only then answers success.
Statuses returned (PS3.4 Table B.2-1), each with an Error Comment saying why:
  0x0000 success (also for a duplicate SOP Instance UID, which is stored once)
  0xA700 out of resources: the instance could not be written
  0xA900 data set does not match SOP class: no pixel data, a required UID missing,
         or SOP Instance UID differs from the command's Affected SOP Instance UID
  0xC000 cannot understand: the data set could not be parsed
  0xC001 cannot understand: a UID is not valid (it would not be safe as a file name)
SOP classes other than Verification and the CT image storage classes (CT, Enhanced CT, Legacy
Converted Enhanced CT) are refused at association negotiation (presentation context rejected:
abstract syntax not supported).
"""
from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from ichnode.common.config import ListenerSection
from ichnode.common.vocabulary import CT_IMAGE_SOP_CLASSES
from node.headers import instance_header
from node.metrics import INSTANCES
from node.spool import InvalidUID, Spool, check_uid
from node.store import Store

log = logging.getLogger("ichnode.scp")

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


REQUIRED_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _status(code: int, comment: str) -> Dataset:
    INSTANCES.labels(outcome=f"refused 0x{code:04X}").inc()
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


class StoreHandler:
    """Handles EVT_C_STORE: spool first, then record, then answer."""

    def __init__(self, spool: Spool, store: Store):
        self.spool = spool
        self.store = store

    def __call__(self, event) -> Dataset | int:
        calling = event.assoc.requestor.ae_title
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        try:
            ds = event.dataset
            missing = [kw for kw in REQUIRED_ATTRIBUTES if not ds.get(kw)]
            header = None if missing else instance_header(ds, str(event.context.transfer_syntax))
        except Exception as exc:  # a malformed stream must not take the listener down
            log.warning("C-STORE %s from %s refused: cannot parse data set (%s)", sop_uid, calling, exc)
            return _status(0xC000, f"cannot parse data set: {exc}")
        if missing:
            log.warning("C-STORE %s from %s refused: missing %s", sop_uid, calling, ", ".join(missing))
            return _status(0xA900, f"missing {', '.join(missing)}")
        if "PixelData" not in ds:
            log.warning("C-STORE %s from %s refused: no Pixel Data", sop_uid, calling)
            return _status(0xA900, "no Pixel Data in the data set")
        if header.sop_instance_uid != sop_uid:
            log.warning("C-STORE %s from %s refused: SOP Instance UID in data set differs", sop_uid, calling)
            return _status(0xA900, "SOP Instance UID differs from Affected SOP Instance UID")
        try:
            for key in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
                check_uid(getattr(header, key), key)
        except InvalidUID as exc:
            log.warning("C-STORE from %s refused: %s", calling, exc)
            return _status(0xC001, str(exc))
        try:
            path, new = self.spool.write(
                header.study_instance_uid, header.series_instance_uid, sop_uid, event.encoded_dataset()
            )
            if new:
                self.store.record_instance(header, self.spool.relative(path), calling)
        except OSError as exc:
            log.error("C-STORE %s from %s: could not be stored: %s", sop_uid, calling, exc)
            return _status(0xA700, f"could not be stored: {exc.strerror or exc}")
        INSTANCES.labels(outcome="stored" if new else "duplicate").inc()
        if new:
            log.debug("stored %s (series %s) from %s", sop_uid, header.series_instance_uid, calling)
        else:
            log.info("duplicate %s from %s: already stored, kept the first copy", sop_uid, calling)
        return 0x0000


def handle_echo(event) -> int:
    log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
    return 0x0000


def handle_rejected(event) -> None:
    log.warning("association from %s@%s rejected", event.assoc.requestor.ae_title, event.assoc.requestor.address)


def make_ae(listener: ListenerSection) -> AE:
    ae = AE(ae_title=listener.ae_title)
    ae.maximum_associations = listener.max_associations
    ae.require_called_aet = listener.check_called_aet
    ae.add_supported_context(Verification)
    for sop_class in CT_IMAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if listener.allowed_calling_aets:
        ae.require_calling_aet = list(listener.allowed_calling_aets)
    return ae


def start_listener(listener: ListenerSection, spool: Spool, store: Store):
    """Start the SCP in its own threads; returns the pynetdicom server (call .shutdown())."""
    ae = make_ae(listener)
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, StoreHandler(spool, store)),
        (evt.EVT_REJECTED, handle_rejected),
    ]
    server = ae.start_server((listener.bind, listener.port), block=False, evt_handlers=handlers)
    log.info("DICOM listener %s on %s:%d", listener.ae_title, listener.bind, listener.port)
    return server
