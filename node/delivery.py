"""Delivery: a persistent outbox of results for PACS (C-STORE or STOW-RS), the RIS (HL7) and webhooks.

`plan_deliveries` puts one outbox row per result object and destination, per HL7 endpoint and per
webhook; a destination with `sop_classes` gets only objects of those. `Deliverer.run_once` sends
what is due; an item stays pending until its destination acknowledges it, retried with exponential
backoff capped at `delivery.max_backoff_seconds`, so a PACS that is down for an hour gets its
results when it returns and a restart loses nothing.

C-STORE sends each object in its own request, over an association that proposed the SOP classes
of the batch, and records each answer at once, so nothing acknowledged is sent again. An object
whose SOP class the peer did not accept, or that it answered with a failure status that cannot
pass (node.delivery.FINAL_STATUSES, 0xA9xx, 0xCxxx), becomes `failed` with the peer's reason; a
failure status that may pass (out of resources, ...) is retried up to `delivery.max_attempts`.
A `tls:AET@host:port` destination is sent to over DICOM TLS (node/dicom_tls.py). Every item
sent is a line in the audit trail (node/audit.py).
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from ichnode.common.analysis import SeriesFindings
from ichnode.common.config import Destination, ListenerSection, Settings, StowEndpoint, parse_destination
from ichnode.common.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node import audit
from node.dicom_tls import client_context
from node.errors import DeliveryError, Outcome, Retry
from node.hl7 import build_oru, send_mllp
from node.latency import observe, stage_seconds
from node.metrics import DELIVERIES, DELIVERIES_FAILED
from node.store import DeliveryRow, SeriesRow, Store
from node.stow import send_stow
from node.webhooks import build_webhook_payload, post_webhook, should_notify

log = logging.getLogger("ichnode.delivery")

BACKOFF_BASE_SECONDS = 2.0


def result_sop_class(path: Path) -> str | None:
    """The SOP Class UID of a result file; None when it cannot be read (delivery then reports why)."""
    try:
        return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)
    except Exception:
        return None


def plan_deliveries(store: Store, settings: Settings, series: SeriesRow, generation: int,
                    findings: SeriesFindings) -> None:
    uid = series.series_uid
    study = store.study(series.study_uid)
    for destination in settings.delivery.destinations:
        for path in findings.result_files:
            if isinstance(destination, Destination) and destination.sop_classes:
                sop_class = result_sop_class(settings.storage.data_dir / path)
                if sop_class and not destination.takes(sop_class):
                    log.info("series %s: %s not planned for %s (not in its sop_classes)", uid,
                             UID(sop_class).name, destination)
                    continue
            store.enqueue_delivery(uid, generation, "dicom", str(destination), path)
    if settings.hl7.endpoints:
        message = build_oru(findings, study, settings.hl7.sending_facility)
        for endpoint in settings.hl7.endpoints:
            store.enqueue_delivery(uid, generation, "hl7", str(endpoint), message)
    webhook = settings.webhook
    if webhook.urls and should_notify(findings.priority.level, webhook.min_level):
        payload = json.dumps(build_webhook_payload(findings, study, webhook.include_patient,
                                                   base_url=settings.http.public_url))
        for url in webhook.urls:
            store.enqueue_delivery(uid, generation, "webhook", url, payload)


#: C-STORE failure statuses that cannot pass by retrying (PS3.4 B.2-1, PS3.7 C): SOP class not
#: supported, not authorized, invalid object instance; data set does not match SOP class
#: (0xA9xx); cannot understand (0xCxxx). Any other failure status is retried up to max_attempts.
FINAL_STATUSES = {0x0122, 0x0124, 0x0117}


def status_retry(code: int) -> Retry:
    """How a C-STORE failure status is retried."""
    final = code in FINAL_STATUSES or 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF
    return "never" if final else "bounded"


def send_dicom(listener: ListenerSection, destination: Destination, paths: list[Path]) -> Iterator[tuple[Path, Outcome]]:
    """C-STORE each file in its own request over one association that proposes every SOP class of
    them, as the listener's AE title (and over TLS with its certificate for a tls: destination);
    yields (path, outcome) as each is answered. An object whose SOP class the peer did not accept
    is not sent: its outcome says so, never retried."""
    datasets = {path: dcmread(path) for path in paths}
    ae = AE(ae_title=listener.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets.values()}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls_args = (client_context(listener), destination.host) if destination.tls else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "no association (peer down or refused)"
        for path in paths:
            yield path, Outcome(error=f"{destination}: {reason}")
        return
    try:
        accepted = {context.abstract_syntax for context in assoc.accepted_contexts}
        refused = {context.abstract_syntax: context.status for context in assoc.rejected_contexts}
        for path, ds in datasets.items():
            sop_class = UID(ds.SOPClassUID)
            if sop_class not in accepted:
                why = refused.get(sop_class, "not accepted")
                yield path, Outcome(error=f"{destination} refused SOP class {sop_class.name} at association "
                                          f"negotiation (presentation context: {why})", retry="never",
                                    cause=f"SOP class refused: {sop_class.name}")
                continue
            if not assoc.is_established:  # aborted or released by the peer during this association
                yield path, Outcome(error=f"{destination}: association ended before this object was sent")
                continue
            try:
                status = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted context fits the object's transfer syntax
                yield path, Outcome(error=f"{destination}: not sent: {exc}", retry="never", cause="no fitting context")
                continue
            code = getattr(status, "Status", None)
            if code is None:
                yield path, Outcome(error=f"{destination}: no C-STORE response (connection lost or timed out)")
                continue
            reason = f"{destination}: C-STORE status 0x{code:04X} {status.get('ErrorComment', '')}".strip()
            if code == 0x0000:
                yield path, Outcome()
            elif 0xB000 <= code <= 0xBFFF:
                yield path, Outcome(warning=reason)
            else:
                yield path, Outcome(error=reason, retry=status_retry(code), cause=f"status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()


class Deliverer:
    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings

    def _backoff(self, attempts: int) -> float:
        delay = min(self.settings.delivery.max_backoff_seconds, BACKOFF_BASE_SECONDS * 2 ** attempts)
        return delay * random.uniform(0.8, 1.0)

    def _failed(self, item: DeliveryRow, error: str, now: float, retry: Retry = "unbounded",
                cause: str = "not stored") -> None:
        refusals = item.refusals + (retry != "unbounded")
        if retry == "never" or (retry == "bounded" and refusals >= self.settings.delivery.max_attempts):
            self._given_up(item, error, cause)
            return
        DELIVERIES.labels(channel=item.channel, outcome="retry").inc()
        delay = self._backoff(item.attempts)
        log.warning("delivery %d (%s to %s) failed, attempt %d, next in %.0f s: %s",
                    item.id, item.channel, item.target, item.attempts + 1, delay, error)
        self.store.delivery_failed(item.id, error, now + delay, refused=retry != "unbounded")

    def _given_up(self, item: DeliveryRow, error: str, cause: str) -> None:
        DELIVERIES.labels(channel=item.channel, outcome="failed").inc()
        DELIVERIES_FAILED.labels(target=item.target, cause=cause).inc()
        log.error("delivery %d (%s to %s) failed for good after %d attempt(s), not sent again: %s",
                  item.id, item.channel, item.target, item.attempts + 1, error)
        self.store.delivery_given_up(item.id, error)

    def _sent(self, item: DeliveryRow, warning: str | None = None) -> None:
        DELIVERIES.labels(channel=item.channel, outcome="sent").inc()
        if item.channel == "dicom":
            audit.record("DICOM Instances Transferred", "R", destination=item.target, series_instance_uid=item.series_uid,
                         result_object=Path(item.payload).name)
        else:  # a webhook URL's path may be its secret: the audit names the host
            target = urlsplit(item.target).netloc if item.channel == "webhook" else item.target
            audit.record("Export", "R", channel=item.channel, destination=target, series_instance_uid=item.series_uid)
        if warning:
            log.warning("delivery %d (%s to %s) stored with a warning: %s", item.id, item.channel, item.target,
                        warning)
        self.store.delivery_sent(item.id, warning)
        series = self.store.series(item.series_uid)
        if series is not None and series.generation == item.generation:
            observe(stage_seconds(series, self.store.deliveries(item.series_uid)), "delivery", "total")

    def run_once(self, now: float | None = None) -> int:
        """Send everything due; returns how many items were sent. Each object's outcome is recorded
        as soon as its destination answers."""
        now = time.time() if now is None else now
        due = self.store.due_deliveries(now)
        sent = 0
        by_destination: dict[str, list[DeliveryRow]] = defaultdict(list)
        for item in due:
            if item.channel == "dicom":
                by_destination[item.target].append(item)
                continue
            try:
                if item.channel == "hl7":
                    send_mllp(item.target, item.payload)
                else:
                    post_webhook(item.target, json.loads(item.payload))
            except DeliveryError as exc:
                self._failed(item, str(exc), now)
                continue
            self._sent(item)
            sent += 1
        for target, items in by_destination.items():
            paths = {self.settings.storage.data_dir / item.payload: item for item in items}
            missing = [p for p in paths if not p.exists()]
            for path in missing:
                self._failed(paths.pop(path), f"result file {path} is missing", now)
            answered: set[Path] = set()
            try:
                destination = parse_destination(target)
                if isinstance(destination, StowEndpoint):
                    outcomes = iter(send_stow(destination, list(paths), self.settings.delivery).items())
                else:
                    outcomes = send_dicom(self.settings.listener, destination, list(paths))
                for path, result in outcomes:
                    answered.add(path)
                    if result.error is None:
                        self._sent(paths[path], result.warning)
                        sent += 1
                    else:
                        self._failed(paths[path], result.error, now, result.retry, result.cause)
            except Exception as exc:  # a broken file or socket error: what was not answered is retried, never dropped
                for path in paths.keys() - answered:
                    self._failed(paths[path], f"{target}: {type(exc).__name__}: {exc}", now)
        if sent:
            log.info("delivered %d item(s)", sent)
        return sent
