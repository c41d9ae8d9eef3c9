"""The DICOM listener: C-ECHO and C-STORE SCP, one plain handler per event.

The C-STORE handler hands the received bytes to `Intake.accept` (node/intake.py: parse the header,
validate, spool with fsync, record) and only then answers success; a refusal is answered with its
status and an Error Comment saying why (the codes are listed in node/intake.py). SOP classes other
than Verification, CT Image Storage and Enhanced CT Image Storage are refused at association
negotiation (presentation context rejected: abstract syntax not supported).
"""
from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from node.config import Settings
from node.intake import STORAGE_CLASSES, TRANSFER_SYNTAXES, Intake, Refused
from node.spool import Spool
from node.store import Store

log = logging.getLogger("ichnode.scp")


def _status(refused: Refused) -> Dataset:
    status = Dataset()
    status.Status = refused.status
    status.ErrorComment = refused.reason[:64]
    return status


class StoreHandler:
    """Handles EVT_C_STORE: the instance goes through the intake, then the answer."""

    def __init__(self, intake: Intake):
        self.intake = intake

    def __call__(self, event) -> Dataset | int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)

        def matches_command(header: dict) -> None:
            if header["sop_instance_uid"] != sop_uid:
                raise Refused(0xA900, "SOP Instance UID differs from Affected SOP Instance UID")

        try:
            self.intake.accept(event.encoded_dataset(), event.assoc.requestor.ae_title, matches_command)
        except Refused as refused:
            return _status(refused)
        return 0x0000


def handle_echo(event) -> int:
    log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
    return 0x0000


def handle_rejected(event) -> None:
    log.warning("association from %s@%s rejected", event.assoc.requestor.ae_title, event.assoc.requestor.address)


def make_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.require_called_aet = settings.check_called_aet
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if settings.allowed_calling_aets:
        ae.require_calling_aet = list(settings.allowed_calling_aets)
    return ae


def start_listener(settings: Settings, spool: Spool, store: Store):
    """Start the SCP in its own threads; returns the pynetdicom server (call .shutdown())."""
    ae = make_ae(settings)
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, StoreHandler(Intake(spool, store))),
        (evt.EVT_REJECTED, handle_rejected),
    ]
    server = ae.start_server((settings.bind, settings.port), block=False, evt_handlers=handlers)
    log.info("DICOM listener %s on %s:%d", settings.ae_title, settings.bind, settings.port)
    return server
