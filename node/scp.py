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

Connections are not associations. `max_associations` counts the associations that passed
negotiation (`ListenerAE`); a connection must send its A-ASSOCIATE-RQ within
`acse_timeout_seconds` or it is closed (`NegotiationDeadlines`), whether it sends nothing or one
byte a second. Garbled data ends its connection with pynetdicom's A-ABORT and one log line (at most
one a second for each kind, `Throttled`), never a traceback. With `tls_cert` the same service is
served with DICOM TLS (PS3.15 B.1) on `tls_port`, beside the plain port unless
`plain_port_enabled = false`. Associations accepted and rejected, TLS handshakes that failed and
the instances stored per series and association go to the audit trail (node/audit.py).
"""
from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
import time
import weakref
from collections import Counter
from typing import Callable

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from ichnode.common.config import ListenerSection
from ichnode.common.log_privacy import redact
from ichnode.common.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, UID_MAX_LENGTH
from ichnode.common.vocabulary import CT_IMAGE_SOP_CLASSES
from node import audit
from node.dicom_tls import server_context
from node.headers import InstanceHeader
from node.intake import TRANSFER_SYNTAXES, Intake, Refused
from node.spool import Spool
from node.store import Store

log = logging.getLogger("ichnode.scp")

LISTEN_BACKLOG = 256  # connections the kernel queues while the accept loop is busy (socketserver's default: 5)
DEADLINE_CHECK_SECONDS = 0.25


class Throttled:
    """One log line per event, at most one per `interval` seconds; the next line says how many were
    left out in between."""

    def __init__(self, level: int, interval: float = 1.0):
        self.level = level
        self.interval = interval
        self.left_out = 0
        self.next_at = 0.0
        self.lock = threading.Lock()

    def __call__(self, message: str, *args) -> None:
        with self.lock:
            now = time.monotonic()
            if now < self.next_at:
                self.left_out += 1
                return
            left_out, self.left_out, self.next_at = self.left_out, 0, now + self.interval
        if left_out:
            message += f" ({left_out} more like it in the last {self.interval:g} s not logged)"
        log.log(self.level, message, *args)


log_garbled = Throttled(logging.WARNING)
log_deadline = Throttled(logging.WARNING)
log_tls_failure = Throttled(logging.WARNING)
log_thread_error = Throttled(logging.ERROR)


def _peer(assoc: Association) -> str:
    return f"{assoc.requestor.address}:{assoc.requestor.port}"


class ListenerAE(AE):
    """An AE whose association limit counts associations, not TCP connections.

    pynetdicom checks `maximum_associations` during negotiation against every acceptor thread, and
    it starts one per TCP connection before anything is received, so sockets that never negotiate
    held every slot. Here only established associations count, with the one negotiating now."""

    @property
    def active_associations(self) -> list[Association]:
        current = threading.current_thread()
        return [assoc for assoc in super().active_associations if assoc.is_established or assoc is current]


class SharedContexts(list):
    """The supported presentation contexts, shared by every connection instead of deep-copied for
    each (pynetdicom copies them per connection: about 40 ms for 171 contexts with every transfer
    syntax, before the peer has said anything); negotiation only reads them."""

    def __deepcopy__(self, memo) -> list:
        return list(self)


def _stopped(thread: threading.Thread) -> bool:
    """Started and ended (an association thread starts its reader thread a little after it opens)."""
    return thread.ident is not None and not thread.is_alive()


class NegotiationDeadlines:
    """Ends each connection that has not negotiated an association `seconds` after it opened, and
    the waiting thread of one whose connection is already gone.

    pynetdicom's ARTIM timer is not looked at while its reader waits for the rest of a PDU, so a
    peer trickling a byte a second, or announcing a long PDU and stopping, kept its connection; and
    after garbled data its association thread waited out the ACSE timeout for a request that could
    no longer come. A None on the thread's primitive queue is what pynetdicom's own ACSE timeout
    hands it: the thread closes the connection and ends."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.pending: dict[Association, float] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="negotiation-deadlines", daemon=True)
        self.thread.start()

    def opened(self, event) -> None:
        with self.lock:
            self.pending[event.assoc] = time.monotonic() + self.seconds

    def negotiated(self, event) -> None:
        """Bound to EVT_ACCEPTED and EVT_REJECTED: the ACSE timeout no longer applies."""
        with self.lock:
            self.pending.pop(event.assoc, None)

    def _run(self) -> None:
        while not self.stopped.wait(DEADLINE_CHECK_SECONDS):
            now = time.monotonic()
            with self.lock:
                ended = [(assoc, deadline <= now) for assoc, deadline in self.pending.items()
                         if deadline <= now or _stopped(assoc.dul) or _stopped(assoc)]
                for assoc, _ in ended:
                    del self.pending[assoc]
            for assoc, expired in ended:
                if expired and assoc.dul.is_alive():
                    self._close(assoc)
                assoc.dul.to_user_queue.put(None)

    def _close(self, assoc: Association) -> None:
        wrapped = assoc.dul.socket
        raw = wrapped.socket if wrapped is not None else None
        if raw is None:
            return
        log_deadline("connection from %s sent no association request within %g s (acse_timeout_seconds): closed",
                     _peer(assoc), self.seconds)
        try:
            raw.shutdown(socket.SHUT_RDWR)  # the reader's recv() returns
        except OSError:
            pass

    def stop(self) -> None:
        self.stopped.set()


class GarbledDataFilter(logging.Filter):
    """Turns pynetdicom's error lines and tracebacks about what a peer sent to the listener into one
    line per connection. pynetdicom answers an undecodable PDU with an A-ABORT and closes the
    connection; one cut short ends with the connection."""

    def __init__(self):
        super().__init__()
        self.reported: weakref.WeakSet[Association] = weakref.WeakSet()

    def filter(self, record: logging.LogRecord) -> bool:
        thread = threading.current_thread()
        assoc = getattr(thread, "assoc", None) if isinstance(thread, DULServiceProvider) else None
        if assoc is None or not assoc.is_acceptor or record.levelno < logging.ERROR:
            return True
        if assoc not in self.reported:
            self.reported.add(assoc)
            log_garbled("connection from %s: invalid or incomplete PDU (%s); association aborted",
                        _peer(assoc), redact(record.getMessage())[:200])
        return False


GARBLED_DATA = GarbledDataFilter()
PYNETDICOM_LOGGERS = ("pynetdicom.dul", "pynetdicom.utils", "pynetdicom.pdu", "pynetdicom.pdu_items",
                      "pynetdicom.transport", "pynetdicom.assoc", "pynetdicom.acse", "pynetdicom.fsm")


def _log_thread_error(args: threading.ExceptHookArgs, previous=threading.excepthook) -> None:
    """An exception that escapes a pynetdicom thread is one line, not a traceback."""
    if isinstance(args.thread, (Association, DULServiceProvider)):
        log_thread_error("association thread %s ended by %s: %s", args.thread.name, args.exc_type.__name__,
                         redact(str(args.exc_value))[:200])
        return
    previous(args)


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's server with a listen backlog for bursts, TLS handshakes in the connection's own
    thread (pynetdicom does them in the accept loop, where one silent client stalls every other), no
    forced garbage collection in the accept loop, and one log line instead of a traceback for what
    goes wrong in a connection."""

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True
    handshake_seconds = 10.0  # the listener's acse_timeout_seconds

    def get_request(self):
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request, client_address) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.handshake_seconds)
                request.do_handshake()
                request.settimeout(None)
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or type(exc).__name__
                log_tls_failure("TLS handshake with %s:%d failed: %s", *client_address[:2], reason)
                audit.record("Security Alert", "E", audit.MINOR_FAILURE, alert="TLS handshake failed",
                             address=client_address[0], reason=str(reason))
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def service_actions(self) -> None:
        """Nothing: pynetdicom's runs a full gc.collect() every 60 connections, seconds each in a
        process that imported torch (`serve`), while no connection is accepted; Python's own
        collector frees the associations' reference cycles."""

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        log_thread_error("connection from %s:%d ended by %s: %s", *client_address[:2], type(exc).__name__,
                         redact(str(exc))[:200])


class Listener:
    """The running servers of the listener (plain and TLS ports); `shutdown()` stops them."""

    def __init__(self, servers: list[ListenerServer], deadlines: NegotiationDeadlines):
        self.servers = servers
        self.deadlines = deadlines

    def shutdown(self) -> None:
        for server in self.servers:
            server.shutdown()
        self.deadlines.stop()


def _status(refused: Refused) -> Dataset:
    status = Dataset()
    status.Status = refused.status
    status.ErrorComment = refused.reason[:64]
    return status


class StoreHandler:
    """Handles EVT_C_STORE: the instance goes through the intake, then the answer. The headers
    stored in each association go to the audit trail, per series, when it ends; when its sender
    releases it, the CT instances it brought are reported per series to `on_released` (an early
    hint that a series is complete, node/assembler.py)."""

    def __init__(self, intake: Intake, on_released: Callable[[dict[str, int]], None] | None = None):
        self.intake = intake
        self.on_released = on_released
        self.stored: dict[Association, list[InstanceHeader]] = {}
        self.lock = threading.Lock()

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
        with self.lock:
            self.stored.setdefault(event.assoc, []).append(header)
        return 0x0000

    def ended(self, event) -> None:
        """Bound to EVT_RELEASED, EVT_ABORTED and EVT_CONN_CLOSE (whichever comes first finds the
        headers); only a release is a hint that the sender is done."""
        with self.lock:
            headers = self.stored.pop(event.assoc, [])
        if not headers:
            return
        requestor = event.assoc.requestor
        audit.instances_stored(headers, peer_ae=requestor.ae_title, address=requestor.address)
        brought = Counter(h.series_instance_uid for h in headers if h.sop_class_uid in CT_IMAGE_SOP_CLASSES)
        if event.event == evt.EVT_RELEASED and brought and self.on_released:
            self.on_released(dict(brought))


def handle_echo(event) -> int:
    log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
    return 0x0000


def _tls(event) -> bool:
    return isinstance(event.assoc.dul.socket.socket, ssl.SSLSocket) if event.assoc.dul.socket else False


def handle_accepted(event) -> None:
    requestor = event.assoc.requestor
    audit.record("Association", "E", peer_ae=requestor.ae_title, address=requestor.address,
                 called_ae=event.assoc.acceptor.ae_title, tls=_tls(event))


def handle_rejected(event) -> None:
    requestor = event.assoc.requestor
    log.warning("association from %s@%s rejected", requestor.ae_title, requestor.address)
    audit.record("Association", "E", audit.MINOR_FAILURE, peer_ae=requestor.ae_title, address=requestor.address,
                 tls=_tls(event), reason="rejected (calling or called AE title, or too many associations)")


def accept_any_uid(value: str) -> tuple[bool, str]:
    """pynetdicom's check of UIDs in DIMSE commands; its default refuses any over 64 characters."""
    return (True, "") if value else (False, "must not be empty")


def make_ae(listener: ListenerSection) -> AE:
    _config.VALIDATORS["UI"] = accept_any_uid
    # values are kept as received and UIDs checked by the intake; pydicom's per-value checks only
    # warn, and cost a large share of the listener's CPU (every UID it makes, per association too)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    ae = ListenerAE(ae_title=listener.ae_title)
    ae.maximum_pdu_size = listener.max_pdu_bytes
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.maximum_associations = listener.max_associations
    ae.acse_timeout = listener.acse_timeout_seconds
    ae.dimse_timeout = listener.dimse_timeout_seconds
    ae.network_timeout = listener.network_timeout_seconds
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


def _quiet_pynetdicom_threads() -> None:
    for name in PYNETDICOM_LOGGERS:
        logger = logging.getLogger(name)
        if GARBLED_DATA not in logger.filters:
            logger.addFilter(GARBLED_DATA)
    if threading.excepthook is not _log_thread_error:
        threading.excepthook = _log_thread_error


def start_listener(listener: ListenerSection, spool: Spool, store: Store,
                   on_released: Callable[[dict[str, int]], None] | None = None) -> Listener:
    """Start the SCP on the plain port, the TLS port or both, in their own threads.
    `on_released(instances by series)` is called when a sender releases an association."""
    _quiet_pynetdicom_threads()
    ae = make_ae(listener)
    deadlines = NegotiationDeadlines(listener.acse_timeout_seconds)
    store_handler = StoreHandler(Intake(spool, store, listener), on_released)
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, store_handler),
        (evt.EVT_ACCEPTED, handle_accepted),
        (evt.EVT_REJECTED, handle_rejected),
        (evt.EVT_RELEASED, store_handler.ended),
        (evt.EVT_ABORTED, store_handler.ended),
        (evt.EVT_CONN_CLOSE, store_handler.ended),
        (evt.EVT_CONN_OPEN, deadlines.opened),
        (evt.EVT_ACCEPTED, deadlines.negotiated),
        (evt.EVT_REJECTED, deadlines.negotiated),
    ]
    ports = [(listener.port, None)] if listener.plain_port_enabled else []
    if listener.tls:
        ports.append((listener.tls_port, server_context(listener)))
    servers = []
    for port, context in ports:
        server = ae.make_server((listener.bind, port), ae_title=listener.ae_title,
                                contexts=SharedContexts(ae.supported_contexts), ssl_context=context,
                                evt_handlers=handlers, server_class=ListenerServer)
        server.handshake_seconds = listener.acse_timeout_seconds
        threading.Thread(target=server.serve_forever, name=f"listener-{port}", daemon=True).start()
        ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it
        servers.append(server)
        log.info("DICOM listener %s on %s:%d%s", listener.ae_title, listener.bind, port,
                 " (DICOM TLS)" if context else "")
    return Listener(servers, deadlines)
