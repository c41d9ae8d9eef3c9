"""The DICOM listener: C-ECHO and C-STORE SCP, one plain handler per event.

The C-STORE handler hands the received bytes to `Intake.accept` (node/intake.py: parse the header,
validate, spool with fsync, record in a group commit) and only then answers success; a refusal is answered with its
status and an Error Comment saying why (the codes are listed in node/intake.py). The CT image
storage classes (CT, Enhanced CT, Legacy Converted Enhanced CT) are negotiated with the transfer
syntaxes the worker decodes; with `accept_all_storage` every other public storage SOP class is
too, in any transfer syntax (such objects are counted, never decoded). Other abstract syntaxes
(and, without `accept_all_storage`, the other storage classes) are refused at association
negotiation (presentation context rejected: abstract syntax not supported). UIDs in commands may
break the DICOM grammar or its 64 characters, as in the data sets (ichnode.common.uids); only an
empty one is refused. When a sender releases an association, the CT instances it brought are
reported per series (`on_released`): the assembler may then finish those series early. The
largest PDU accepted is `max_pdu_bytes`.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification

from ichnode.common.config import ListenerSection
from ichnode.common.uids import UID_MAX_LENGTH
from ichnode.common.vocabulary import CT_IMAGE_SOP_CLASSES
from node.headers import InstanceHeader
from node.intake import TRANSFER_SYNTAXES, Intake, Refused
from node.spool import Spool
from node.store import Store

log = logging.getLogger("ichnode.scp")


def _status(refused: Refused) -> Dataset:
    status = Dataset()
    status.Status = refused.status
    status.ErrorComment = refused.reason[:64]
    return status


class StoreHandler:
    """Handles EVT_C_STORE: the instance goes through the intake, then the answer. Counts the CT
    instances each association brought per series, for `on_released` when its sender releases it
    (an early hint that a series is complete, node/assembler.py)."""

    def __init__(self, intake: Intake, on_released: Callable[[dict[str, int]], None] | None = None):
        self.intake = intake
        self.on_released = on_released
        self._brought: dict[int, Counter[str]] = {}  # by id(association); the GIL guards the dict

    def released(self, event) -> None:
        brought = self._brought.pop(id(event.assoc), None)
        if brought and self.on_released:
            self.on_released(dict(brought))

    def closed(self, event) -> None:
        self._brought.pop(id(event.assoc), None)  # aborted or refused: no hint

    def __call__(self, event) -> Dataset | int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)

        def matches_command(header: InstanceHeader) -> None:
            # DCMTK cuts the command's UID at the 64 characters of VR UI; the data set keeps it whole
            if sop_uid not in (header.sop_instance_uid, header.sop_instance_uid[:UID_MAX_LENGTH]):
                raise Refused(0xA900, "SOP Instance UID differs from Affected SOP Instance UID")

        try:
            header = self.intake.accept(event.encoded_dataset(), event.assoc.requestor.ae_title, matches_command)
        except Refused as refused:
            return _status(refused)
        if header.sop_class_uid in CT_IMAGE_SOP_CLASSES:
            self._brought.setdefault(id(event.assoc), Counter())[header.series_instance_uid] += 1
        return 0x0000


def handle_echo(event) -> int:
    log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
    return 0x0000


def handle_rejected(event) -> None:
    log.warning("association from %s@%s rejected", event.assoc.requestor.ae_title, event.assoc.requestor.address)


def accept_any_uid(value: str) -> tuple[bool, str]:
    """pynetdicom's check of UIDs in DIMSE commands; its default refuses any over 64 characters."""
    return (True, "") if value else (False, "must not be empty")


def make_ae(listener: ListenerSection) -> AE:
    _config.VALIDATORS["UI"] = accept_any_uid
    # values are kept as received and UIDs checked by the intake; pydicom's per-value checks only
    # warn, and cost a large share of the listener's CPU (every UID it makes, per association too)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    ae = AE(ae_title=listener.ae_title)
    ae.maximum_pdu_size = listener.max_pdu_bytes
    ae.maximum_associations = listener.max_associations
    ae.require_called_aet = listener.check_called_aet
    ae.add_supported_context(Verification)
    for sop_class in CT_IMAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if listener.accept_all_storage:
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax not in CT_IMAGE_SOP_CLASSES:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    if listener.allowed_calling_aets:
        ae.require_calling_aet = list(listener.allowed_calling_aets)
    return ae


def start_listener(listener: ListenerSection, spool: Spool, store: Store,
                   on_released: Callable[[dict[str, int]], None] | None = None):
    """Start the SCP in its own threads; returns the pynetdicom server (call .shutdown()).
    `on_released(instances by series)` is called when a sender releases an association."""
    ae = make_ae(listener)
    store_handler = StoreHandler(Intake(spool, store, listener), on_released)
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, store_handler),
        (evt.EVT_RELEASED, store_handler.released),
        (evt.EVT_CONN_CLOSE, store_handler.closed),
        (evt.EVT_REJECTED, handle_rejected),
    ]
    server = ae.start_server((listener.bind, listener.port), block=False, evt_handlers=handlers)
    log.info("DICOM listener %s on %s:%d", listener.ae_title, listener.bind, listener.port)
    return server
